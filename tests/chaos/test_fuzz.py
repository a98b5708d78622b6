"""Schemathesis against the gateway's own /openapi.json: no 5xx, every answer as documented.

At least 1 000 generated requests across every documented operation, against a
real gateway process, with ``--checks all``: no server error, status codes,
content types (errors are ``application/problem+json``) and bodies conform to
the document. Rate limits are off and both channels are configured (with the
Telegram secret sent), so the fuzzer reaches the handlers.

``positive_data_acceptance`` is left out: the fuzzer repeats an Idempotency-Key
with another valid body and gets the documented 422 idempotency-key-reused,
which that check counts as a refusal of valid data.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import NO_RATE_LIMITS, GatewayProcess

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(400)]

EXAMPLES_PER_OPERATION = 250
MINIMUM_REQUESTS = 1000
TELEGRAM_SECRET = "fuzz-secret"


def test_schemathesis_finds_no_violation_of_the_openapi_document(tmp_path: Path) -> None:
    config = {
        "rateLimits": NO_RATE_LIMITS,
        "channels": {"telegram": {"secretToken": TELEGRAM_SECRET}, "slack": {}},
    }
    with GatewayProcess(tmp_path / "data", config, env={"SLACK_SIGNING_SECRET": "fuzz-signing"}) as gateway:
        result = subprocess.run(
            [Path(sys.executable).with_name("schemathesis"), "run", f"{gateway.url}/openapi.json",
             "--checks", "all", "--exclude-checks", "positive_data_acceptance",
             "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", "1",
             "-H", f"X-Telegram-Bot-Api-Secret-Token: {TELEGRAM_SECRET}"],
            capture_output=True, text=True, timeout=360,
        )
        gateway_log = gateway.log()
    assert result.returncode == 0, result.stdout[-4000:]
    generated = re.search(r"(\d+) generated", result.stdout)
    assert generated is not None, result.stdout[-2000:]
    print(f"schemathesis: {generated.group(0)}")
    assert int(generated.group(1)) >= MINIMUM_REQUESTS
    assert "Traceback" not in gateway_log
