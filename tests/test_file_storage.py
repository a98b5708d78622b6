"""File storage specifics: symlinks refused, dead holders, replaced files, restarts, dead waiters."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from sessiongate._errors import BackendUnavailable
from sessiongate.storage import HolderState, LeaseKind
from sessiongate.storage import file as file_storage
from sessiongate.storage.file import FileRecords, FileStorage, LockPathAttack
from tests.support import wait_until
from tests.workers import settings_for, spawn, wait_for_report

pytestmark = pytest.mark.anyio


@pytest.fixture
def storage(tmp_path: Path) -> FileStorage:
    return FileStorage.from_settings(settings_for(tmp_path))


@pytest.mark.parametrize("kind", list(LeaseKind))
async def test_symlink_planted_at_the_lock_path_is_not_followed(
    storage: FileStorage, tmp_path: Path, kind: LeaseKind
) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    os.symlink(target, storage.locks_dir / f"s.{kind.value}")
    with pytest.raises(LockPathAttack):
        await storage.try_acquire(kind, "s", stale_ms=30_000)
    assert target.read_text() == "keep me"


async def test_symlinked_locks_folder_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "data").mkdir()
    os.symlink(elsewhere, tmp_path / "data" / "locks")
    with pytest.raises(LockPathAttack):
        FileStorage.from_settings(settings_for(tmp_path / "data"))
    assert list(elsewhere.iterdir()) == []


async def test_a_holder_killed_mid_hold_is_reclaimed_and_listed_as_dead(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, sessionWriteLock={"staleMs": 600_000})
    ready = tmp_path / "ready"
    holder_process = spawn("hold", settings, ready, "s")
    try:
        wait_for_report(ready, holder_process, timeout=20)
    finally:
        os.kill(holder_process.pid, signal.SIGKILL)
        holder_process.communicate(timeout=10)
    storage = FileStorage.from_settings(settings)
    holders = await storage.holders()
    assert {(h.kind, h.pid) for h in holders} == {(kind, holder_process.pid) for kind in LeaseKind}
    assert all(h.state(600_000) is HolderState.DEAD_PID for h in holders)

    lease = await storage.try_acquire(LeaseKind.LANE, "s", stale_ms=600_000)
    assert lease is not None and lease.reclaimed is HolderState.DEAD_PID and lease.holder.fence == 2
    write_holder = next(h for h in holders if h.kind is LeaseKind.WRITE)
    assert await storage.break_lease(write_holder, stale_ms=600_000)  # the operator CLI's clean
    assert not await storage.break_lease(write_holder, stale_ms=600_000)
    assert [h.kind for h in await storage.holders()] == [LeaseKind.LANE]
    await lease.release()
    assert await storage.holders() == []


async def test_a_lock_file_replaced_under_a_holder_is_noticed(storage: FileStorage) -> None:
    lease = await storage.try_acquire(LeaseKind.WRITE, "s", stale_ms=30_000)
    assert lease is not None and await lease.renew()
    path = storage.locks_dir / "s.write"
    path.unlink()
    path.write_text("")
    assert not await lease.renew()
    await lease.release()
    assert path.read_text() == ""  # the release touched only its own (unlinked) file


async def test_fences_survive_a_restart(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    for expected in (1, 2):
        storage = FileStorage.from_settings(settings)
        lease = await storage.try_acquire(LeaseKind.LANE, "s", stale_ms=30_000)
        assert lease is not None and lease.holder.fence == expected
        await lease.release()
        await storage.aclose()
    assert await FileStorage.from_settings(settings).current_fence("s") == 2


async def test_a_dead_waiter_is_skipped_in_the_queue(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, lane={"mode": "queue", "queueWaitMs": 30_000})
    storage = FileStorage.from_settings(settings)
    lease = await storage.try_acquire(LeaseKind.LANE, "q", stale_ms=30_000)
    waiter = spawn("queue", settings, "q", "w", tmp_path / "out.txt")
    queue_dir = storage.locks_dir / "q.queue"
    try:
        wait_until(lambda: queue_dir.exists() and any(n[0] != "." for n in os.listdir(queue_dir)), timeout=20)
    finally:
        os.kill(waiter.pid, signal.SIGKILL)
        waiter.communicate(timeout=10)
    ticket = await storage.enqueue("q", cap=1, stale_ms=30_000)  # the dead waiter does not count
    assert ticket is not None
    assert await storage.queue_position(ticket, stale_ms=30_000) == 0
    assert [n for n in os.listdir(queue_dir) if n[0] != "."] == [f"{int(ticket.id):016d}"]
    await storage.leave_queue(ticket)
    assert lease is not None
    await lease.release()


async def test_ids_map_to_escaped_file_names_inside_the_locks_folder(storage: FileStorage) -> None:
    lease = await storage.try_acquire(LeaseKind.LANE, ".hidden:1", stale_ms=30_000)
    assert lease is not None
    assert sorted(os.listdir(storage.locks_dir)) == ["%2Ehidden%3A1.fence", "%2Ehidden%3A1.lane"]
    await lease.release()



async def test_a_lock_path_that_cannot_be_opened_reads_as_backend_unavailable(storage: FileStorage) -> None:
    (storage.locks_dir / "s.write").mkdir()  # EISDIR, as a broken disk or mount would give an OSError
    with pytest.raises(BackendUnavailable):
        await storage.try_acquire(LeaseKind.WRITE, "s", stale_ms=30_000)


async def test_expired_records_are_swept_by_mtime_and_live_ones_kept(tmp_path: Path) -> None:
    records = FileRecords(tmp_path / "records")
    for number in range(50):
        await records.put(f"gone-{number}", {"n": number}, ttl_ms=50)
    await records.put("kept", {"n": "kept"}, ttl_ms=60_000)
    await records.finish_sweeping()
    written_before = tmp_path / "records" / "old-format.json"  # expiry in content only, mtime long past
    written_before.write_text(json.dumps({"key": "old", "expiresAt": time.time() + 60, "value": {}}))
    os.utime(written_before, (1, 1))
    orphan = tmp_path / "records" / ".tmp-crashed"
    orphan.write_text("{")
    os.utime(orphan, (1, 1))
    time.sleep(0.1)
    gone = [p for p in (tmp_path / "records").glob("*.json") if p.name not in ("old-format.json", _record_name("kept"))]
    # (the sweep the first put started may already have taken some, on a slow machine)

    assert records.sweep() == len(gone)
    assert sorted(p.name for p in (tmp_path / "records").iterdir() if not p.name.startswith(".guard-")) == sorted(
        ["old-format.json", _record_name("kept")]
    )
    assert await records.get("kept") == {"n": "kept"}


async def test_put_starts_a_background_sweep_at_most_every_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_storage, "SWEEP_INTERVAL_S", 0.2)
    records = FileRecords(tmp_path / "records")
    for number in range(20):
        await records.put(f"k{number}", {}, ttl_ms=20)
    await records.finish_sweeping()
    await asyncio.sleep(0.25)  # the records expired and a sweep is due
    await records.add("fresh", {}, ttl_ms=60_000)
    await records.finish_sweeping()
    names = [p.name for p in (tmp_path / "records").iterdir() if p.name.endswith(".json")]
    assert names == [_record_name("fresh")]


def _record_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest() + ".json"
