"""Two gateway processes, one Redis, one shared data dir: they behave as one gateway.

Each test starts two real ``python -m sessiongate.gateway serve`` processes on their own
ports with ``backend.url`` pointing at the local Redis (the run's own database) and the same
data dir, then drives them with httpx: one turn per session across both,
queue order across both, shared rate limits, idempotency replays and
Telegram dedupe across instances, and takeover from a paused (SIGSTOP) or
killed (SIGKILL) holder with the old holder's late write fenced out.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis

from sessiongate import open_backend
from sessiongate.storage import LeaseKind
from sessiongate.storage.redis import _Keys
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.telegram_api import BOT_TOKEN, SECRET, SECRET_HEADER, FakeTelegramApi, deliver_like_telegram, update
from tests.support import NO_RATE_LIMITS, GatewayProcess, assert_problem, messages_url, wait_for
from tests.workers import settings_for

pytestmark = [pytest.mark.redis, pytest.mark.anyio]

KEY_PREFIX = "sgpair"

StartPair = Callable[..., tuple[GatewayProcess, GatewayProcess]]


@pytest.fixture
def start_pair(tmp_path: Path, redis_url: str) -> Iterator[StartPair]:
    """``start_pair(config_a, config_b=None)``: two gateways on one Redis and one data dir."""
    with ExitStack() as stack:

        def start(config_a: dict[str, Any], config_b: dict[str, Any] | None = None,
                  env: dict[str, str] | None = None) -> tuple[GatewayProcess, GatewayProcess]:
            gateways = []
            for config in (config_a, config_b or config_a):
                config = {"rateLimits": NO_RATE_LIMITS, **config,
                          "backend": {"url": redis_url, "keyPrefix": KEY_PREFIX}}
                gateways.append(stack.enter_context(GatewayProcess(tmp_path / "data", config, env=env)))
            return gateways[0], gateways[1]

        yield start


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def lane_holder_pid(client: redis.Redis, session_id: str) -> int | None:
    value = client.get(_Keys(KEY_PREFIX).lease(LeaseKind.LANE, session_id))
    return None if value is None else json.loads(value.partition(" ")[2])["pid"]


def texts(response: httpx.Response) -> list[str]:
    return [message["text"] for message in response.json()["messages"]]


async def test_contention_across_instances_one_200_one_409_and_one_model_call(start_pair: StartPair) -> None:
    with FakeOpenAI("model", delay_s=1.0) as fake:
        a, b = start_pair({"providers": [fake.provider()]})
        async with httpx.AsyncClient(timeout=10) as client:
            running = asyncio.create_task(client.post(messages_url(a.url, "c1"), json={"text": "first"}))
            await wait_for(lambda: fake.calls == 1)
            busy = await client.post(messages_url(b.url, "c1"), json={"text": "second"})
            done = await running
            transcript = await client.get(messages_url(b.url, "c1"))
    assert done.status_code == 200
    problem = assert_problem(busy, 409, "session-busy")
    assert int(busy.headers["retry-after"]) >= 1 and problem["retryAfterMs"] >= 1
    assert fake.calls == 1
    assert texts(transcript) == ["first", "model: first"]


async def test_queue_mode_keeps_arrival_order_across_instances(
    start_pair: StartPair, redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    config = {"lane": {"mode": "queue", "queueCap": 8},
              "providers": [{"id": "echo", "type": "echo", "delayMs": 400}]}
    a, b = start_pair(config)
    queue_key = _Keys(KEY_PREFIX).queue("q1")
    # This test holds the lane until all five have their place: no turn can drain the queue meanwhile,
    # however slow the machine (a first turn of 400 ms used to race the enqueueing).
    holder = open_backend(settings_for(tmp_path / "data", backend={"url": redis_url, "keyPrefix": KEY_PREFIX}))
    grant = await holder.acquire_lane("q1")
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            posts = []
            for number, gateway in enumerate([a, b, a, b, b]):
                posts.append(asyncio.create_task(client.post(messages_url(gateway.url, "q1"), json={"text": f"m{number}"})))
                # the next one is sent only once this one has its place in the queue
                await wait_for(lambda n=number + 1: redis_client.zcard(queue_key) == n)
            await grant.release()
            answers = await asyncio.gather(*posts)
            transcript = await client.get(messages_url(a.url, "q1"))
    finally:
        await grant.release()
        await holder.aclose()
    assert [answer.status_code for answer in answers] == [200] * 5
    expected = []
    for number in range(5):
        expected += [f"m{number}", f"m{number}"]  # echo answers with the text
    assert texts(transcript) == expected


async def test_rate_limit_is_shared_by_both_instances(start_pair: StartPair) -> None:
    a, b = start_pair({"rateLimits": {"perSession": "3/minute", "perSender": None}})
    async with httpx.AsyncClient(timeout=10) as client:
        statuses = [(await client.post(messages_url(g.url, "r1"), json={"text": "hi"})).status_code for g in (a, b, a)]
        spent = await client.post(messages_url(b.url, "r1"), json={"text": "one too many"})
        other_session = await client.post(messages_url(b.url, "r2"), json={"text": "hi"})
    assert statuses == [200, 200, 200]
    assert_problem(spent, 429, "rate-limited")
    assert int(spent.headers["retry-after"]) >= 1
    assert other_session.status_code == 200


async def test_idempotency_key_is_replayed_by_the_other_instance(start_pair: StartPair) -> None:
    with FakeOpenAI("model") as fake:
        a, b = start_pair({"providers": [fake.provider()]})
        headers = {"Idempotency-Key": "order-42"}
        async with httpx.AsyncClient(timeout=10) as client:
            first = await client.post(messages_url(a.url, "i1"), json={"text": "pay"}, headers=headers)
            replay = await client.post(messages_url(b.url, "i1"), json={"text": "pay"}, headers=headers)
            reused = await client.post(messages_url(b.url, "i1"), json={"text": "other"}, headers=headers)
            transcript = await client.get(messages_url(b.url, "i1"))
    assert first.status_code == 200 and replay.status_code == 200
    assert replay.json() == first.json()
    assert_problem(reused, 422, "idempotency-key-reused")
    assert fake.calls == 1
    assert texts(transcript) == ["pay", "model: pay"]


async def test_sigstopped_holder_is_taken_over_and_its_late_append_is_fenced_out(
    start_pair: StartPair, redis_client: redis.Redis
) -> None:
    stale = {"sessionWriteLock": {"staleMs": 1_000, "timeoutMs": 2_000}}
    a, b = start_pair({**stale, "providers": [{"id": "slow", "type": "echo", "delayMs": 2_500}]},
                      {**stale, "providers": [{"id": "fast", "type": "echo", "delayMs": 50}]})
    async with httpx.AsyncClient(timeout=30) as client:
        paused = asyncio.create_task(client.post(messages_url(a.url, "f1"), json={"text": "from a"}))
        await wait_for(lambda: lane_holder_pid(redis_client, "f1") == a.pid)
        a.signal(signal.SIGSTOP)
        try:
            await wait_for(lambda: lane_holder_pid(redis_client, "f1") is None, timeout=5)  # TTL = staleMs
            takeover = await client.post(messages_url(b.url, "f1"), json={"text": "from b"})
        finally:
            a.signal(signal.SIGCONT)
        late = await paused
        transcript = await client.get(messages_url(b.url, "f1"))
    assert takeover.status_code == 200 and takeover.json()["reply"]["provider"] == "fast"
    problem = assert_problem(late, 409, "session-busy")
    assert int(late.headers["retry-after"]) >= 1 and problem["retryAfterMs"] >= 1
    records = transcript.json()["messages"]
    assert [r["text"] for r in records] == ["from b", "from b"]
    assert len({r["fence"] for r in records}) == 1


async def test_killed_holder_on_this_host_is_reclaimed_at_once_by_the_other_instance(
    start_pair: StartPair, redis_client: redis.Redis
) -> None:
    config = {"sessionWriteLock": {"staleMs": 600_000}, "providers": [{"id": "echo", "type": "echo", "delayMs": 5_000}]}
    a, b = start_pair(config, {**config, "providers": [{"id": "echo", "type": "echo", "delayMs": 10}]})
    async with httpx.AsyncClient(timeout=30) as client:
        doomed = asyncio.create_task(client.post(messages_url(a.url, "k1"), json={"text": "lost"}))
        await wait_for(lambda: lane_holder_pid(redis_client, "k1") == a.pid)
        a.signal(signal.SIGKILL)
        with pytest.raises(httpx.TransportError):
            await doomed
        after = await client.post(messages_url(b.url, "k1"), json={"text": "next"})  # staleMs is 10 minutes
        transcript = await client.get(messages_url(b.url, "k1"))
    assert after.status_code == 200
    assert texts(transcript) == ["next", "next"]


async def test_telegram_update_delivered_to_both_instances_is_processed_once(
    start_pair: StartPair, telegram_api: FakeTelegramApi
) -> None:
    api = telegram_api
    config = {"channels": {"telegram": {"secretToken": SECRET, "apiBase": api.url}},
              "providers": [{"id": "echo", "type": "echo", "delayMs": 200}]}
    a, b = start_pair(config, env={"TELEGRAM_BOT_TOKEN": BOT_TOKEN})
    body = update(update_id=9001, chat_id=777, text="hello twice")
    async with httpx.AsyncClient(timeout=10, headers={SECRET_HEADER: SECRET}) as client:
        acks = await asyncio.gather(*(deliver_like_telegram(client, g.url, body) for g in (a, b, a, b)))
        await wait_for(lambda: len(api.texts(chat_id=777)) >= 1, timeout=15)
        await anyio.sleep(1.0)  # a duplicate, if any, would go out meanwhile
        transcript = await client.get(messages_url(a.url, "telegram:777"))
    assert all(ack.status_code == 200 for ack in acks), [ack.text for ack in acks]
    assert sorted(ack.json()["accepted"] for ack in acks) == ["duplicate", "duplicate", "duplicate", "new"]
    assert api.texts(chat_id=777) == ["hello twice"]
    assert [r["role"] for r in transcript.json()["messages"]] == ["user", "assistant"]
