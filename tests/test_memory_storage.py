"""The storage contract, run on the memory storage and (for comparison) the file storage.

Records with a time to live, queue tickets, fences, holders and break_lease:
what the strategies and the operator CLI rely on from any storage.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from sessiongate.storage import HolderState, LeaseKind, LeaseStorage, memory, open_storage
from sessiongate.storage.memory import MemoryRecords
from tests.workers import settings_for

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory://", "file://"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> LeaseStorage:
    return open_storage(settings_for(tmp_path, request.param))


async def test_records_add_get_put_delete_expire(storage: LeaseStorage) -> None:
    records = storage.records
    assert await records.add("k", {"n": 1}, ttl_ms=200)
    assert not await records.add("k", {"n": 2}, ttl_ms=200)
    assert await records.get("k") == {"n": 1}
    await records.put("k", {"n": 3}, ttl_ms=200)
    assert await records.get("k") == {"n": 3}
    await asyncio.sleep(0.25)
    assert await records.get("k") is None
    assert await records.add("k", {"n": 4}, ttl_ms=10_000)  # expired counts as absent
    await records.delete("k")
    await records.delete("k")
    assert await records.get("k") is None


async def test_records_are_copies(storage: LeaseStorage) -> None:
    value = {"list": [1]}
    await storage.records.put("k", value, ttl_ms=10_000)
    value["list"].append(2)
    got = await storage.records.get("k")
    assert got == {"list": [1]}
    got["list"].append(3)
    assert await storage.records.get("k") == {"list": [1]}


async def test_concurrent_adds_store_once(storage: LeaseStorage) -> None:
    results = await asyncio.gather(*(storage.records.add("once", {"n": n}, ttl_ms=10_000) for n in range(10)))
    assert results.count(True) == 1


async def test_tickets_are_fifo_capped_and_skip_stale_waiters(storage: LeaseStorage) -> None:
    tickets = [await storage.enqueue("s", cap=3, stale_ms=300) for _ in range(3)]
    assert all(tickets)
    assert await storage.enqueue("s", cap=3, stale_ms=300) is None
    assert [await storage.queue_position(t, stale_ms=300) for t in tickets] == [0, 1, 2]
    assert await storage.queue_length("s", stale_ms=300) == 3
    await storage.leave_queue(tickets[0])
    assert await storage.queue_position(tickets[2], stale_ms=300) == 1
    await asyncio.sleep(0.35)
    await storage.renew_ticket(tickets[2])  # tickets[1] stays silent: stale, skipped
    assert await storage.queue_position(tickets[2], stale_ms=300) == 0
    assert await storage.queue_length("s", stale_ms=300) == 1
    for ticket in tickets[1:]:
        await storage.leave_queue(ticket)
    await storage.aclose()


async def test_lane_fences_grow_write_leases_have_none(storage: LeaseStorage) -> None:
    assert await storage.current_fence("s") == 0
    for expected in (1, 2):
        lease = await storage.try_acquire(LeaseKind.LANE, "s", stale_ms=30_000)
        assert lease is not None and lease.holder.fence == expected
        assert await storage.try_acquire(LeaseKind.LANE, "s", stale_ms=30_000) is None
        await lease.release()
    write = await storage.try_acquire(LeaseKind.WRITE, "s", stale_ms=30_000)
    assert write is not None and write.holder.fence == 0
    assert await storage.current_fence("s") == 2
    await write.release()


async def test_holders_and_break_lease_of_a_stale_holder(storage: LeaseStorage) -> None:
    lease = await storage.try_acquire(LeaseKind.LANE, "s", stale_ms=30_000)
    assert lease is not None
    (holder,) = await storage.holders()
    assert (holder.session_id, holder.kind, holder.fence) == ("s", LeaseKind.LANE, 1)
    assert holder.state(30_000) is HolderState.LIVE
    assert not await storage.break_lease(holder, stale_ms=30_000)  # live: refused
    time.sleep(0.15)
    assert await storage.break_lease(holder, stale_ms=100)
    assert not await storage.break_lease(holder, stale_ms=100)  # already gone
    assert not await lease.renew()
    taker = await storage.try_acquire(LeaseKind.LANE, "s", stale_ms=30_000)
    assert taker is not None and taker.holder.fence == 2
    await lease.release()  # the broken holder's release leaves the taker alone
    assert await storage.try_acquire(LeaseKind.LANE, "s", stale_ms=30_000) is None
    await taker.release()


async def test_memory_records_nobody_reads_again_are_swept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "SWEEP_INTERVAL_S", 0.5)  # the first put sweeps; the next is due in 0.5 s
    records = MemoryRecords()
    for number in range(1_000):
        await records.put(f"once-{number}", {"n": number}, ttl_ms=300)
    assert len(records) == 1_000
    await asyncio.sleep(0.6)
    await records.put("fresh", {}, ttl_ms=60_000)
    assert len(records) == 1
    assert await records.get("fresh") == {}
