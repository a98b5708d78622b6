"""Soak and chaos: two gateway processes on one data dir, many clients, kill -9 and SIGSTOP.

Bounded in time (``SESSIONGATE_SOAK_SECONDS``, default 30 s per soak). The
audit is the assertion: nothing acknowledged is lost, nothing is duplicated,
each client's messages stay in order, every transcript line is valid.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.soak import audit, run_soak
from tests.support import NO_RATE_LIMITS, GatewayProcess

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

SOAK_SECONDS = float(os.environ.get("SESSIONGATE_SOAK_SECONDS", "30"))
STALE_MS = 1500


def soak_config() -> dict:
    return {
        "providers": [{"id": "echo", "type": "echo", "delayMs": 20}],
        "sessionWriteLock": {"timeoutMs": 2000, "staleMs": STALE_MS},
        "rateLimits": NO_RATE_LIMITS,
    }


def start_pair(tmp_path: Path) -> list[GatewayProcess]:
    data_dir = tmp_path / "data"
    return [GatewayProcess(data_dir, soak_config()).start() for _ in range(2)]


def stop_all(gateways: list[GatewayProcess]) -> None:
    for gateway in gateways:
        gateway.__exit__(None, None, None)


@pytest.mark.anyio
async def test_soak_two_gateways_nothing_lost_or_duplicated(tmp_path: Path) -> None:
    gateways = start_pair(tmp_path)
    try:
        report = await run_soak(gateways, sessions=8, clients=32, seconds=SOAK_SECONDS)
    finally:
        stop_all(gateways)
    result = audit(tmp_path / "data", report)
    print(f"soak: sent={report.sent} acked={len(report.acknowledged)} statuses={dict(report.statuses)} {result.summary()}")
    assert not report.five_hundreds
    assert len(report.acknowledged) > 100
    assert report.statuses[409] > 0, "the soak should have produced contention"
    assert result.ok, result


@pytest.mark.anyio
async def test_soak_with_kill_and_sigstop(tmp_path: Path) -> None:
    gateways = start_pair(tmp_path)
    try:
        report = await run_soak(
            gateways, sessions=8, clients=32, seconds=SOAK_SECONDS, chaos=True, pause_s=STALE_MS / 1000 + 1.5
        )
    finally:
        stop_all(gateways)
    result = audit(tmp_path / "data", report)
    print(
        f"chaos soak: sent={report.sent} acked={len(report.acknowledged)} statuses={dict(report.statuses)} "
        f"transport_errors={report.transport_errors} events={report.chaos_events} {result.summary()}"
    )
    assert report.chaos_events, "chaos must have happened"
    assert not report.five_hundreds
    assert len(report.acknowledged) > 50
    assert result.ok, result
