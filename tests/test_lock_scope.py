"""The transcript write lock is never held across a model call.

A real gateway process runs a turn whose model (a local fake) takes 1.5 s.
While the model call is in flight, this test process (another process on the
same data dir) takes the session's write lock with a 200 ms timeout and
appends: it must get it at once, and the gateway's turn must still complete
and append after it. With the lock held across the call (the design
sessiongate replaces), the append here would time out.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from sessiongate import FileTranscriptStore, Settings, open_backend
from tests.fakes.openai_server import FakeOpenAI
from tests.support import GatewayProcess, wait_until


@pytest.mark.anyio
async def test_write_lock_is_free_while_the_model_runs(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with FakeOpenAI("model", delay_s=1.5) as fake, GatewayProcess(data_dir, {"providers": [fake.provider()]}) as gateway:
        async with httpx.AsyncClient(timeout=10) as client:
            turn = asyncio.create_task(
                client.post(f"{gateway.url}/v1/sessions/scope/messages", json={"text": "slow question"})
            )
            await asyncio.to_thread(wait_until, lambda: fake.calls == 1, timeout=10, what="model call")
            settings = Settings.load(env={}, overrides={
                "dataDir": str(data_dir), "sessionWriteLock": {"timeoutMs": 200}, "transcript": {"fsync": "never"}})
            backend = open_backend(settings)
            try:
                started = time.monotonic()
                await FileTranscriptStore(backend, settings).append(
                    "scope", [{"role": "user", "text": "written during the model call"}])
                waited_ms = (time.monotonic() - started) * 1000
            finally:
                await backend.aclose()
            model_still_running = not turn.done()
            answer = await turn
            transcript = (await client.get(f"{gateway.url}/v1/sessions/scope/messages")).json()["messages"]
    assert model_still_running, "the append must have happened during the model call"
    assert waited_ms < 200, f"the write lock was held during the model call ({waited_ms:.0f} ms)"
    assert answer.status_code == 200
    assert [m["text"] for m in transcript] == ["written during the model call", "slow question", "model: slow question"]
