"""Failover through the running gateway, and the line between provider errors and session errors.

Proves: a provider failing with 500, hanging past ``timeoutMs`` or refusing
connections hands the turn to the next one; when all fail the answer is 502
``all-providers-failed`` naming each provider's error and nothing is written;
a turn whose lane was taken over during the model call (another gateway
claimed the session) ends as ``session-busy``, never as a model failure, and
does not write; contention never calls or fails over a provider.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from sessiongate import open_backend
from sessiongate.storage import LeaseKind
from tests.fakes import gateway_settings, serve_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.support import assert_problem, free_port, messages_url, wait_for


def refused_provider(provider_id: str) -> dict:
    return {"id": provider_id, "type": "openai", "baseUrl": f"http://127.0.0.1:{free_port()}", "timeoutMs": 2000}


@pytest.mark.parametrize(
    ("behaviour", "reason"), [("status", "server-error"), ("hang", "timeout"), ("refused", "connection-error")]
)
def test_the_next_provider_answers_when_one_fails(tmp_path: Path, behaviour: str, reason: str) -> None:
    with FakeOpenAI("primary", behaviour="hang" if behaviour == "hang" else "status") as primary, \
            FakeOpenAI("backup") as backup:
        first = refused_provider("primary") if behaviour == "refused" else primary.provider(timeout_ms=500)
        config = {"providers": [first, backup.provider()]}
        with serve_gateway(tmp_path / "data", config) as server, httpx.Client(timeout=10) as client:
            answer = client.post(messages_url(server.url, "fo"), json={"text": "hi"})
            metrics = client.get(f"{server.url}/metrics").text
    assert answer.status_code == 200, answer.text
    assert answer.json()["reply"] == {"id": answer.json()["reply"]["id"], "text": "backup: hi", "provider": "backup"}
    assert backup.calls == 1
    assert f'sessiongate_provider_failures_total{{provider="primary",reason="{reason}"}} 1.0' in metrics


def test_all_providers_failed_is_502_listing_each_and_writes_nothing(tmp_path: Path) -> None:
    with FakeOpenAI("broken", behaviour="status", status=503) as broken, FakeOpenAI("slow", behaviour="hang") as slow:
        config = {"providers": [broken.provider(), slow.provider(timeout_ms=300), refused_provider("gone")]}
        with serve_gateway(tmp_path / "data", config) as server, httpx.Client(timeout=10) as client:
            url = messages_url(server.url, "doomed")
            answer = client.post(url, json={"text": "hi"})
            transcript = client.get(url).json()["messages"]
    problem = assert_problem(answer, 502, "all-providers-failed")
    assert problem["sessionId"] == "doomed"
    for expected in ("broken: server-error: HTTP 503", "slow: timeout", "gone: connection-error"):
        assert expected in problem["detail"]
    assert transcript == []


@pytest.mark.anyio
async def test_a_turn_whose_lane_was_taken_over_is_session_busy_not_a_model_failure(tmp_path: Path) -> None:
    with FakeOpenAI("model", delay_s=1.0) as fake:
        config = {"providers": [fake.provider()]}
        with serve_gateway(tmp_path / "data", config) as server:
            rival = open_backend(gateway_settings(tmp_path / "data", config))  # another gateway on the data dir
            async with httpx.AsyncClient(timeout=10) as client:
                url = messages_url(server.url, "taken")
                turn = asyncio.create_task(client.post(url, json={"text": "mine"}))
                await wait_for(lambda: fake.calls == 1)  # the model call runs, with no lock held
                holder = await rival.storage.holder(LeaseKind.LANE, "taken")
                assert holder is not None
                assert await rival.storage.break_lease(holder, stale_ms=0)  # as if it had gone silent
                rival_grant = await rival.acquire_lane("taken")
                answer = await turn
                transcript = (await client.get(url)).json()["messages"]
                await rival_grant.release()
            await rival.aclose()
    problem = assert_problem(answer, 409, "session-busy")
    assert problem["sessionId"] == "taken" and int(answer.headers["retry-after"]) >= 1
    assert transcript == []  # the fenced-out turn wrote nothing
    assert fake.calls == 1  # and was not retried on another provider
