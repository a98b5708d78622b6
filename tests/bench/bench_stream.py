"""Streaming benchmarks: time to first delta, cancel to lane free, interrupt end to end.

One gateway process (``sessiongate serve``) in front of the streaming fake
upstream (``tests/fakes/openai_server.py``, a uvicorn thread here); every row
is compared with a baseline measured in the same run, interleaved round by
round:

(a) time to first delta: ``POST .../messages`` with ``Accept:
    text/event-stream`` until the first ``delta`` event, vs the same request
    sent straight to the fake upstream until its first chunk (goal: at most
    1 ms added at p99);
(b) cancel to lane free: while a turn streams, ``DELETE .../turns/current``,
    and at once a new streamed message that waits for the lane
    (``lane.maxWaitMs``); the time from sending the DELETE until the new
    message's ``turn`` event, minus the same message's time on an idle
    session (goal: p99 under 10 ms);
(c) interrupt end to end (``lane.mode = interrupt``): a new message's first
    delta while another turn streams (it is cancelled first), vs the same on
    an idle session (goal: at most 1.2x at p99).

``python -m tests.bench --only bench_stream`` prints the rows.
"""

from __future__ import annotations

import asyncio
import functools
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from tests.fakes.openai_server import FakeOpenAI
from tests.support import NO_RATE_LIMITS, GatewayProcess, messages_url

STREAM = {"Accept": "text/event-stream"}
TEXT = "one two three four five six seven eight"


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def timed_stream(client: httpx.AsyncClient, method: str, url: str, prefix: str, **kwargs) -> float:
    """Seconds from sending the request to the first line starting with ``prefix``; the rest is drained."""
    started = time.perf_counter()
    seen = None
    async with client.stream(method, url, **kwargs) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if seen is None and line.startswith(prefix):
                seen = time.perf_counter()
    assert seen is not None, f"the stream ended without {prefix!r}"
    return seen - started


async def first_delta_rows(
    client: httpx.AsyncClient, gateway: str, upstream: FakeOpenAI, rounds: int, backend: str
) -> list[dict]:
    direct_body = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": TEXT}]}
    through, direct = [], []
    for number in range(rounds):
        direct.append(await timed_stream(client, "POST", f"{upstream.url}/v1/chat/completions", "data:",
                                         json=direct_body))
        through.append(await timed_stream(client, "POST", messages_url(gateway, f"ttfd-{number}"), "event: delta",
                                          json={"text": TEXT}, headers=STREAM))
    added_p99_ms = (percentile(through, 0.99) - percentile(direct, 0.99)) * 1000
    return [
        _row(f"time to first delta p50, {backend} (gateway vs straight to the upstream)",
             percentile(through, 0.5) * 1000, "ms", "upstream p50", percentile(direct, 0.5) * 1000, None, None),
        _row(f"time to first delta p99, {backend} (gateway vs straight to the upstream)",
             percentile(through, 0.99) * 1000, "ms", "upstream p99", percentile(direct, 0.99) * 1000,
             "<= 1 ms added", added_p99_ms <= 1.0, note=f"added {added_p99_ms:.2f} ms"),
    ]


async def stream_until_first_delta(client: httpx.AsyncClient, url: str, text: str) -> asyncio.Task[None]:
    """Start a streamed turn and return (once its first delta came) the task that reads the rest."""
    arrived = asyncio.get_running_loop().create_future()

    async def read() -> None:
        async with client.stream("POST", url, json={"text": text}, headers=STREAM) as response:
            async for line in response.aiter_lines():
                if line.startswith("event: delta") and not arrived.done():
                    arrived.set_result(None)
            if not arrived.done():
                arrived.set_exception(AssertionError("no delta"))

    task = asyncio.get_running_loop().create_task(read())
    await arrived
    return task


def timed_message(client: httpx.AsyncClient, gateway: str, session: str, until: str) -> Awaitable[float]:
    """A short streamed message to ``session``: seconds until its first ``until`` event."""
    return timed_stream(client, "POST", messages_url(gateway, session), f"event: {until}",
                        json={"text": "x"}, headers=STREAM)


async def cancel_rows(client: httpx.AsyncClient, gateway: str, rounds: int) -> list[dict]:
    freed, idle = [], []
    for number in range(rounds):
        session = f"cancel-{number}"
        idle.append(await timed_message(client, gateway, f"idle-{session}", "turn"))
        running = await stream_until_first_delta(client, messages_url(gateway, session), TEXT)
        cancelled = client.delete(f"{gateway}/v1/sessions/{session}/turns/current")
        answer, waited = await asyncio.gather(cancelled, timed_message(client, gateway, session, "turn"))  # at once
        freed.append(waited)
        assert answer.status_code == 204
        await running
    # each sample: DELETE sent -> the waiting message's turn event; minus what that message costs when idle
    lane_free = [(f - i) * 1000 for f, i in zip(freed, idle)]
    return [_row("cancel to lane free p99 (DELETE to the next turn's start, minus that start when idle)",
                 percentile(lane_free, 0.99), "ms", "idle turn start p99", percentile(idle, 0.99) * 1000,
                 "< 10 ms", percentile(lane_free, 0.99) < 10, note=f"p50 {percentile(lane_free, 0.5):.2f} ms")]


async def interrupt_rows(client: httpx.AsyncClient, gateway: str, rounds: int) -> list[dict]:
    interrupting, idle = [], []
    for number in range(rounds):
        session = f"interrupt-{number}"
        idle.append(await timed_message(client, gateway, f"idle-{session}", "delta"))
        running = await stream_until_first_delta(client, messages_url(gateway, session), TEXT)
        interrupting.append(await timed_message(client, gateway, session, "delta"))
        await running
    ratio = percentile(interrupting, 0.99) / percentile(idle, 0.99)
    return [_row("interrupt end to end p99 (new message's first delta, a turn running vs idle)",
                 percentile(interrupting, 0.99) * 1000, "ms", "idle session p99", percentile(idle, 0.99) * 1000,
                 "<= 1.2x", ratio <= 1.2, ratio=ratio)]


def _row(name: str, value: float, unit: str, baseline: str, baseline_value: float, goal: str | None,
         met: bool | None, *, ratio: float | None = None, note: str | None = None) -> dict:
    return {"name": name + (f" [{note}]" if note else ""), "value": value, "unit": unit, "baseline": baseline,
            "baseline_value": baseline_value, "ratio": ratio if ratio is not None else value / baseline_value,
            "goal": goal, "met": met}


async def _with_client(work: Callable[[httpx.AsyncClient], Awaitable[list[dict]]]) -> list[dict]:
    limits = httpx.Limits(max_keepalive_connections=8)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        return await work(client)


def run(quick: bool = False) -> list[dict]:
    rounds = 30 if quick else 200
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAI("fast") as fast, \
            FakeOpenAI("slow", piece_delay_s=0.2) as slow:
        base = {"rateLimits": NO_RATE_LIMITS, "sessionWriteLock": {"timeoutMs": 5_000}}
        for backend in ("file://", "memory://"):
            config = {**base, "providers": [fast.provider()], "backend": {"url": backend}}
            with GatewayProcess(Path(tmp) / backend.rstrip(":/"), config) as gateway:
                rows += asyncio.run(_with_client(functools.partial(
                    first_delta_rows, gateway=gateway.url, upstream=fast, rounds=rounds, backend=backend)))
        cancel_config = {**base, "providers": [slow.provider()], "lane": {"maxWaitMs": 5_000}}
        with GatewayProcess(Path(tmp) / "cancel", cancel_config) as gateway:
            rows += asyncio.run(_with_client(lambda client: cancel_rows(client, gateway.url, rounds // 2)))
        interrupt_config = {**base, "providers": [slow.provider()], "lane": {"mode": "interrupt"}}
        with GatewayProcess(Path(tmp) / "interrupt", interrupt_config) as gateway:
            rows += asyncio.run(_with_client(lambda client: interrupt_rows(client, gateway.url, rounds // 2)))
    return rows


if __name__ == "__main__":
    from tests.bench.__main__ import print_table

    print_table(run())
