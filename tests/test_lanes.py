"""Lanes on every storage: reject and queue modes, bounded waits, estimates, takeover, release.

``sibling_backends`` gives two backends over one storage, as two gateway
processes have: the second knows nothing of the first's in-process state.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from sessiongate._errors import QueueFull, SessionBusy
from sessiongate._lanes import Lanes
from sessiongate.storage.memory import MemoryStorage
from tests.workers import settings_for, sibling_backends

pytestmark = pytest.mark.anyio


async def test_busy_answer_predicts_the_end_of_the_turn(tmp_path: Path, storage_url: str) -> None:
    here, elsewhere = sibling_backends(settings_for(tmp_path, storage_url))
    for backend in (here, elsewhere):  # teach both a 300 ms turn
        async with await backend.acquire_lane("warm-up"):
            await asyncio.sleep(0.3)
    grant = await here.acquire_lane("s")
    await asyncio.sleep(0.1)
    for backend in (here, elsewhere):  # in-process state, then the storage's holder record
        started = time.perf_counter()
        with pytest.raises(SessionBusy) as busy:
            await backend.acquire_lane("s")
        assert time.perf_counter() - started < 0.2  # no waiting: maxWaitMs is 0
        assert busy.value.session_id == "s"
        assert 100 <= busy.value.retry_after_ms <= 260, busy.value.retry_after_ms
    await grant.release()
    for backend in (here, elsewhere):
        await backend.aclose()


async def test_estimate_adds_one_turn_per_message_ahead() -> None:
    lanes = Lanes(MemoryStorage(), settings_for(Path("unused"), "memory://"))
    lanes.durations.observe("s", 400)
    assert lanes.estimate_retry_after_ms("s") == 400
    assert lanes.estimate_retry_after_ms("s", queue_position=2) == 1200
    assert lanes.estimate_retry_after_ms("s", elapsed_ms=1000) == 40  # overdue: a tenth, never 0
    assert lanes.estimate_retry_after_ms("other") == 400  # falls back to the overall average
    assert Lanes(MemoryStorage(), settings_for(Path("unused"), "memory://")).estimate_retry_after_ms("x") == 1000


async def test_bounded_wait_gets_the_lane_when_it_frees(tmp_path: Path, storage_url: str) -> None:
    here, elsewhere = sibling_backends(settings_for(tmp_path, storage_url))
    for waiter in (here, elsewhere):  # woken in-process, then by polling
        grant = await here.acquire_lane("s")
        asyncio.get_running_loop().call_later(0.1, lambda g=grant: asyncio.ensure_future(g.release()))
        started = time.monotonic()
        second = await waiter.acquire_lane("s", max_wait_ms=3_000)
        assert 0.09 < time.monotonic() - started < 1.5
        assert second.fence > grant.fence
        await second.release()
        with pytest.raises(SessionBusy):
            async with await here.acquire_lane("s"):
                await waiter.acquire_lane("s", max_wait_ms=150)
    for backend in (here, elsewhere):
        await backend.aclose()


async def test_release_is_idempotent_and_fences_grow(tmp_path: Path, storage_url: str) -> None:
    (backend,) = sibling_backends(settings_for(tmp_path, storage_url), 1)
    fences = []
    for _ in range(3):
        async with await backend.acquire_lane("s") as grant:
            fences.append(grant.fence)
            assert await backend.current_fence("s") == grant.fence
        await grant.release()
        assert grant.released
    assert fences == sorted(set(fences)) and fences[0] >= 1
    await backend.aclose()


async def test_queue_is_fifo_across_tasks(tmp_path: Path, storage_url: str) -> None:
    here, elsewhere = sibling_backends(settings_for(tmp_path, storage_url, lane={"mode": "queue", "queueWaitMs": 10_000}))
    order: list[int] = []

    async def turn(number: int) -> None:
        backend = (here, elsewhere)[number % 2]
        async with await backend.acquire_lane("q"):
            order.append(number)
            await asyncio.sleep(0.02)

    holder = await here.acquire_lane("q")
    tasks = []
    for number in range(6):
        tasks.append(asyncio.create_task(turn(number)))
        await asyncio.sleep(0.03)  # arrival order = number
    stale_ms = here.settings.session_write_lock.stale_ms
    for _ in range(100):  # bounded: the last arrival may still be on its way into the queue
        if await elsewhere.storage.queue_length("q", stale_ms=stale_ms) == 6:
            break
        await asyncio.sleep(0.02)
    assert await elsewhere.storage.queue_length("q", stale_ms=stale_ms) == 6  # what `locks inspect` shows
    await holder.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    assert order == list(range(6))
    assert await elsewhere.storage.queue_length("q", stale_ms=stale_ms) == 0
    for backend in (here, elsewhere):
        await backend.aclose()


async def test_queue_full_and_queue_timeout(tmp_path: Path, storage_url: str) -> None:
    settings = settings_for(tmp_path, storage_url, lane={"mode": "queue", "queueCap": 2, "queueWaitMs": 300})
    here, elsewhere = sibling_backends(settings)
    holder = await here.acquire_lane("q")
    waiters = [asyncio.create_task(backend.acquire_lane("q")) for backend in (here, elsewhere)]
    await asyncio.sleep(0.1)
    with pytest.raises(QueueFull) as full:
        await elsewhere.acquire_lane("q")
    assert full.value.queue_cap == 2 and full.value.retry_after_ms >= 1
    started = time.monotonic()
    for waiter in waiters:
        with pytest.raises(SessionBusy) as busy:
            await waiter
        assert busy.value.retry_after_ms >= 1
    assert time.monotonic() - started < 1.0  # both gave up at queueWaitMs
    async with await elsewhere.acquire_lane("other"):
        pass  # other sessions are not affected
    await holder.release()
    async with await elsewhere.acquire_lane("q"):
        pass  # the timed-out waiters left the queue: a newcomer is served at once
    for backend in (here, elsewhere):
        await backend.aclose()


async def test_stalled_holder_loses_its_grant_to_a_takeover(tmp_path: Path, storage_url: str) -> None:
    settings = settings_for(tmp_path, storage_url, sessionWriteLock={"staleMs": 300})
    here, elsewhere = sibling_backends(settings)
    stalled = await here.acquire_lane("s")
    time.sleep(0.45)  # the event loop stalls: no heartbeat
    taker = await elsewhere.acquire_lane("s")
    assert taker.fence > stalled.fence
    await asyncio.sleep(0.25)  # the stalled grant's next heartbeat finds the lease gone
    assert stalled.lost and not taker.lost
    await stalled.release()  # must not release the taker's lease
    with pytest.raises(SessionBusy):
        await here.acquire_lane("s")
    await taker.release()
    for backend in (here, elsewhere):
        await backend.aclose()


async def test_heartbeat_keeps_a_long_turn(tmp_path: Path, storage_url: str) -> None:
    settings = settings_for(tmp_path, storage_url, sessionWriteLock={"staleMs": 400})
    here, elsewhere = sibling_backends(settings)
    async with await here.acquire_lane("s") as grant:
        await asyncio.sleep(1.0)  # two and a half times staleMs, the heartbeat running
        with pytest.raises(SessionBusy):
            await elsewhere.acquire_lane("s")
        assert not grant.lost
    for backend in (here, elsewhere):
        await backend.aclose()


async def test_one_heartbeat_timer_keeps_every_lane_of_a_process(tmp_path: Path, storage_url: str) -> None:
    settings = settings_for(tmp_path, storage_url, sessionWriteLock={"staleMs": 300})
    here, elsewhere = sibling_backends(settings)
    kept = []
    for session in ("a", "b", "c"):  # granted at different points between two beats
        kept.append(await here.acquire_lane(session))
        await asyncio.sleep(0.04)
    released = await here.acquire_lane("d")
    await released.release()
    for _ in range(2):
        await asyncio.sleep(0.45)  # one and a half staleMs: only heartbeats keep the leases
        for grant in kept:
            with pytest.raises(SessionBusy):
                await elsewhere.acquire_lane(grant.session_id)
        await kept.pop().release()  # the others keep beating
    assert not any(grant.lost for grant in [*kept, released])
    await kept[0].release()
    async with await elsewhere.acquire_lane("d"):
        pass  # a released lane is free, and nothing renews it
    for backend in (here, elsewhere):
        await backend.aclose()
