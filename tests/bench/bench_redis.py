"""Redis backend throughput against redis-py's own asyncio ``Lock``, measured side by side.

What it answers: does the Redis backend (leases with holder records, fencing
tokens, heartbeats, takeover checks) cost more than the plain lock a
developer would otherwise reach for? Both sides run in the same process,
against the same Redis, with the same concurrency (one task per session, all
sessions at once), in back-to-back pairs whose order alternates by round; the
reported ratio is the median of the per-round ratios, so the noise of a shared
machine (other processes come and go) hits both sides alike. The raw side makes a
new ``redis.asyncio.lock.Lock`` per acquisition (the safe way to use it from
many tasks).

- lane: ``Backend.acquire_lane`` + ``LaneGrant.release`` vs ``Lock.acquire(blocking=False)`` + ``release``.
- write-locked append: ``Backend.write_lock`` around one ``O_APPEND`` JSONL line vs
  ``Lock`` around the same write: the cost of the lock itself.
- ``TranscriptStore.append`` with the fence check, end to end (record ids and times,
  torn-tail check, path checks, one more round trip for the fence), against the same
  raw baseline: shown for what a turn's append really costs, no goal.

Goal: within 1.5× of raw (ratio = raw ops/s ÷ ours, so 1.0 is parity).
Run: ``.venv/bin/python -m tests.bench.bench_redis`` (needs Redis at 127.0.0.1:6379; db 14 is flushed).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.lock import Lock

from sessiongate import FileTranscriptStore, Settings, open_backend
from tests.support import REDIS_SERVER

BENCH_REDIS_URL = REDIS_SERVER + "/14"  # a database no test run reserves (see tests/conftest.py)

GOAL_RATIO = 1.5
SESSIONS = 8
STALE_MS = 30_000
RECORD = {"role": "user", "text": "hello"}
INFORMATIONAL = {"TranscriptStore.append with fence check"}

Operation = Callable[[str], Awaitable[None]]


async def _ops_per_second(operation: Operation, seconds: float, tag: str) -> float:
    """Every session runs ``operation`` back to back for ``seconds``; total operations per second."""
    deadline = time.monotonic() + seconds
    counts = [0] * SESSIONS

    async def loop(index: int) -> None:
        session_id = f"bench-{tag}-{index}"
        while time.monotonic() < deadline:
            await operation(session_id)
            counts[index] += 1

    started = time.monotonic()
    await asyncio.gather(*(loop(i) for i in range(SESSIONS)))
    return sum(counts) / (time.monotonic() - started)


async def ops_pair(ours: Operation, raw: Operation, seconds: float, tag: str, round_number: int) -> tuple[float, float]:
    """(ours, raw) ops/s measured back to back; which goes first alternates with ``round_number``."""
    if round_number % 2:
        ours_rate = await _ops_per_second(ours, seconds, tag)
        return ours_rate, await _ops_per_second(raw, seconds, tag)
    raw_rate = await _ops_per_second(raw, seconds, tag)
    return await _ops_per_second(ours, seconds, tag), raw_rate


def ratio_row(name: str, measured: list[tuple[float, float]], baseline: str, goal_ratio: float | None) -> dict:
    """A table row from (ours, raw) ops/s pairs: medians, and the median per-pair ratio raw ÷ ours."""
    ratio = statistics.median(raw / ours for ours, raw in measured)
    return {
        "name": f"redis {name} ({SESSIONS} sessions at once)",
        "value": round(statistics.median(ours for ours, _ in measured)),
        "unit": "ops/s",
        "baseline": baseline,
        "baseline_value": round(statistics.median(raw for _, raw in measured)),
        "ratio": round(ratio, 2),
        "goal": None if goal_ratio is None else f"≤ {goal_ratio}× raw",
        "met": None if goal_ratio is None else ratio <= goal_ratio,
    }


def _append_line(path: Path, record: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, json.dumps(record, separators=(",", ":")).encode() + b"\n")
    finally:
        os.close(fd)


async def _measure(seconds: float, rounds: int, data_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """(ours, raw) ops/s per scenario and round; the order within a pair alternates by round."""
    settings = Settings.load(env={}, overrides={
        "dataDir": str(data_dir), "backend": {"url": BENCH_REDIS_URL, "keyPrefix": "sgbench"},
        "sessionWriteLock": {"staleMs": STALE_MS}, "transcript": {"fsync": "never"},
    })
    backend = open_backend(settings)
    store = FileTranscriptStore(backend, settings)
    raw_client = aioredis.Redis.from_url(BENCH_REDIS_URL)
    raw_dir, ours_dir = data_dir / "raw", data_dir / "ours"
    raw_dir.mkdir(parents=True)
    ours_dir.mkdir(parents=True)
    await raw_client.flushdb()

    async def lane(session_id: str) -> None:
        grant = await backend.acquire_lane(session_id)
        await grant.release()

    async def raw_lock(session_id: str) -> None:
        lock = Lock(raw_client, f"raw:{session_id}", timeout=STALE_MS / 1000, blocking=False)
        if not await lock.acquire():
            raise RuntimeError("raw lock contended in an uncontended benchmark")
        await lock.release()

    async def locked_append(session_id: str) -> None:
        async with backend.write_lock(session_id):
            _append_line(ours_dir / f"{session_id}.jsonl", RECORD)

    async def append_fenced(session_id: str) -> None:
        await store.append(session_id, [RECORD], fence=fences[session_id])

    async def raw_append(session_id: str) -> None:
        lock = Lock(raw_client, f"raw:w:{session_id}", timeout=STALE_MS / 1000, blocking=False)
        if not await lock.acquire():
            raise RuntimeError("raw lock contended in an uncontended benchmark")
        try:
            _append_line(raw_dir / f"{session_id}.jsonl", RECORD)
        finally:
            await lock.release()

    fences = {}
    for index in range(SESSIONS):  # each appending session has had one lane grant, as in a turn
        grant = await backend.acquire_lane(f"bench-f-{index}")
        fences[grant.session_id] = grant.fence
        await grant.release()

    scenarios: dict[str, tuple[Operation, Operation, str]] = {
        "lane acquire+release": (lane, raw_lock, "l"),
        "write-locked append": (locked_append, raw_append, "a"),
        "TranscriptStore.append with fence check": (append_fenced, raw_append, "f"),
    }
    pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in scenarios}
    try:
        for round_number in range(rounds):
            for name, (ours_op, raw_op, tag) in scenarios.items():
                pairs[name].append(await ops_pair(ours_op, raw_op, seconds, tag, round_number))
    finally:
        await raw_client.flushdb()
        await raw_client.aclose()
        await backend.aclose()
    return pairs


def run(quick: bool = False) -> list[dict]:
    seconds, rounds = (0.4, 2) if quick else (1.0, 7)
    with tempfile.TemporaryDirectory() as tmp:
        pairs = asyncio.run(_measure(seconds, rounds, Path(tmp)))
    baseline = "redis.asyncio Lock (new object per acquisition)"
    return [
        ratio_row(name, measured, baseline, None if name in INFORMATIONAL else GOAL_RATIO)
        for name, measured in pairs.items()
    ]


if __name__ == "__main__":
    from tests.bench.__main__ import print_table

    print_table(run())
