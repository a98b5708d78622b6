"""Nothing acknowledged is lost when Redis itself is killed: AOF with ``appendfsync always``.

The test runs its own ``redis-server`` (own port, own directory, AOF on,
``appendfsync always``), a real gateway process with its leases, fences and
transcripts in that Redis, and a soak of clients. Mid-soak it ``kill -9``s
redis-server, starts it again on the same directory (it replays its AOF) and
lets the clients finish (they retry with the same ``Idempotency-Key``). The
audit reads the streams back: every acknowledged message is there once with
its reply, nothing is duplicated, each client's messages are in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from sessiongate import StorageFailed, open_backend, open_transcripts
from tests.chaos.soak import Chaos, SoakReport, audit, redis_transcripts, run_soak
from tests.support import NO_RATE_LIMITS, DedicatedRedis, GatewayProcess, free_port
from tests.test_doctor import doctor, levels
from tests.workers import settings_for

pytestmark = [pytest.mark.redis, pytest.mark.anyio, pytest.mark.timeout(120)]

KEY_PREFIX = "sgdurable"


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[DedicatedRedis]:
    aof_dir = tmp_path / "redis"
    aof_dir.mkdir()
    server = DedicatedRedis(free_port(), aof_dir=aof_dir, appendfsync="always")
    server.start()
    yield server
    server.stop()


def redis_crash(server: DedicatedRedis, *, after_s: float, down_s: float) -> Chaos:
    """``kill -9`` redis-server ``after_s`` into the soak, start it again ``down_s`` later on the same AOF."""

    async def chaos(report: SoakReport, stop_at: float) -> None:
        await asyncio.sleep(after_s)
        acknowledged = len(report.acknowledged)
        report.chaos_events.append(f"kill -9 redis-server after {acknowledged} acknowledged")
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(server.start)
        report.chaos_events.append("redis-server restarted")

    return chaos


async def test_kill_9_redis_mid_soak_loses_nothing_acknowledged(tmp_path: Path, durable_redis: DedicatedRedis) -> None:
    config = {
        "backend": {"url": durable_redis.url, "keyPrefix": KEY_PREFIX},
        "transcript": {"url": durable_redis.url},
        "providers": [{"id": "echo", "type": "echo", "delayMs": 20}],
        "rateLimits": NO_RATE_LIMITS,
        "sessionWriteLock": {"staleMs": 1500},
    }
    with GatewayProcess(tmp_path / "data", config) as gateway:
        report = await run_soak(
            [gateway], sessions=4, clients=12, seconds=8, grace=20,
            chaos=redis_crash(durable_redis, after_s=3, down_s=1),
        )
    result = audit(redis_transcripts(durable_redis.url, KEY_PREFIX), report)
    print(f"redis kill -9 soak: acked={len(report.acknowledged)} statuses={dict(report.statuses)} "
          f"events={report.chaos_events} {result.summary()}")
    assert report.chaos_events[-1] == "redis-server restarted"
    assert report.statuses[503] > 0, "the gateway must have seen Redis go away"
    assert not report.five_hundreds
    assert len(report.acknowledged) > 20
    assert report.sent - len(report.acknowledged) <= 12  # at most one per client, cut off by the end
    assert result.ok, result


def test_doctor_reports_the_servers_own_aof_setting(tmp_path: Path, durable_redis: DedicatedRedis) -> None:
    """``sessiongate doctor`` asks the server (CONFIG GET), not the config: ``always`` is ok, ``everysec`` warns."""
    config = {"backend": {"url": durable_redis.url}, "transcript": {"url": durable_redis.url}}
    result = doctor(tmp_path, config)
    assert levels(result)["durability"] == "ok", result.stdout
    with durable_redis.client() as client:
        client.config_set("appendfsync", "everysec")
    result = doctor(tmp_path, config)
    assert levels(result)["durability"] == "warn" and "last second" in result.stdout, result.stdout
    assert levels(result)["transcripts"] == "ok"


async def test_an_append_redis_refuses_for_memory_is_storage_failed_and_writes_nothing(
    tmp_path: Path, durable_redis: DedicatedRedis
) -> None:
    """Redis out of memory (``maxmemory``, ``noeviction``) refuses the script before it writes: 507, not a 500."""
    settings = settings_for(tmp_path, durable_redis.url, transcript={"url": durable_redis.url})
    backend = open_backend(settings)
    try:
        store = open_transcripts(backend, settings)
        await store.append("s", [{"role": "user", "text": "kept"}])
        with durable_redis.client() as client:
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", 1)
        with pytest.raises(StorageFailed):
            await store.append("s", [{"role": "user", "text": "refused"}, {"role": "assistant", "text": "x"}])
        with durable_redis.client() as client:
            client.config_set("maxmemory", 0)
        assert [record["text"] for record in await store.read_unlocked("s")] == ["kept"]
    finally:
        await backend.aclose()
