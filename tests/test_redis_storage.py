"""The LeaseStorage contract on a real Redis: leases, token safety, fencing, reclaim, queues, records, outages.

Every test talks to the local Redis (the run's own database, via the ``redis_url`` fixture) and
fails when it is down. Holders in other processes are real processes: one is
killed with SIGKILL to leave a dead holder behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest
import redis

from sessiongate import Settings
from sessiongate._errors import BackendUnavailable
from sessiongate.storage import Holder, HolderState, LeaseKind, encode_holder
from sessiongate.storage.base import holder_head
from sessiongate.storage.redis import RedisStorage
from tests.support import REPO_ROOT, free_port

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

LANE, WRITE = LeaseKind.LANE, LeaseKind.WRITE
LONG_MS = 30_000


def open_storage(url: str) -> RedisStorage:
    return RedisStorage.from_settings(Settings.load(env={}, overrides={"backend": {"url": url, "keyPrefix": "sgtest"}}))


@pytest.fixture
async def storage(redis_url: str) -> AsyncIterator[RedisStorage]:
    store = open_storage(redis_url)
    yield store
    await store.aclose()


@pytest.fixture
async def other(redis_url: str) -> AsyncIterator[RedisStorage]:
    """A second storage with its own connection pool: another gateway instance."""
    store = open_storage(redis_url)
    yield store
    await store.aclose()


HOLDER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from sessiongate import Settings
    from sessiongate.storage import LeaseKind
    from sessiongate.storage.redis import RedisStorage

    async def main():
        storage = RedisStorage.from_settings(Settings.load(
            env={}, overrides={"backend": {"url": sys.argv[1], "keyPrefix": "sgtest"}}))
        lease = await storage.try_acquire(LeaseKind(sys.argv[2]), sys.argv[3], stale_ms=int(sys.argv[4]))
        print(lease.holder.fence, flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


@pytest.fixture
def holder_process(redis_url: str) -> Iterator:
    """Start a real process that takes a lease and holds it (without heartbeat) until killed."""
    started: list[subprocess.Popen[str]] = []

    def start(kind: LeaseKind, session_id: str, stale_ms: int = LONG_MS) -> tuple[subprocess.Popen[str], int]:
        process = subprocess.Popen(
            [sys.executable, "-c", HOLDER_SCRIPT, redis_url, kind.value, session_id, str(stale_ms)],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
        )
        started.append(process)
        fence = int(process.stdout.readline())  # the lease is held once it printed its fence
        return process, fence

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        process.stdout.close()


def kill_and_reap(process: subprocess.Popen[str]) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


# leases and token safety


async def test_one_holder_at_a_time_across_instances(storage: RedisStorage, other: RedisStorage) -> None:
    first = await storage.try_acquire(LANE, "s1", stale_ms=LONG_MS)
    assert first is not None
    assert await other.try_acquire(LANE, "s1", stale_ms=LONG_MS) is None
    assert await storage.try_acquire(LANE, "s1", stale_ms=LONG_MS) is None  # not re-entrant either
    assert await other.try_acquire(WRITE, "s1", stale_ms=LONG_MS) is not None  # the write lock is separate
    assert await other.try_acquire(LANE, "s2", stale_ms=LONG_MS) is not None  # so is another session
    await first.release()
    assert await other.try_acquire(LANE, "s1", stale_ms=LONG_MS) is not None


async def test_concurrent_claims_from_two_instances_have_exactly_one_winner(
    storage: RedisStorage, other: RedisStorage
) -> None:
    claims = [store.try_acquire(LANE, "race", stale_ms=LONG_MS) for store in (storage, other) for _ in range(10)]
    winners = [lease for lease in await asyncio.gather(*claims) if lease is not None]
    assert len(winners) == 1


async def test_a_lost_lease_neither_renews_nor_releases_its_successor(storage: RedisStorage, other: RedisStorage) -> None:
    old = await storage.try_acquire(LANE, "s1", stale_ms=200)
    assert old is not None
    await asyncio.sleep(0.3)  # silent past staleMs: the TTL ends it
    new = await other.try_acquire(LANE, "s1", stale_ms=LONG_MS)
    assert new is not None and new.reclaimed is None
    assert new.holder.fence > old.holder.fence
    assert await old.renew() is False
    await old.release()  # must not delete the successor's lease
    holder = await storage.holder(LANE, "s1")
    assert holder is not None and holder.fence == new.holder.fence
    assert await new.renew() is True


async def test_renew_keeps_a_lease_alive_past_stale_ms_and_records_the_heartbeat(
    storage: RedisStorage, other: RedisStorage
) -> None:
    lease = await storage.try_acquire(WRITE, "s1", stale_ms=300)
    assert lease is not None
    for _ in range(4):
        await asyncio.sleep(0.1)
        assert await lease.renew() is True
    assert await other.try_acquire(WRITE, "s1", stale_ms=300) is None
    seen = await other.holder(WRITE, "s1")
    assert seen is not None and seen.heartbeat_at > seen.since
    assert seen.state(300) is HolderState.LIVE


async def test_each_acquisition_is_a_new_lease_with_its_own_token(storage: RedisStorage) -> None:
    first = await storage.try_acquire(LANE, "s1", stale_ms=LONG_MS)
    await first.release()
    second = await storage.try_acquire(LANE, "s1", stale_ms=LONG_MS)
    assert second is not first
    await first.release()  # a stale handle of the same process cannot release the new one
    assert await storage.holder(LANE, "s1") is not None
    assert await second.renew() is True


# fencing


async def test_fences_grow_with_every_lane_grant_and_only_lanes_issue_them(storage: RedisStorage) -> None:
    assert await storage.current_fence("s1") == 0
    fences = []
    for _ in range(5):
        lease = await storage.try_acquire(LANE, "s1", stale_ms=LONG_MS)
        fences.append(lease.holder.fence)
        assert await storage.current_fence("s1") == lease.holder.fence
        await lease.release()
    assert fences == sorted(set(fences))
    write = await storage.try_acquire(WRITE, "s1", stale_ms=LONG_MS)
    assert write.holder.fence == 0
    assert await storage.current_fence("s1") == fences[-1]


async def test_fences_stay_ahead_after_redis_lost_its_data(storage: RedisStorage, redis_url: str) -> None:
    before = await storage.try_acquire(LANE, "s1", stale_ms=LONG_MS)
    client = redis.Redis.from_url(redis_url)
    client.flushdb()  # what a restart without persistence does
    client.close()
    after = await storage.try_acquire(LANE, "s1", stale_ms=LONG_MS)
    assert after is not None and after.holder.fence > before.holder.fence
    assert await before.renew() is False


async def test_scripts_are_reloaded_after_redis_forgot_them(storage: RedisStorage, redis_url: str) -> None:
    assert await storage.try_acquire(LANE, "s1", stale_ms=LONG_MS) is not None
    client = redis.Redis.from_url(redis_url)
    client.script_flush()  # a restarted Redis has no scripts: EVALSHA answers NOSCRIPT
    client.close()
    lease = await storage.try_acquire(LANE, "s2", stale_ms=LONG_MS)
    assert lease is not None and await lease.renew() is True


async def test_a_retried_acquire_whose_reply_was_lost_finds_its_own_lease(storage: RedisStorage) -> None:
    keys = [storage.keys.lease(LANE, "s1"), storage.keys.fence("s1")]
    holder = Holder.for_this_process("s1", LANE)
    args = ["token-1", holder_head(holder), LONG_MS, "", "1"]
    first = await storage._run(storage._acquire, keys=keys, args=args)
    assert await storage._run(storage._acquire, keys=keys, args=args) == first
    refused = await storage._run(storage._acquire, keys=keys, args=["token-2", *args[1:]])
    assert refused == f"token-1 {encode_holder(replace(holder, fence=first))}"  # the holder's value, for judging it


# takeover of dead and silent holders


async def test_a_killed_holder_on_this_host_is_reclaimed_at_once(storage: RedisStorage, holder_process) -> None:
    process, dead_fence = holder_process(LANE, "s1")
    assert await storage.try_acquire(LANE, "s1", stale_ms=LONG_MS) is None  # alive: kept
    kill_and_reap(process)
    seen = await storage.holder(LANE, "s1")
    assert seen is not None and seen.pid == process.pid and seen.state(LONG_MS) is HolderState.DEAD_PID
    lease = await storage.try_acquire(LANE, "s1", stale_ms=LONG_MS)  # long before its TTL
    assert lease is not None
    assert lease.reclaimed is HolderState.DEAD_PID
    assert lease.holder.fence > dead_fence
    assert await storage.current_fence("s1") == lease.holder.fence


async def test_a_holder_on_another_host_waits_for_its_ttl(storage: RedisStorage) -> None:
    elsewhere = Holder(
        session_id="s1", kind=LANE, pid=2**22 + 7, host="another-host", process_started_at=None,
        since=time.time(), heartbeat_at=time.time(), fence=0,
    )
    await storage.client.set(storage.keys.lease(LANE, "s1"), f"tok {encode_holder(elsewhere)}", px=300)
    assert await storage.try_acquire(LANE, "s1", stale_ms=300) is None  # its pid means nothing here
    await asyncio.sleep(0.35)
    lease = await storage.try_acquire(LANE, "s1", stale_ms=300)
    assert lease is not None and lease.reclaimed is None


# operator view and breaking


async def test_holders_lists_every_lease_and_break_removes_only_dead_ones(
    storage: RedisStorage, holder_process
) -> None:
    live_process, _ = holder_process(LANE, "live")
    dead_process, _ = holder_process(WRITE, "dead")
    kill_and_reap(dead_process)
    mine = await storage.try_acquire(LANE, "mine", stale_ms=LONG_MS)
    by_session = {h.session_id: h for h in await storage.holders()}
    assert set(by_session) == {"live", "dead", "mine"}
    assert by_session["dead"].state(LONG_MS) is HolderState.DEAD_PID
    assert by_session["live"].pid == live_process.pid
    assert await storage.break_lease(by_session["live"], stale_ms=LONG_MS) is False
    assert await storage.break_lease(by_session["mine"], stale_ms=LONG_MS) is False
    assert await storage.break_lease(by_session["dead"], stale_ms=LONG_MS) is True
    assert await storage.holder(WRITE, "dead") is None
    assert await mine.renew() is True


async def test_break_spares_a_holder_that_renewed_since_it_was_judged(storage: RedisStorage) -> None:
    lease = await storage.try_acquire(LANE, "s1", stale_ms=LONG_MS)
    judged = await storage.holder(LANE, "s1")
    await asyncio.sleep(0.01)
    assert await lease.renew() is True
    assert await storage.break_lease(judged, stale_ms=1) is False  # stale by a 1 ms yardstick, but renewed
    assert await storage.holder(LANE, "s1") is not None


# queue


async def test_queue_keeps_arrival_order_across_instances_and_refuses_past_cap(
    storage: RedisStorage, other: RedisStorage
) -> None:
    tickets = []
    for store in (storage, other, storage):
        ticket = await store.enqueue("s1", cap=3, stale_ms=LONG_MS)
        assert ticket is not None
        tickets.append(ticket)
    assert [await other.queue_position(t, stale_ms=LONG_MS) for t in tickets] == [0, 1, 2]
    assert await other.enqueue("s1", cap=3, stale_ms=LONG_MS) is None
    assert await other.enqueue("s2", cap=3, stale_ms=LONG_MS) is not None  # queues are per session
    await storage.leave_queue(tickets[0])
    assert [await storage.queue_position(t, stale_ms=LONG_MS) for t in tickets[1:]] == [0, 1]
    assert await other.enqueue("s1", cap=3, stale_ms=LONG_MS) is not None


async def test_dead_waiters_are_skipped_and_free_their_place(storage: RedisStorage, other: RedisStorage) -> None:
    dead = await other.enqueue("s1", cap=2, stale_ms=200)  # never renewed
    live = await storage.enqueue("s1", cap=2, stale_ms=LONG_MS)
    assert await storage.queue_position(live, stale_ms=LONG_MS) == 1
    await asyncio.sleep(0.3)
    await storage.renew_ticket(live)
    assert await storage.queue_position(live, stale_ms=LONG_MS) == 0
    assert await other.enqueue("s1", cap=2, stale_ms=LONG_MS) is not None  # the dead one no longer counts
    assert dead is not None


async def test_renewed_ticket_outlives_its_ttl(storage: RedisStorage, other: RedisStorage) -> None:
    first = await storage.enqueue("s1", cap=5, stale_ms=200)
    second = await other.enqueue("s1", cap=5, stale_ms=LONG_MS)
    for _ in range(4):
        await asyncio.sleep(0.1)
        await storage.renew_ticket(first)
    assert await other.queue_position(second, stale_ms=LONG_MS) == 1
    assert await storage.queue_position(first, stale_ms=200) == 0


# records


async def test_records_add_put_get_delete_and_expire(storage: RedisStorage, other: RedisStorage) -> None:
    assert await storage.records.add("idem:k", {"state": "in-flight"}, ttl_ms=LONG_MS) is True
    assert await other.records.add("idem:k", {"state": "other"}, ttl_ms=LONG_MS) is False
    assert await other.records.get("idem:k") == {"state": "in-flight"}
    await other.records.put("idem:k", {"state": "done", "reply": {"text": "hi"}}, ttl_ms=LONG_MS)
    assert await storage.records.get("idem:k") == {"state": "done", "reply": {"text": "hi"}}
    await storage.records.delete("idem:k")
    assert await other.records.get("idem:k") is None
    assert await storage.records.add("short", {"n": 1}, ttl_ms=100) is True
    await asyncio.sleep(0.15)
    assert await storage.records.get("short") is None
    assert await other.records.add("short", {"n": 2}, ttl_ms=LONG_MS) is True


# outages


async def test_an_unreachable_redis_is_backend_unavailable_for_every_operation() -> None:
    storage = open_storage(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    started = time.monotonic()
    operations = [
        storage.ping(),
        storage.try_acquire(LANE, "s1", stale_ms=LONG_MS),
        storage.current_fence("s1"),
        storage.holders(),
        storage.enqueue("s1", cap=1, stale_ms=LONG_MS),
        storage.records.add("k", {}, ttl_ms=LONG_MS),
        storage.records.get("k"),
    ]
    for operation in operations:
        with pytest.raises(BackendUnavailable) as caught:
            await operation
        assert caught.value.retry_after_ms >= 1000
        assert "127.0.0.1" not in caught.value.detail  # no internal address in client answers
    assert time.monotonic() - started < 5  # detected fast, not after seconds of backoff per call
    await storage.aclose()
