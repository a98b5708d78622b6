"""The event loop's lag, sampled: how long work that should have been off the loop held it.

Every request of a process shares one event loop, so one blocking call (a big
file read, a parse, an fsync) delays every other session. A light task sleeps
:data:`SAMPLE_INTERVAL_S` at a time and records how much later than asked it
woke up in ``sessiongate_event_loop_lag_seconds``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ._metrics import EVENT_LOOP_LAG

__all__ = ["SAMPLE_INTERVAL_S", "sampling_loop_lag"]

SAMPLE_INTERVAL_S = 0.1


async def _sample_forever() -> None:
    loop = asyncio.get_running_loop()
    while True:
        asked_at = loop.time()
        await asyncio.sleep(SAMPLE_INTERVAL_S)
        EVENT_LOOP_LAG.observe(max(0.0, loop.time() - asked_at - SAMPLE_INTERVAL_S))


@asynccontextmanager
async def sampling_loop_lag() -> AsyncIterator[None]:
    """Sample the loop's lag while the block runs (the gateway's lifespan)."""
    task = asyncio.create_task(_sample_forever(), name="sessiongate-loop-lag")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
