"""Two gateway PROCESSES on one data dir (the file backend): exclusion and fencing across processes.

Proves: while one process runs a session's turn, the other answers a message
for that session with a fast 409 and the model sees one call; once the turn
is over the other process serves the session. A gateway frozen mid-turn
(SIGSTOP) past ``staleMs`` loses the session to the other one; when it
resumes, its turn is refused at append and answered ``session-busy`` (not a
model failure), and only the other's turn is in the transcript.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from tests.fakes.openai_server import FakeOpenAI
from tests.support import GatewayProcess, assert_problem, messages_url, wait_for


@pytest.mark.anyio
async def test_the_second_process_gets_409_and_the_model_one_call(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with FakeOpenAI("model", delay_s=1.5) as fake:
        config = {"providers": [fake.provider()]}
        with GatewayProcess(data, config) as first, GatewayProcess(data, config) as second:
            async with httpx.AsyncClient(timeout=20) as client:
                running = asyncio.create_task(
                    client.post(messages_url(first.url, "shared"), json={"text": "to first"}))
                await wait_for(lambda: fake.calls == 1)
                busy = await client.post(messages_url(second.url, "shared"), json={"text": "to second"})
                answered_during_turn = not running.done()  # no lock wait: the first turn still runs
                done = await running
                calls_during_turn = fake.calls
                after = await client.post(messages_url(second.url, "shared"), json={"text": "later"})
                transcript = (await client.get(messages_url(second.url, "shared"))).json()["messages"]

    assert done.status_code == 200
    assert_problem(busy, 409, "session-busy")
    assert int(busy.headers["retry-after"]) >= 1
    assert answered_during_turn
    assert calls_during_turn == 1
    assert after.status_code == 200
    assert [m["text"] for m in transcript] == ["to first", "model: to first", "later", "model: later"]


@pytest.mark.anyio
async def test_a_frozen_gateway_loses_the_session_and_its_late_turn_is_session_busy(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with FakeOpenAI("model", delay_s=1.0) as fake:
        config = {"providers": [fake.provider(timeout_ms=30_000)], "sessionWriteLock": {"staleMs": 500}}
        with GatewayProcess(data, config) as frozen, GatewayProcess(data, config) as other:
            async with httpx.AsyncClient(timeout=30) as client:
                late = asyncio.create_task(client.post(messages_url(frozen.url, "s"), json={"text": "late"}))
                await wait_for(lambda: fake.calls == 1)  # in the model call: lane held, no write lock
                frozen.signal(signal.SIGSTOP)
                try:
                    await asyncio.sleep(1.0)  # silent for longer than staleMs
                    taken = await client.post(messages_url(other.url, "s"), json={"text": "taken over"})
                finally:
                    frozen.signal(signal.SIGCONT)
                refused = await late
                transcript = (await client.get(messages_url(other.url, "s"))).json()["messages"]

    assert taken.status_code == 200, taken.text
    assert_problem(refused, 409, "session-busy")
    assert [m["text"] for m in transcript] == ["taken over", "model: taken over"]
