"""A careless or hostile client against the newer routes of a real gateway process.

Each test is one defect an outside check found, driven over HTTP on
127.0.0.1 against ``sessiongate serve`` as a separate OS process: a paging
``limit`` of thousands of digits, a chat completion's turn that the
``turns/current`` routes could neither see nor cancel, and an
Idempotency-Key replay that answered a JSON request with an event stream.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support import NO_RATE_LIMITS, GatewayProcess, assert_problem, messages_url

SLOW_ECHO = {"providers": [{"id": "echo", "type": "echo", "delayMs": 2000}], "rateLimits": NO_RATE_LIMITS}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with GatewayProcess(tmp_path_factory.mktemp("outside") / "data", SLOW_ECHO) as running:
        yield running


@pytest.mark.parametrize("limit", ["1" * 5000, "0" * 4 + "1", "\u0663"])  # past int()'s digit limit, padded, Arabic 3
def test_a_page_limit_that_is_not_a_few_ascii_digits_is_invalid_request(gateway: GatewayProcess, limit: str) -> None:
    answer = httpx.get(messages_url(gateway.url, "paged"), params={"limit": limit}, timeout=10)
    assert_problem(answer, 400, "invalid-request")
