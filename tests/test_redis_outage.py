"""Redis goes away mid-turn and comes back: clear 503s meanwhile, nothing lost or doubled, no restart needed.

Each test runs its own ``redis-server`` on a free port (no persistence, so a
restart also loses every key, as a crashed cache would) and never touches
the shared Redis on 6379. The gateway is a real separate process with the
default rate limits on, so the limits' Redis storage is exercised too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sessiongate.storage import LeaseKind
from sessiongate.storage.redis import _Keys
from tests.fakes.telegram_api import BOT_TOKEN, SECRET, SECRET_HEADER, FakeTelegramApi, deliver_like_telegram, update
from tests.support import DedicatedRedis, GatewayProcess, assert_problem, free_port, messages_url, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

NEVER = {500, 502}  # a lock backend outage is never an internal error or a provider failure


@pytest.fixture
def dedicated_redis() -> Iterator[DedicatedRedis]:
    server = DedicatedRedis(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def gateway(tmp_path: Path, dedicated_redis: DedicatedRedis, telegram_api: FakeTelegramApi) -> Iterator[GatewayProcess]:
    config = {
        "backend": {"url": dedicated_redis.url},
        "providers": [{"id": "echo", "type": "echo", "delayMs": 1_500}],
        "rateLimits": {"perSession": "1000/minute", "perSender": "1000/minute"},
        "channels": {"telegram": {"secretToken": SECRET, "apiBase": telegram_api.url}},
    }
    with GatewayProcess(tmp_path / "data", config, env={"TELEGRAM_BOT_TOKEN": BOT_TOKEN}) as process:
        yield process


def lane_is_held(server: DedicatedRedis, session_id: str) -> bool:
    client = server.client()
    try:
        return client.exists(_Keys("sessiongate").lease(LeaseKind.LANE, session_id)) == 1
    finally:
        client.close()


async def post(client: httpx.AsyncClient, gateway: GatewayProcess, session_id: str, text: str) -> httpx.Response:
    response = await client.post(messages_url(gateway.url, session_id), json={"text": text})
    assert response.status_code not in NEVER, response.text
    return response


async def readiness(client: httpx.AsyncClient, gateway: GatewayProcess) -> int:
    return (await client.get(f"{gateway.url}/readyz")).status_code


async def wait_ready(client: httpx.AsyncClient, gateway: GatewayProcess) -> None:
    """Until ``/readyz`` is 200 again (bounded): the gateway notices Redis is back by itself."""
    for _ in range(100):
        if await readiness(client, gateway) == 200:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the gateway did not become ready again")


async def test_redis_down_mid_turn_answers_503_then_service_resumes_without_restart(
    gateway: GatewayProcess, dedicated_redis: DedicatedRedis
) -> None:
    async with httpx.AsyncClient(timeout=20) as client:
        assert (await post(client, gateway, "o1", "before")).status_code == 200
        in_flight = asyncio.create_task(post(client, gateway, "o1", "during"))
        await wait_for(lambda: lane_is_held(dedicated_redis, "o1"))
        dedicated_redis.stop()

        refused = await post(client, gateway, "o2", "while down")
        problem = assert_problem(refused, 503, "backend-unavailable")
        assert int(refused.headers["retry-after"]) >= 1 and problem["retryAfterMs"] >= 1
        assert await readiness(client, gateway) == 503
        assert (await client.get(f"{gateway.url}/healthz")).status_code == 200
        assert (await client.get(messages_url(gateway.url, "o1"))).status_code == 200  # reads need no lock

        interrupted = await in_flight  # its model call ends while Redis is still down: the append cannot lock
        assert_problem(interrupted, 503, "backend-unavailable")
        assert gateway.process.poll() is None

        dedicated_redis.start()  # same port, every key gone
        await wait_ready(client, gateway)

        retried = await post(client, gateway, "o1", "during")  # the client retries after Retry-After
        after = await post(client, gateway, "o1", "after")
        transcript = (await client.get(messages_url(gateway.url, "o1"))).json()["messages"]
        other = (await client.get(messages_url(gateway.url, "o2"))).json()["messages"]

    assert retried.status_code == 200 and after.status_code == 200
    assert [m["text"] for m in transcript] == ["before", "before", "during", "during", "after", "after"]
    fences = [m["fence"] for m in transcript]
    assert fences == sorted(fences) and len(set(fences)) == 3  # the restart did not send fences backwards
    assert other == []  # the refused message left no trace


async def test_redis_restart_mid_turn_neither_loses_nor_doubles_the_turn(
    gateway: GatewayProcess, dedicated_redis: DedicatedRedis
) -> None:
    async with httpx.AsyncClient(timeout=20) as client:
        in_flight = asyncio.create_task(post(client, gateway, "r1", "across the restart"))
        await wait_for(lambda: lane_is_held(dedicated_redis, "r1"))
        dedicated_redis.stop()
        dedicated_redis.start()  # back before the model call ends; the lane lease is gone
        answer = await in_flight
        follow_up = await post(client, gateway, "r1", "next")
        transcript = (await client.get(messages_url(gateway.url, "r1"))).json()["messages"]

    texts = [m["text"] for m in transcript]
    if answer.status_code == 200:
        assert texts == ["across the restart", "across the restart", "next", "next"]
    else:  # it lost its lane with the restart: refused, and nothing of it was written
        assert_problem(answer, 409, "session-busy")
        assert texts == ["next", "next"]
    assert follow_up.status_code == 200


async def test_telegram_update_during_an_outage_is_refused_then_processed_once(
    gateway: GatewayProcess, dedicated_redis: DedicatedRedis, telegram_api: FakeTelegramApi
) -> None:
    body = update(update_id=7001, chat_id=4242, text="sent while Redis was down")
    async with httpx.AsyncClient(timeout=20, headers={SECRET_HEADER: SECRET}) as client:
        dedicated_redis.stop()
        refused = await client.post(f"{gateway.url}/v1/webhooks/telegram", json=body)
        problem = assert_problem(refused, 503, "backend-unavailable")  # not a 2xx: Telegram delivers again
        assert int(refused.headers["retry-after"]) >= 1 and problem["retryAfterMs"] >= 1
        assert (await client.get(messages_url(gateway.url, "telegram:4242"))).json()["messages"] == []

        dedicated_redis.start()
        await wait_ready(client, gateway)
        accepted = await deliver_like_telegram(client, gateway.url, body)
        await wait_for(lambda: len(telegram_api.texts(chat_id=4242)) >= 1, timeout=15)
        again = await deliver_like_telegram(client, gateway.url, body)
        await asyncio.sleep(0.5)  # a second reply, if any, would go out meanwhile
        transcript = (await client.get(messages_url(gateway.url, "telegram:4242"))).json()["messages"]

    assert accepted.status_code == 200 and accepted.json()["accepted"] == "new"
    assert again.status_code == 200 and again.json()["accepted"] == "duplicate"
    assert telegram_api.texts(chat_id=4242) == ["sent while Redis was down"]
    assert [r["role"] for r in transcript] == ["user", "assistant"]
