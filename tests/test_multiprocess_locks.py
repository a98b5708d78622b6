"""The file storage's guarantees across real, separate processes (kill -9, SIGSTOP, races).

Every worker is ``python -m tests.workers.locker`` in its own interpreter; no
OS call is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from sessiongate._backend import open_backend
from sessiongate._errors import SessionBusy
from sessiongate._store import FileTranscriptStore
from sessiongate.storage import HolderState, LeaseKind
from tests.support import wait_until
from tests.workers import publish, settings_for, spawn, wait_for_report

pytestmark = pytest.mark.anyio


def _finish(process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr.decode()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGCONT)
        process.kill()
    process.communicate(timeout=10)


async def test_four_processes_appending_never_overlap_and_lose_nothing(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, transcript={"fsync": "never"}, sessionWriteLock={"timeoutMs": 60_000})
    per_process, logs = 2_500, [tmp_path / f"spans-{n}.json" for n in range(4)]
    workers = [spawn("appender", settings, "shared", per_process, log) for log in logs]
    for worker in workers:
        _finish(worker, timeout=150)

    spans = sorted(tuple(span) for log in logs for span in json.loads(log.read_text()))
    assert len(spans) == 4 * per_process
    overlaps = [(a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]
    assert not overlaps, f"{len(overlaps)} overlapping holds, first {overlaps[0]}"

    lines = (tmp_path / "sessions" / "shared.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""
    records = [json.loads(line) for line in lines[:-1]]  # raises on a corrupt line
    seen = Counter((record["pid"], record["seq"]) for record in records)
    assert len(records) == 4 * per_process and max(seen.values()) == 1
    assert {seq for (_, seq) in seen} == set(range(per_process))
    assert len({pid for (pid, _) in seen}) == 4


async def test_kill_9_of_a_holder_frees_the_session_at_once(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, sessionWriteLock={"staleMs": 600_000, "timeoutMs": 5_000})
    ready = tmp_path / "ready"
    holder = spawn("hold", settings, ready, "s1")
    try:
        wait_for_report(ready, holder, timeout=20)
        backend = open_backend(settings)
        with pytest.raises(SessionBusy):
            await backend.acquire_lane("s1")
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        killed_at = time.monotonic()
        grant = await backend.acquire_lane("s1", max_wait_ms=5_000)
        async with backend.write_lock("s1"):
            delay = time.monotonic() - killed_at
        assert delay < 5, f"took {delay:.2f} s with staleMs at 10 minutes"
        assert grant.fence == 2
        await grant.release()
        await backend.aclose()
    finally:
        _stop(holder)


async def test_sigstopped_holder_loses_the_lane_after_stale_ms_and_is_fenced_out(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, sessionWriteLock={"staleMs": 1_000, "timeoutMs": 5_000})
    ready, go, result = tmp_path / "ready", tmp_path / "go", tmp_path / "result.json"
    worker = spawn("fenced", settings, "s1", ready, go, result)
    try:
        wait_for_report(ready, worker, timeout=20)
        os.kill(worker.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        backend = open_backend(settings)
        store = FileTranscriptStore(backend, settings)
        grant = await backend.acquire_lane("s1", max_wait_ms=10_000)
        waited = time.monotonic() - stopped_at
        assert 0.6 < waited < 5, waited  # the old heartbeat (<= staleMs/3 old) plus staleMs
        assert grant.fence > int(ready.read_text())
        await store.append("s1", [{"role": "user", "text": "takeover"}], fence=grant.fence)

        os.kill(worker.pid, signal.SIGCONT)
        publish(go, "go")
        _finish(worker, timeout=20)
        outcome = json.loads(result.read_text())
        assert outcome == {"outcome": "fenced", "lost": True, "fence": int(ready.read_text())}
        texts = [record["text"] for record in await store.read("s1")]
        assert texts == ["before", "takeover"]
        await grant.release()
        await backend.aclose()
    finally:
        _stop(worker)


async def test_two_processes_racing_to_break_a_stale_lock_one_wins(tmp_path: Path) -> None:
    # staleMs is also how long a won lease stays unbreakable (racers do not renew): room for a slow racer
    settings = settings_for(tmp_path, sessionWriteLock={"staleMs": 1_000})
    sessions = [f"r{n}" for n in range(8)]
    ready = tmp_path / "ready"
    holder = spawn("hold", settings, ready, *sessions)
    racers = []
    try:
        wait_for_report(ready, holder, timeout=20)
        os.kill(holder.pid, signal.SIGSTOP)
        time.sleep(1.2)  # its leases go stale
        go = tmp_path / "go"
        results = [tmp_path / f"race-{n}.json" for n in range(2)]
        racers = [spawn("race", settings, go, result, *sessions) for result in results]
        for result, racer in zip(results, racers):
            wait_for_report(f"{result}.ready", racer)
        publish(go, str(time.time() + 0.3))
        for result, racer in zip(results, racers):
            wait_for_report(result, racer)
        for result in results:  # both have tried: now they may give their wins back
            publish(f"{result}.done", "done")
        for racer in racers:
            _finish(racer, timeout=30)
        outcomes = [json.loads(result.read_text()) for result in results]
        for session_id in sessions:
            winners = [outcome[session_id] for outcome in outcomes if outcome[session_id] is not None]
            assert len(winners) == 1, (session_id, outcomes)
            fence, reclaimed = winners[0]
            assert fence == 2  # the frozen holder had 1: the winner's grant supersedes it
            assert reclaimed in (HolderState.STALE.value, None)  # None: it came in right after the other broke it
    finally:
        for racer in racers:
            _stop(racer)
        _stop(holder)


async def test_queue_order_holds_across_processes(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, lane={"mode": "queue", "queueWaitMs": 30_000})
    backend = open_backend(settings)
    out = tmp_path / "order.txt"
    grant = await backend.acquire_lane("q")
    queue_dir = tmp_path / "locks" / "q.queue"
    workers = []
    try:
        for number in range(4):
            workers.append(spawn("queue", settings, "q", f"w{number}", out))
            wait_until(
                lambda count=number + 1: queue_dir.exists()
                and len([n for n in os.listdir(queue_dir) if n[0] != "."]) == count,
                timeout=20,
                what=f"worker {number} queued",
            )
        assert await backend.storage.holder(LeaseKind.LANE, "q") is not None
        await grant.release()
        for worker in workers:
            _finish(worker, timeout=30)
        assert out.read_text().split() == ["w0", "w1", "w2", "w3"]
    finally:
        for worker in workers:
            _stop(worker)
        await backend.aclose()
