"""Write locks on every storage: exclusion between tasks and backends, bounded wait, release on error."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from sessiongate._errors import LockTimeout, SessionBusy
from tests.workers import settings_for, sibling_backends

pytestmark = pytest.mark.anyio


async def test_tasks_and_backends_take_turns(tmp_path: Path, storage_url: str) -> None:
    backends = sibling_backends(settings_for(tmp_path, storage_url), 2)
    inside: list[int] = []
    overlaps = 0

    async def writer(number: int) -> None:
        nonlocal overlaps
        for _ in range(5):
            async with backends[number % 2].write_lock("s"):
                inside.append(number)
                if len(inside) > 1:
                    overlaps += 1
                await asyncio.sleep(0.001)
                inside.remove(number)

    await asyncio.wait_for(asyncio.gather(*(writer(n) for n in range(6))), 30)
    assert overlaps == 0
    for backend in backends:
        await backend.aclose()


async def test_wait_is_bounded_by_timeout_ms(tmp_path: Path, storage_url: str) -> None:
    settings = settings_for(tmp_path, storage_url, sessionWriteLock={"timeoutMs": 150})
    here, elsewhere = sibling_backends(settings)
    async with here.write_lock("s"):
        for waiter in (here, elsewhere):  # queued behind a local task, then polling the storage
            started = time.monotonic()
            with pytest.raises(LockTimeout) as timeout:
                async with waiter.write_lock("s"):
                    pytest.fail("got a held write lock")
            assert 0.14 < time.monotonic() - started < 1.0
            assert isinstance(timeout.value, SessionBusy)
            assert timeout.value.retry_after_ms >= 1 and timeout.value.session_id == "s"
    async with elsewhere.write_lock("s"):  # free again, and not left locked by the timeouts
        pass
    for backend in (here, elsewhere):
        await backend.aclose()


async def test_released_when_the_body_raises(tmp_path: Path, storage_url: str) -> None:
    settings = settings_for(tmp_path, storage_url, sessionWriteLock={"timeoutMs": 100})
    here, elsewhere = sibling_backends(settings)
    with pytest.raises(RuntimeError):
        async with here.write_lock("s"):
            raise RuntimeError("boom")
    async with elsewhere.write_lock("s"):
        pass
    for backend in (here, elsewhere):
        await backend.aclose()


async def test_sessions_do_not_block_each_other(tmp_path: Path, storage_url: str) -> None:
    (backend,) = sibling_backends(settings_for(tmp_path, storage_url, sessionWriteLock={"timeoutMs": 100}), 1)
    async with backend.write_lock("a"), backend.write_lock("b"):
        pass
    await backend.aclose()
