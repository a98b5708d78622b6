"""Streamed turns across processes: ``--workers 2`` on one data dir, and two instances on Redis.

Proves: a watcher on another process than the one running the turn replays the
turn from its first event to its ``done``, a busy answer there names the same
turn, and a ``DELETE`` there reaches the running process (the upstream request
is closed, the stream ends with ``turn-cancelled``, the partial reply is
stored as interrupted).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from sessiongate._problem import PROBLEM_TYPE_BASE
from tests.support import NO_RATE_LIMITS, GatewayProcess, assert_problem, messages_url, transcript, wait_for
from tests.test_streaming import LONG_TEXT, slow_fake, streamed, turn_url

pytestmark = pytest.mark.anyio


def config_for(fake, backend_url: str | None = None) -> dict:
    config = {"providers": [fake.provider()], "rateLimits": NO_RATE_LIMITS}
    if backend_url is not None:
        config["backend"] = {"url": backend_url}
    return config


async def test_with_two_workers_every_watcher_replays_the_turn_whichever_worker_it_reaches(tmp_path: Path) -> None:
    async def watch(url: str) -> tuple[httpx.Response, list]:
        async with httpx.AsyncClient(timeout=20) as other:  # a new connection: the kernel picks the worker
            busy = await other.post(messages_url(url, "w"), json={"text": "busy?"})
            async with streamed(other, "GET", turn_url(url, "w")) as watcher:
                return busy, await watcher.rest()

    with slow_fake(piece_delay_s=0.3) as fake:
        with GatewayProcess(tmp_path / "data", config_for(fake), extra_args=["--workers", "2"]) as gw:
            async with httpx.AsyncClient(timeout=20) as client:
                async with streamed(client, "POST", messages_url(gw.url, "w"), json={"text": LONG_TEXT}) as reader:
                    await reader.until("delta", 2)
                    watched = await asyncio.gather(*(watch(gw.url) for _ in range(6)))
                    events = await reader.rest()
    expected = [(event.name, event.data) for event in events]
    assert events[-1].name == "done"
    for busy, seen in watched:
        assert assert_problem(busy, 409, "session-busy")["turnId"] == events[0].data["turnId"]
        assert [(event.name, event.data) for event in seen] == expected


async def cancel_from_the_other_instance(first: GatewayProcess, second: GatewayProcess, fake) -> list:
    async with httpx.AsyncClient(timeout=20) as client:
        async with streamed(client, "POST", messages_url(first.url, "x"), json={"text": LONG_TEXT}) as reader:
            await reader.until("delta", 2)
            async with streamed(client, "GET", turn_url(second.url, "x")) as watcher:
                await watcher.until("delta", 2)
                cancelled = await client.delete(turn_url(second.url, "x"))
                watched = await watcher.rest()
            events = await reader.rest()
        await wait_for(lambda: fake.aborted == 1, what="the upstream stream closed")
        after = await client.post(messages_url(second.url, "x"), json={"text": "after"})
    assert cancelled.status_code == 204
    assert events[-1].name == "error" and events[-1].data["type"] == PROBLEM_TYPE_BASE + "turn-cancelled"
    assert [(e.name, e.data) for e in watched] == [(e.name, e.data) for e in events]
    assert after.status_code == 200, after.text
    stored = transcript(second.url, "x")
    assert stored[0]["text"] == LONG_TEXT and stored[1]["interrupted"] is True
    assert stored[1]["text"] == "".join(e.data["text"] for e in events if e.name == "delta")
    return stored


@pytest.mark.parametrize("shared", ["data-dir", pytest.param("redis", marks=pytest.mark.redis)])
async def test_two_instances_watch_and_cancel_each_others_turns(
    tmp_path: Path, shared: str, request: pytest.FixtureRequest
) -> None:
    """Two instances sharing a data dir (file backend) or a Redis: each attaches to and cancels the other's turn."""
    with slow_fake(piece_delay_s=0.3) as fake:
        config = config_for(fake, request.getfixturevalue("redis_url") if shared == "redis" else None)
        with GatewayProcess(tmp_path / "data", config) as first, GatewayProcess(tmp_path / "data", config) as second:
            await cancel_from_the_other_instance(first, second, fake)


@pytest.mark.redis
async def test_interrupt_and_collect_across_two_instances_on_redis(tmp_path: Path, redis_url: str) -> None:
    with slow_fake(piece_delay_s=0.3) as fake:
        base = config_for(fake, redis_url)
        interrupting = {**base, "lane": {"mode": "interrupt"}}
        with GatewayProcess(tmp_path / "i", interrupting) as first, GatewayProcess(tmp_path / "i", interrupting) as second:
            async with httpx.AsyncClient(timeout=20) as client:
                async with streamed(client, "POST", messages_url(first.url, "ri"), json={"text": LONG_TEXT}) as reader:
                    await reader.until("delta", 2)
                    newer = await client.post(messages_url(second.url, "ri"), json={"text": "newer"})
                    events = await reader.rest()
        assert events[-1].data["type"] == PROBLEM_TYPE_BASE + "turn-cancelled"
        assert newer.status_code == 200, newer.text
        assert [m["content"] for m in fake.requests[-1]["messages"]][::2] == [LONG_TEXT, "newer"]

        calls_before = fake.calls
        collecting = {**base, "lane": {"mode": "collect", "debounceMs": 300}}
        with GatewayProcess(tmp_path / "c", collecting) as first, GatewayProcess(tmp_path / "c", collecting) as second:
            async with httpx.AsyncClient(timeout=30) as client:
                running = asyncio.create_task(client.post(messages_url(first.url, "rc"), json={"text": LONG_TEXT}))
                await wait_for(lambda: fake.calls == calls_before + 1)
                waiting = []
                for url, text in ((second.url, "b one"), (first.url, "a two"), (second.url, "b three")):
                    waiting.append(asyncio.create_task(client.post(messages_url(url, "rc"), json={"text": text})))
                    await asyncio.sleep(0.1)
                answers = [await task for task in [running, *waiting]]
            stored = transcript(first.url, "rc")
    assert all(answer.status_code == 200 for answer in answers), [answer.text for answer in answers]
    assert fake.calls == calls_before + 2  # the running turn, then one turn for the three waiting messages
    assert len({answer.json()["reply"]["id"] for answer in answers[1:]}) == 1
    assert [m["text"] for m in stored[2:5]] == ["b one", "a two", "b three"]
