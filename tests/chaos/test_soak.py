"""Soak and chaos: two gateway processes, many clients, kill -9 and SIGSTOP.

On file transcripts the two gateways share one data dir; on Redis transcripts
(``transcript.url``) each has its own data dir and they share only Redis, as
hosts with no common disk would. Bounded in time (``SESSIONGATE_SOAK_SECONDS``,
default 30 s per soak). The audit is the assertion: nothing acknowledged is
lost, nothing is duplicated, each client's messages stay in order, every
stored record is valid; on Redis, the late appends of a SIGSTOPped gateway
are refused by Redis itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.soak import audit, file_transcripts, gateway_chaos, redis_transcripts, run_soak
from tests.support import NO_RATE_LIMITS, GatewayProcess

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

SOAK_SECONDS = float(os.environ.get("SESSIONGATE_SOAK_SECONDS", "30"))
STALE_MS = 1500
PAUSE_S = STALE_MS / 1000 + 1.5
KEY_PREFIX = "sgsoak"


def soak_config(**sections: object) -> dict:
    return {
        "providers": [{"id": "echo", "type": "echo", "delayMs": 20}],
        "sessionWriteLock": {"timeoutMs": 2000, "staleMs": STALE_MS},
        "rateLimits": NO_RATE_LIMITS,
        **sections,
    }


def start_pair(tmp_path: Path) -> list[GatewayProcess]:
    data_dir = tmp_path / "data"
    return [GatewayProcess(data_dir, soak_config()).start() for _ in range(2)]


def start_redis_pair(tmp_path: Path, redis_url: str) -> list[GatewayProcess]:
    """Two gateways with their own data dirs: Redis holds leases, fences and transcripts.

    Model calls take 200 ms, so a SIGSTOP mostly lands in one and the frozen turn
    later tries its append (the case storage-side fencing exists for).
    """
    config = soak_config(
        backend={"url": redis_url, "keyPrefix": KEY_PREFIX},
        transcript={"url": redis_url},
        providers=[{"id": "echo", "type": "echo", "delayMs": 200}],
    )
    return [GatewayProcess(tmp_path / f"data-{name}", config).start() for name in "ab"]


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
    result = audit(file_transcripts(tmp_path / "data"), report)
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
            gateways, sessions=8, clients=32, seconds=SOAK_SECONDS, chaos=gateway_chaos(gateways, PAUSE_S)
        )
    finally:
        stop_all(gateways)
    result = audit(file_transcripts(tmp_path / "data"), report)
    print(
        f"chaos soak: sent={report.sent} acked={len(report.acknowledged)} statuses={dict(report.statuses)} "
        f"transport_errors={report.transport_errors} events={report.chaos_events} {result.summary()}"
    )
    assert report.chaos_events, "chaos must have happened"
    assert not report.five_hundreds
    assert len(report.acknowledged) > 50
    assert result.ok, result


@pytest.mark.redis
@pytest.mark.anyio
async def test_soak_on_redis_transcripts_with_kill_and_sigstop(tmp_path: Path, redis_url: str) -> None:
    gateways = start_redis_pair(tmp_path, redis_url)
    try:
        report = await run_soak(
            gateways, sessions=8, clients=32, seconds=SOAK_SECONDS, chaos=gateway_chaos(gateways, PAUSE_S),
            request_timeout_s=STALE_MS / 1000 + 0.5,  # a client stuck on the frozen gateway retries on the other
        )
    finally:
        stop_all(gateways)
    result = audit(redis_transcripts(redis_url, KEY_PREFIX), report)
    print(
        f"redis chaos soak: sent={report.sent} acked={len(report.acknowledged)} statuses={dict(report.statuses)} "
        f"transport_errors={report.transport_errors} events={report.chaos_events} "
        f"late writes refused={report.late_writes_refused} {result.summary()}"
    )
    assert any(event.startswith("SIGSTOP") for event in report.chaos_events), "a gateway must have been stopped"
    assert not report.five_hundreds
    assert len(report.acknowledged) > 50
    assert report.late_writes_refused > 0, "the stopped gateway's late appends must have reached Redis and been refused"
    assert not list(tmp_path.glob("data-*/sessions/*.jsonl")), "no transcript on a gateway's disk"
    assert result.ok, result
