"""Real client libraries on one busy session: does the client wait what the gateway asked?

One gateway process (echo provider, ``L`` ms per turn); ``K`` official
``openai`` SDK clients (``AsyncOpenAI``, ``max_retries`` high) send ``M``
chat completions each to the same session. The row is the makespan divided
by the serial model time ``K·M·L`` (1.0 is perfect). The baseline, in the
same run and against the same gateway, is the same SDK with the
``retry-after-ms`` header removed on arrival: it then waits ``Retry-After``,
whole seconds, as every SDK did before the header existed.

``python -m tests.bench --only bench_clients``
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

from tests.bench.__main__ import print_table
from tests.bench.bench_gate import _row
from tests.support import NO_RATE_LIMITS, GatewayProcess

CLIENTS, MESSAGES, DELAY_MS = 4, 3, 200
GOAL = 1.15


async def _drop_ms_hint(response: Any) -> None:  # the SDK's own httpx response type
    response.headers.pop("retry-after-ms", None)


def _sdk(url: str, *, whole_seconds: bool) -> openai.AsyncOpenAI:
    hooks = {"response": [_drop_ms_hint]} if whole_seconds else {}
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=100,
                              http_client=openai.DefaultAsyncHttpxClient(event_hooks=hooks))


async def makespan_ratio(url: str, session: str, *, whole_seconds: bool = False) -> float:
    """Makespan of ``CLIENTS`` SDK clients × ``MESSAGES`` completions on ``session``, ÷ (K·M·L)."""
    clients = [_sdk(url, whole_seconds=whole_seconds) for _ in range(CLIENTS)]

    async def one_client(number: int) -> None:
        for message in range(MESSAGES):
            await clients[number].chat.completions.create(
                model="echo", user=session, messages=[{"role": "user", "content": f"c{number}-{message}"}])

    try:
        started = time.monotonic()
        await asyncio.gather(*(one_client(number) for number in range(CLIENTS)))
        return (time.monotonic() - started) / (CLIENTS * MESSAGES * DELAY_MS / 1000)
    finally:
        for client in clients:
            await client.close()


def run(quick: bool = False) -> list[dict]:
    config = {"providers": [{"id": "echo", "type": "echo", "delayMs": DELAY_MS}], "rateLimits": NO_RATE_LIMITS}
    with tempfile.TemporaryDirectory() as tmp, GatewayProcess(Path(tmp) / "data", config) as gateway:
        asyncio.run(makespan_ratio(gateway.url, "warm-up"))  # the lane learns the turn time, as a running gateway has
        ms_hint = asyncio.run(makespan_ratio(gateway.url, "sdk"))
        whole_seconds = asyncio.run(makespan_ratio(gateway.url, "sdk-whole-seconds", whole_seconds=True))
    label = f"{CLIENTS} openai-SDK clients x {MESSAGES} msgs, one session, L={DELAY_MS} ms"
    return [_row(f"goodput one session, openai SDK reading retry-after-ms ({label})", ms_hint, "makespan/(K·M·L)",
                 "same SDK, retry-after-ms removed (waits Retry-After, whole seconds)", whole_seconds,
                 whole_seconds / ms_hint, f"≤ {GOAL}", ms_hint <= GOAL)]


if __name__ == "__main__":
    print_table(run())
