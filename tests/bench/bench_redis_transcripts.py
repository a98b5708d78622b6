"""Redis transcripts: the fenced append against a bare ``XADD``, and a turn's tail read of a 1M-record session.

- append: ``RedisTranscriptStore.append`` of one record with the caller's fence
  (record id and time filled in, JSON encoded, ``append.lua``: fence check,
  repeat check, ``XADD``, index ``HSETNX``) against a bare ``XADD`` of the same
  JSON through the same client and connection pool, 8 sessions at once, in back-to-back pairs whose
  order alternates by round; the ratio is the median of per-round ratios
  (raw ops/s ÷ ours, 1.0 is parity). Goal ≤ 1.3×.
- tail: what a turn reads, ``LockedTranscript.tail(100)`` through the store, of a
  session holding 1,000,000 records (written server-side by a Lua loop); the
  median and p99 latency of sequential reads. Goal: median < 2 ms.

Run: ``.venv/bin/python -m tests.bench --only bench_redis_transcripts`` (needs Redis at
127.0.0.1:6379; db 14 is flushed; the big session takes ~100 MB while it runs).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from sessiongate import Settings, open_backend, open_transcripts
from sessiongate.transcripts.redis import RedisTranscriptStore
from tests.bench.bench_redis import BENCH_REDIS_URL, SESSIONS, ops_pair, ratio_row

__all__ = ["run"]

APPEND_GOAL_RATIO = 1.3
TAIL_GOAL_MS = 2.0
TAIL = 100
BIG_SESSION = 1_000_000
RECORD = {"role": "user", "text": "hello"}
KEY_PREFIX = "sgbenchtx"

#: Writes ARGV[1] records into KEYS[1] (a stream) in one call, shaped as the store writes them.
_FILL = """
for n = tonumber(ARGV[2]), tonumber(ARGV[2]) + tonumber(ARGV[1]) - 1 do
  redis.call('XADD', KEYS[1], '*', 'r', string.format(
    '{"role":"user","text":"question %d","id":"r%07d","at":"2026-01-01T00:00:00.000Z","fence":1}', n, n))
end
return 0
"""


async def _fill(client: aioredis.Redis, key: str, count: int) -> None:
    fill = client.register_script(_FILL)
    batch = 20_000
    for first in range(0, count, batch):
        await fill(keys=[key], args=[min(batch, count - first), first])


async def _measure(seconds: float, rounds: int, tail_reads: int, data_dir: Path) -> tuple[list[tuple[float, float]], list[float]]:
    settings = Settings.load(env={}, overrides={
        "dataDir": str(data_dir), "backend": {"url": BENCH_REDIS_URL, "keyPrefix": KEY_PREFIX},
        "transcript": {"url": BENCH_REDIS_URL},
    })
    backend = open_backend(settings)
    store = open_transcripts(backend, settings)
    assert isinstance(store, RedisTranscriptStore)
    raw = aioredis.Redis.from_url(BENCH_REDIS_URL)
    await raw.flushdb()
    try:
        fences = {}
        for index in range(SESSIONS):  # each appending session has had one lane grant, as in a turn
            grant = await backend.acquire_lane(f"bench-f-{index}")
            fences[grant.session_id] = grant.fence
            await grant.release()
        payload = json.dumps(RECORD, separators=(",", ":"))

        async def fenced_append(session_id: str) -> None:
            await store.append(session_id, [RECORD], fence=fences[session_id])

        client = backend.storage.client  # the store's own client and pool: only the commands differ

        async def bare_xadd(session_id: str) -> None:
            await client.xadd(f"raw:{session_id}", {"r": payload})

        pairs = [await ops_pair(fenced_append, bare_xadd, seconds, "f", number) for number in range(rounds)]

        await _fill(raw, store.keys.stream("big"), BIG_SESSION)
        latencies = []
        async with store.locked("big") as transcript:
            for _ in range(tail_reads):
                started = time.perf_counter()
                records = await transcript.tail(TAIL)
                latencies.append((time.perf_counter() - started) * 1000)
                assert len(records) == TAIL and records[-1]["id"] == f"r{BIG_SESSION - 1:07d}"
        return pairs, latencies
    finally:
        await raw.flushdb()
        await raw.aclose()
        await backend.aclose()


def run(quick: bool = False) -> list[dict]:
    seconds, rounds, tail_reads = (0.4, 2, 200) if quick else (1.0, 7, 2_000)
    with tempfile.TemporaryDirectory() as tmp:
        pairs, latencies = asyncio.run(_measure(seconds, rounds, tail_reads, Path(tmp)))
    median_ms = statistics.median(latencies)
    p99_ms = statistics.quantiles(latencies, n=100)[98]
    return [
        ratio_row("transcript append with fence", pairs, "bare XADD of the same record", APPEND_GOAL_RATIO),
        {
            "name": f"redis transcript tail({TAIL}) of a {BIG_SESSION:,}-record session (p99 {p99_ms:.2f} ms)",
            "value": round(median_ms, 3),
            "unit": "ms (median)",
            "baseline": None,
            "baseline_value": None,
            "ratio": None,
            "goal": f"< {TAIL_GOAL_MS} ms",
            "met": median_ms < TAIL_GOAL_MS,
        },
    ]


if __name__ == "__main__":
    from tests.bench.__main__ import print_table

    print_table(run())
