"""A careless or hostile client against the newer routes of a real gateway process.

Each test is one defect an outside check found, driven over HTTP on
127.0.0.1 against ``sessiongate serve`` as a separate OS process: a paging
``limit`` of thousands of digits, and ``Accept`` headers read as substrings
(``text/event-stream;q=0`` streamed, ``TEXT/EVENT-STREAM`` did not).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support import NO_RATE_LIMITS, GatewayProcess, assert_problem, messages_url

ECHO = {"providers": [{"id": "echo", "type": "echo", "delayMs": 200}], "rateLimits": NO_RATE_LIMITS}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with GatewayProcess(tmp_path_factory.mktemp("outside") / "data", ECHO) as running:
        yield running


@pytest.mark.parametrize("limit", ["1" * 5000, "0" * 4 + "1", "\u0663"])  # past int()'s digit limit, padded, Arabic 3
def test_a_page_limit_that_is_not_a_few_ascii_digits_is_invalid_request(gateway: GatewayProcess, limit: str) -> None:
    answer = httpx.get(messages_url(gateway.url, "paged"), params={"limit": limit}, timeout=10)
    assert_problem(answer, 400, "invalid-request")


@pytest.mark.parametrize(("accept", "streams"), [
    ("text/event-stream", True),
    ("TEXT/Event-Stream", True),  # media types are case-insensitive
    ("application/json, text/event-stream", True),
    ("text/event-stream;q=0", False),  # q=0: "not acceptable"
    ("application/json, text/event-stream;q=0.1", False),  # JSON preferred
    ("*/*", False),
])
def test_the_answer_follows_the_accept_header(gateway: GatewayProcess, accept: str, streams: bool) -> None:
    answer = httpx.post(messages_url(gateway.url, "accept"), json={"text": "hi"}, headers={"Accept": accept}, timeout=10)
    assert answer.status_code == 200, answer.text
    media_type = answer.headers["content-type"].split(";")[0]
    assert media_type == ("text/event-stream" if streams else "application/json")
    assert ("event: done" in answer.text) if streams else answer.json()["reply"]["text"] == "hi"
