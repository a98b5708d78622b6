"""A worker process for the cross-process lock tests: ``python -m tests.workers.locker ROLE CONFIG ...``.

``CONFIG`` is the JSON of the test's settings. Each role does one thing a
gateway process does with the session layer and reports through files, so
the test can signal it (kill -9, SIGSTOP, SIGCONT) in between.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

from sessiongate import Settings
from sessiongate._backend import open_backend
from sessiongate._errors import FencedOut
from sessiongate._store import FileTranscriptStore
from sessiongate.storage import LeaseKind
from tests.workers import publish


async def _wait_for_file(path: Path) -> None:
    while not path.exists():
        await asyncio.sleep(0.01)


async def appender(settings: Settings, session_id: str, count: str, log_path: str) -> None:
    """``count`` locked appends; logs each hold's (start, end) in monotonic ns."""
    backend = open_backend(settings)
    store = FileTranscriptStore(backend, settings)
    spans = []
    for seq in range(int(count)):
        async with store.locked(session_id) as transcript:
            start = time.monotonic_ns()
            await transcript.append([{"role": "user", "text": "x", "pid": os.getpid(), "seq": seq}])
            spans.append((start, time.monotonic_ns()))
    publish(log_path, json.dumps(spans))
    await backend.aclose()


async def hold(settings: Settings, ready_path: str, *session_ids: str) -> None:
    """Hold the lane and the write lock of every session, say so, then sleep (to be killed or stopped)."""
    backend = open_backend(settings)
    async with AsyncExitStack() as stack:
        for session_id in session_ids:
            grant = await backend.acquire_lane(session_id)
            stack.push_async_callback(grant.release)
            await stack.enter_async_context(backend.write_lock(session_id))
        publish(ready_path, str(os.getpid()))
        await asyncio.sleep(600)


async def fenced(settings: Settings, session_id: str, ready_path: str, go_path: str, result_path: str) -> None:
    """Take the lane, append, say so; when told to go on, append again with the same fence."""
    backend = open_backend(settings)
    store = FileTranscriptStore(backend, settings)
    grant = await backend.acquire_lane(session_id)
    await store.append(session_id, [{"role": "user", "text": "before", "pid": os.getpid()}], fence=grant.fence)
    publish(ready_path, str(grant.fence))
    await _wait_for_file(Path(go_path))
    await asyncio.sleep(0.1)  # let the overdue heartbeat run
    try:
        await store.append(session_id, [{"role": "user", "text": "after", "pid": os.getpid()}], fence=grant.fence)
        outcome = "appended"
    except FencedOut:
        outcome = "fenced"
    publish(result_path, json.dumps({"outcome": outcome, "lost": grant.lost, "fence": grant.fence}))
    await grant.release()
    await backend.aclose()


async def race(settings: Settings, go_path: str, result_path: str, *session_ids: str) -> None:
    """At the wall time written to ``go_path``, one attempt at each session's (stale) lane; report the wins.

    What was won is held until ``<result_path>.done`` appears, so a slow
    racer cannot find the other's wins given back.
    """
    backend = open_backend(settings)
    stale_ms = settings.session_write_lock.stale_ms
    publish(f"{result_path}.ready", "ready")
    await _wait_for_file(Path(go_path))
    start_at = float(Path(go_path).read_text())
    await asyncio.sleep(max(0.0, start_at - time.time() - 0.05))
    while time.time() < start_at:
        pass  # spin the last moment so both racers start together
    won = {}
    for session_id in session_ids:
        lease = await backend.storage.try_acquire(LeaseKind.LANE, session_id, stale_ms=stale_ms)
        won[session_id] = None if lease is None else (lease.holder.fence, getattr(lease.reclaimed, "value", None))
    publish(result_path, json.dumps(won))
    await asyncio.wait_for(_wait_for_file(Path(f"{result_path}.done")), 60)


async def queue(settings: Settings, session_id: str, name: str, out_path: str) -> None:
    """Wait in the session's queue; once granted, record ``name`` and hold the lane briefly."""
    backend = open_backend(settings)
    async with await backend.acquire_lane(session_id):
        with open(out_path, "a") as out:
            out.write(f"{name}\n")
        await asyncio.sleep(0.05)
    await backend.aclose()


ROLES = {"appender": appender, "hold": hold, "fenced": fenced, "race": race, "queue": queue}

if __name__ == "__main__":
    role, config, *rest = sys.argv[1:]
    asyncio.run(ROLES[role](Settings.model_validate(json.loads(config)), *rest))
