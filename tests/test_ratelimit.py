"""Rate limits on `limits`: in-process and real Redis storages, exact Retry-After, typed errors."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis

from sessiongate import Settings, _window_counts
from sessiongate._errors import BackendUnavailable, RateLimited
from sessiongate._ratelimit import RateLimits, is_shared
from sessiongate._window_counts import LazyMemoryStorage
from tests.support import free_port


def _settings(url: str = "memory://", **rates: str | None) -> Settings:
    return Settings.load(env={}, overrides={"backend": {"url": url, "keyPrefix": "sgtest"}, "rateLimits": rates})


async def _spend(limits: RateLimits, times: int, *, session_id: str = "s1", sender: str | None = "10.0.0.1") -> None:
    for _ in range(times):
        await limits.hit(session_id=session_id, sender=sender)


@pytest.mark.parametrize(
    ("url", "shared"),
    [("file://", False), ("memory://", False), ("redis://127.0.0.1:6379/15", True), ("rediss://h:1/0", True)],
)
def test_counts_are_shared_only_with_a_redis_backend(url: str, shared: bool) -> None:
    assert is_shared(_settings(url)) is shared


@pytest.mark.anyio
async def test_per_session_quota_spent_raises_rate_limited_with_header_data() -> None:
    limits = RateLimits(_settings(perSession="3/minute", perSender=None))
    await _spend(limits, 3)
    with pytest.raises(RateLimited) as caught:
        await limits.hit(session_id="s1", sender="10.0.0.1")
    error = caught.value
    assert (error.policy, error.limit, error.remaining, error.window_s) == ("perSession", 3, 0, 60)
    assert 1 <= error.retry_after_ms <= 60_000
    assert error.session_id == "s1"
    await _spend(limits, 3, session_id="s2")  # another session has its own quota


@pytest.mark.anyio
async def test_per_sender_quota_spans_sessions() -> None:
    limits = RateLimits(_settings(perSession=None, perSender="2/minute"))
    await limits.hit(session_id="a", sender="alice")
    await limits.hit(session_id="b", sender="alice")
    with pytest.raises(RateLimited) as caught:
        await limits.hit(session_id="c", sender="alice")
    assert caught.value.policy == "perSender"
    await limits.hit(session_id="c", sender="bob")
    await _spend(limits, 5, sender=None)  # no sender known: only perSession applies (disabled here)


@pytest.mark.anyio
async def test_none_disables_a_limit() -> None:
    limits = RateLimits(_settings(perSession=None, perSender=None))
    assert not limits.enabled
    await _spend(limits, 200)


@pytest.mark.anyio
async def test_several_rates_in_one_string_all_apply() -> None:
    limits = RateLimits(_settings(perSession="100/minute;2/second", perSender=None))
    await _spend(limits, 2)
    with pytest.raises(RateLimited) as caught:
        await limits.hit(session_id="s1", sender=None)
    assert (caught.value.limit, caught.value.window_s) == (2, 1)


@pytest.mark.anyio
async def test_redis_storage_shares_counts_under_the_key_prefix(redis_url: str) -> None:
    first = RateLimits(_settings(redis_url, perSession="3/minute", perSender=None))
    second = RateLimits(_settings(redis_url, perSession="3/minute", perSender=None))  # another process, same Redis
    try:
        await _spend(first, 2)
        await _spend(second, 1)
        with pytest.raises(RateLimited):
            await first.hit(session_id="s1", sender=None)
    finally:
        await first.aclose()
        await second.aclose()
    client = redis.Redis.from_url(redis_url)
    assert client.keys("sgtest:ratelimit:*"), "counts are kept under backend.keyPrefix"
    assert not client.keys("LIMITS*"), "nothing under limits' own default prefix"
    client.close()


@pytest.mark.anyio
async def test_unreachable_redis_is_backend_unavailable() -> None:
    limits = RateLimits(_settings(f"redis://127.0.0.1:{free_port()}/0", perSession="3/minute"))
    with pytest.raises(BackendUnavailable) as caught:
        await limits.hit(session_id="s1", sender=None)
    assert caught.value.retry_after_ms >= 1
    await limits.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_retry_after_is_when_the_oldest_request_leaves_the_window(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_url") if backend == "redis" else "memory://"
    limits = RateLimits(_settings(url, perSession="2/second", perSender=None))
    try:
        await _spend(limits, 2)
        with pytest.raises(RateLimited) as caught:
            await limits.hit(session_id="s1", sender=None)
        assert 1 <= caught.value.retry_after_ms <= 1000
        await asyncio.sleep(caught.value.retry_after_ms / 1000 + 0.05)
        await limits.hit(session_id="s1", sender=None)  # honouring Retry-After is enough
    finally:
        await limits.aclose()


@pytest.mark.anyio
async def test_in_process_counts_start_no_thread_and_no_task() -> None:
    """limits' own memory storages expire keys in a timer thread or a per-turn task; ours does neither."""
    threads, tasks = set(threading.enumerate()), asyncio.all_tasks()
    limits = RateLimits(_settings(perSession="1000/minute", perSender="1000/minute"))
    for number in range(200):
        await limits.hit(session_id=f"s{number % 20}", sender=f"10.0.0.{number % 7}")
        await asyncio.sleep(0)
    assert set(threading.enumerate()) <= threads  # none started (one of an earlier test may have ended)
    assert asyncio.all_tasks() <= tasks


@pytest.mark.anyio
async def test_lazy_memory_storage_restarts_windows_and_sweeps_forgotten_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_window_counts, "SWEEP_INTERVAL_S", 0.5)  # the first incr sweeps; the next is due in 0.5 s
    storage = LazyMemoryStorage()
    assert [await storage.incr("k", 0.4) for _ in range(3)] == [1, 2, 3]
    assert await storage.get("k") == 3
    assert time.time() < await storage.get_expiry("k") <= time.time() + 0.4
    for number in range(1_000):
        await storage.incr(f"once-{number}", 0.3)
    assert len(storage) == 1_001
    await asyncio.sleep(0.6)  # every window is over and a sweep is due
    assert (await storage.get("k"), await storage.get("once-1")) == (0, 0)
    assert await storage.incr("k", 0.4) == 1  # a new window
    assert len(storage) == 1  # the sweep dropped every expired key
    assert await storage.reset() == 1 and len(storage) == 0
