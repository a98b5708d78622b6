"""A burst of sessions is load, not an outage: every one of them gets its turn.

Before, redis-py's pool refused the 101st concurrent command with
``MaxConnectionsError``, which read as ``503 backend-unavailable`` while Redis was
healthy. Now commands wait for a free connection (``backend.maxConnections``),
and transcript file work queues for the store's own worker threads.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest

from sessiongate import open_backend
from tests.support import NO_RATE_LIMITS, GatewayProcess, messages_url
from tests.workers import settings_for

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

BURST = 500
TURN_MS = 500


async def test_a_burst_of_500_sessions_on_two_gateways_sharing_redis_is_all_200(tmp_path: Path, redis_url: str) -> None:
    config = {
        "rateLimits": NO_RATE_LIMITS,
        "providers": [{"id": "echo", "type": "echo", "delayMs": TURN_MS}],
        "backend": {"url": redis_url, "keyPrefix": "sgburst"},
    }
    with GatewayProcess(tmp_path / "data", config) as a, GatewayProcess(tmp_path / "data", config) as b:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:

            async def turn(number: int) -> int:
                gateway = (a, b)[number % 2]
                response = await client.post(messages_url(gateway.url, f"burst-{number}"), json={"text": f"m{number}"})
                return response.status_code if response.status_code != 200 else (
                    200 if response.json()["reply"]["text"] == f"m{number}" else -1
                )

            statuses = Counter(await asyncio.gather(*(turn(number) for number in range(BURST))))
    assert statuses == Counter({200: BURST}), statuses


async def test_more_concurrent_commands_than_redis_connections_wait_for_one(tmp_path: Path, redis_url: str) -> None:
    settings = settings_for(tmp_path, redis_url, backend={"url": redis_url, "keyPrefix": "sgpool", "maxConnections": 2})
    backend = open_backend(settings)
    try:

        async def lane(number: int) -> None:
            grant = await backend.acquire_lane(f"pool-{number}")
            await grant.release()

        await asyncio.gather(*(lane(number) for number in range(100)))
    finally:
        await backend.aclose()
