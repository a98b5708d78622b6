"""Schemathesis against the gateway's own /openapi.json: no 5xx, every error is problem+json.

At least 1 000 generated requests across every documented operation, against a
real gateway process. Rate limits are off so the fuzzer reaches the handlers.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.support import GatewayProcess

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

EXAMPLES_PER_OPERATION = 150
MINIMUM_REQUESTS = 1000
answers: Counter[int] = Counter()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> GatewayProcess:
    data_dir: Path = tmp_path_factory.mktemp("fuzz") / "data"
    config = {
        "rateLimits": {"perSession": None, "perSender": None},
        "channels": {"telegram": {"secretToken": "fuzz-secret"}, "slack": {}},
    }
    with GatewayProcess(data_dir, config, env={"SLACK_SIGNING_SECRET": "fuzz-signing"}) as process:
        yield process


@pytest.fixture(scope="module")
def api_schema(gateway: GatewayProcess):
    return schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_no_server_errors_and_problem_json(case) -> None:
    response = case.call(timeout=10)
    answers[response.status_code] += 1
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/problem+json"), response.text[:200]
        problem = response.json()
        assert problem["status"] == response.status_code
        assert problem["title"] and problem["type"]


def test_enough_requests_were_generated() -> None:
    """Runs after the fuzz test in this module: the fuzzer sent at least MINIMUM_REQUESTS requests."""
    total = sum(answers.values())
    print(f"fuzz answers by status: {dict(sorted(answers.items()))}")
    assert total >= MINIMUM_REQUESTS, f"only {total} requests generated"
