"""Long conversations and bursts: a turn's cost against the length of its conversation, and many sessions at once.

Transcripts of 0 / 1k / 10k / 100k / 1M records are written straight to disk
(as a long chat leaves them, no index yet); each row's baseline is measured
in the same run:

(a) a turn's latency and the transcript write lock's hold time, p50/p99, at
    each size, against the 0-record session, in process (the turn runner and
    store of the gateway, echo model, ``transcript.fsync = never`` so the disk's
    noise stays out); and over HTTP against a gateway process;
(b) other sessions' turn p99 while a 100k-record session runs turns back to
    back, against the same while a 0-record session does (the same load, no
    long session); alone shown too;
(c) fan-out: 1 000 sessions x 1 turn with a 2 s model, all at once, makespan
    against a bare Starlette endpoint that sleeps 2 s (same client, same run):
    one gateway on the file backend, and two gateways sharing Redis (against two bare servers);
(d) ``GET .../messages`` newest page (100) of a 1M-record session, against ``GET /healthz``.

The first turn on a big session builds its index (off the loop; its time is
shown as its own row); the rows after it measure the steady state.
``python -m tests.bench --only bench_history`` (needs Redis at 127.0.0.1:6379; db 14 is flushed).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import redis

from sessiongate import open_backend
from sessiongate.gateway._context import Gateway
from sessiongate.gateway.turns import user_record
from tests.bench.bench_gate import Server, _percentile, _row
from tests.support import NO_RATE_LIMITS, REDIS_SERVER, GatewayProcess, messages_url, write_transcript
from tests.workers import settings_for

BENCH_REDIS_URL = REDIS_SERVER + "/14"  # a database no test run reserves (see tests/conftest.py)
SIZES = (0, 1_000, 10_000, 100_000, 1_000_000)
GOAL_SIZE_RATIO = 1.5
GOAL_NEIGHBOUR_RATIO = 1.2
GOAL_FAN_OUT_RATIO = 1.1
GOAL_PAGE_MS = 5.0
FAN_OUT_SESSIONS = 1_000
FAN_OUT_MODEL_MS = 2_000
SETTLE_TURNS = 20  # after an index build, while the OS writes the new index back
QUIET = {"rateLimits": NO_RATE_LIMITS, "transcript": {"fsync": "never"}}


def _ms(seconds: list[float]) -> list[float]:
    return [value * 1000 for value in seconds]


def _size_name(size: int) -> str:
    return f"{size // 1_000_000}M" if size >= 1_000_000 else f"{size // 1_000}k" if size >= 1_000 else str(size)


def _session(size: int) -> str:
    return f"long-{size}"


def write_sessions(data_dir: Path, sizes: tuple[int, ...]) -> None:
    for size in sizes:
        write_transcript(data_dir, _session(size), size)


# ---------------------------------------------------------------- (a) in process


async def _in_process(data_dir: Path, sizes: tuple[int, ...], turns: int) -> dict[int, dict[str, Any]]:
    """Per size: index build time (first turn), turn latencies, write-lock holds (seconds)."""
    settings = settings_for(data_dir, **QUIET)
    backend = open_backend(settings)
    gateway = Gateway.open(settings, backend)
    holds: list[float] = []
    original = backend.write_lock

    @asynccontextmanager
    async def timed_write_lock(session_id: str) -> AsyncIterator[Any]:
        async with original(session_id) as hold:
            started = time.perf_counter()
            try:
                yield hold
            finally:
                holds.append(time.perf_counter() - started)

    backend.write_lock = timed_write_lock  # type: ignore[method-assign]

    async def turn(session_id: str) -> float:
        grant = await backend.acquire_lane(session_id)
        started = time.perf_counter()
        try:
            await gateway.turns.run_turn(grant, session_id, user_record("hello", channel="api"))
        finally:
            await grant.release()
        return time.perf_counter() - started

    results: dict[int, dict[str, Any]] = {size: {"turns": [], "holds": []} for size in sizes}
    try:
        for size in sizes:
            results[size]["first"] = await turn(_session(size))
            for _ in range(SETTLE_TURNS):
                await turn(_session(size))
        for _ in range(turns):  # round robin over the sizes: the machine's noise hits every size alike
            for size in sizes:
                holds.clear()
                results[size]["turns"].append(await turn(_session(size)))
                results[size]["holds"].extend(holds)
    finally:
        await gateway.aclose()
        await backend.aclose()
    return results


def bench_sizes_in_process(data_dir: Path, sizes: tuple[int, ...], turns: int) -> list[dict]:
    results = asyncio.run(_in_process(data_dir, sizes, turns))
    rows = []
    base = results[0]
    for size in sizes:
        if size:
            rows.append(_row(f"first turn at {_size_name(size)} records (builds the index)", results[size]["first"],
                             "s", None, None, None, None, None))
    for measure, key in (("turn latency, in process", "turns"), ("write-lock hold", "holds")):
        for label, fraction in (("p50", 0.5), ("p99", 0.99)):
            base_value = _percentile(_ms(base[key]), fraction)
            for size in sizes[1:]:
                value = _percentile(_ms(results[size][key]), fraction)
                ratio = value / base_value
                rows.append(_row(f"{measure} {label} at {_size_name(size)} records", value, "ms",
                                 f"{measure} {label} at 0 records", base_value, ratio,
                                 f"<= {GOAL_SIZE_RATIO}x", ratio <= GOAL_SIZE_RATIO))
    return rows


# ---------------------------------------------------------------- (a, b, d) over HTTP


async def _timed_post(client: httpx.AsyncClient, url: str, text: str) -> float:
    started = time.perf_counter()
    response = await client.post(url, json={"text": text})
    response.raise_for_status()
    return time.perf_counter() - started


async def _timed_get(client: httpx.AsyncClient, url: str) -> float:
    started = time.perf_counter()
    response = await client.get(url)
    response.raise_for_status()
    return time.perf_counter() - started


async def _over_http(base: str, sizes: tuple[int, ...], turns: int, rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {"sizes": {size: [] for size in sizes}}
    async with httpx.AsyncClient(timeout=600) as client:
        for size in sizes:
            for _ in range(1 + SETTLE_TURNS):
                await _timed_post(client, messages_url(base, _session(size)), "first")
        for _ in range(turns):
            for size in sizes:
                results["sizes"][size].append(await _timed_post(client, messages_url(base, _session(size)), "hello"))

        async def others(count: int) -> list[float]:
            return [await _timed_post(client, messages_url(base, f"other-{n % 8}"), "hi") for n in range(count)]

        async def beside(size: int, count: int) -> list[float]:
            busy = True

            async def back_to_back() -> None:
                while busy:
                    await _timed_post(client, messages_url(base, _session(size)), "again")

            runner = asyncio.create_task(back_to_back())
            try:
                return await others(count)
            finally:
                busy = False
                await runner

        alone, short, long = [], [], []
        for _ in range(rounds):  # interleaved, so the machine's noise hits every side alike
            alone += await others(turns // 4)
            short += await beside(0, turns // 4)
            long += await beside(100_000, turns // 4)
        results["neighbours"] = {"alone": alone, "short": short, "long": long}

        page_url = f"{messages_url(base, _session(1_000_000))}?limit=100"
        pages, floor = [], []
        for _ in range(turns):
            pages.append(await _timed_get(client, page_url))
            floor.append(await _timed_get(client, f"{base}/healthz"))
        results["page"], results["floor"] = pages, floor
    return results


def bench_over_http(data_dir: Path, sizes: tuple[int, ...], turns: int, rounds: int) -> list[dict]:
    with GatewayProcess(data_dir, QUIET) as gateway:
        results = asyncio.run(_over_http(gateway.url, sizes, turns, rounds))
    rows = []
    for label, fraction in (("p50", 0.5), ("p99", 0.99)):
        base_value = _percentile(_ms(results["sizes"][0]), fraction)
        for size in sizes[1:]:
            value = _percentile(_ms(results["sizes"][size]), fraction)
            ratio = value / base_value
            rows.append(_row(f"turn latency over HTTP {label} at {_size_name(size)} records", value, "ms",
                             "same at 0 records", base_value, ratio, f"<= {GOAL_SIZE_RATIO}x",
                             ratio <= GOAL_SIZE_RATIO))
    neighbours = {name: _percentile(_ms(samples), 0.99) for name, samples in results["neighbours"].items()}
    ratio = neighbours["long"] / neighbours["short"]
    rows.append(_row("other sessions' turn p99 while a 100k-record session runs turns back to back",
                     neighbours["long"], "ms", "same while a 0-record session does", neighbours["short"], ratio,
                     f"<= {GOAL_NEIGHBOUR_RATIO}x", ratio <= GOAL_NEIGHBOUR_RATIO))
    rows.append(_row("other sessions' turn p99 with nothing else running", neighbours["alone"], "ms",
                     None, None, None, None, None))
    for label, fraction in (("p50", 0.5), ("p99", 0.99)):
        value, floor = _percentile(_ms(results["page"]), fraction), _percentile(_ms(results["floor"]), fraction)
        goal, met = (f"< {GOAL_PAGE_MS:g} ms", value < GOAL_PAGE_MS) if label == "p50" else (None, None)
        rows.append(_row(f"GET newest page (100) of a 1M-record session {label}", value, "ms",
                         "GET /healthz, same client and server, interleaved", floor, value / floor, goal, met))
    return rows


# ---------------------------------------------------------------- (c) fan-out


async def _makespan(urls: list[str], sessions: int, post: bool) -> tuple[float, Counter[int]]:
    """All ``sessions`` requests at once, spread over ``urls``: (seconds until the last answer, statuses)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one(number: int) -> int:
            base = urls[number % len(urls)]
            if post:
                response = await client.post(messages_url(base, f"fan-{number}"), json={"text": "hi"})
            else:
                response = await client.post(f"{base}/s/fan-{number}/turn?ms={FAN_OUT_MODEL_MS}")
            return response.status_code

        started = time.monotonic()
        statuses = await asyncio.gather(*(one(number) for number in range(sessions)))
        return time.monotonic() - started, Counter(statuses)


def bench_fan_out(root: Path, sessions: int) -> list[dict]:
    rows = []
    model = {"rateLimits": NO_RATE_LIMITS, "providers": [{"id": "echo", "type": "echo", "delayMs": FAN_OUT_MODEL_MS}]}
    redis.Redis.from_url(BENCH_REDIS_URL).flushdb()
    setups: list[tuple[str, list[dict[str, Any]]]] = [
        ("one gateway, file backend", [model]),
        ("two gateways sharing Redis", [{**model, "backend": {"url": BENCH_REDIS_URL, "keyPrefix": "sgfan"}}] * 2),
    ]
    for number, (label, configs) in enumerate(setups):
        with ExitStack() as stack:
            bare = [stack.enter_context(_stopping(Server("bare", {}))) for _ in configs]
            gateways = [stack.enter_context(GatewayProcess(root / f"fan-{number}", config)) for config in configs]
            base_s, base_statuses = asyncio.run(_makespan([server.url for server in bare], sessions, post=False))
            ours_s, ours_statuses = asyncio.run(_makespan([gateway.url for gateway in gateways], sessions, post=True))
        ratio = ours_s / base_s
        all_200 = ours_statuses[200] == sessions
        rows.append(_row(f"fan-out {sessions} sessions x 1 turn ({FAN_OUT_MODEL_MS} ms model), {label}: makespan",
                         ours_s, "s", f"bare Starlette sleeping {FAN_OUT_MODEL_MS} ms ({base_statuses[200]} x 200)",
                         base_s, ratio, f"<= {GOAL_FAN_OUT_RATIO}x", ratio <= GOAL_FAN_OUT_RATIO))
        others = ", ".join(f"{count} x {status}" for status, count in sorted(ours_statuses.items()) if status != 200)
        rows.append(_row(f"fan-out {label}: answered 200", ours_statuses[200],
                         f"of {sessions}" + (f" ({others})" if others else ""), None, None, None, f"{sessions}", all_200))
    return rows


class _stopping:
    """A bench :class:`Server` as a context manager."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def __enter__(self) -> Server:
        return self.server

    def __exit__(self, *exc_info: object) -> None:
        self.server.stop()


def run(quick: bool = False) -> list[dict]:
    """Every row; ``quick``: fewer turns and a 200-session fan-out (the sizes stay)."""
    turns = 50 if quick else 200
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir = root / "long"
        write_sessions(data_dir, SIZES)
        rows = bench_sizes_in_process(data_dir, SIZES, turns)
        rows += bench_over_http(data_dir, SIZES, turns, 4 if quick else 12)
        rows += bench_fan_out(root, 200 if quick else FAN_OUT_SESSIONS)
    return rows
