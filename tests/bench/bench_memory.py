"""Memory per idle session: a real gateway process, 10 000 sessions with one turn each.

The gateway keeps per-session state (turn-time estimates, rate-limit windows,
in-process locks); this measures what an idle session costs in resident memory
once its turn is over, as (RSS after - RSS before) / sessions.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import httpx
import psutil

from tests.support import GatewayProcess

GOAL_BYTES = 2048


async def _touch_sessions(url: str, sessions: int, concurrency: int = 32) -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for number in range(sessions):
        queue.put_nowait(number)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            number = queue.get_nowait()
            response = await client.post(f"/v1/sessions/idle-{number}/messages", json={"text": "hi"})
            response.raise_for_status()

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))


def run(quick: bool = False) -> list[dict]:
    sessions = 1_000 if quick else 10_000
    with tempfile.TemporaryDirectory() as tmp:
        config = {"transcript": {"fsync": "never"}, "rateLimits": {"perSession": "60/minute", "perSender": None}}
        with GatewayProcess(Path(tmp) / "data", config) as gateway:
            process = psutil.Process(gateway.pid)
            asyncio.run(_touch_sessions(gateway.url, 200))  # warm up imports, pools and caches
            before = process.memory_info().rss
            asyncio.run(_touch_sessions(gateway.url, sessions))
            after = process.memory_info().rss
    per_session = max(0, after - before) / sessions
    return [
        {
            "name": f"memory per idle session ({sessions} sessions)",
            "value": round(per_session),
            "unit": "bytes",
            "baseline": "gateway RSS before",
            "baseline_value": round(before / 2**20, 1),
            "ratio": None,
            "goal": f"≤ {GOAL_BYTES} bytes",
            "met": per_session <= GOAL_BYTES,
        }
    ]


if __name__ == "__main__":
    from tests.bench.__main__ import print_table

    print_table(run())
