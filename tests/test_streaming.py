"""Streamed turns through the real gateway over HTTP, against a streaming fake upstream.

Proves: a streamed turn sends ``turn``, then the model's pieces in order as
``delta`` events, then ``done`` whose text is their concatenation and is what
the transcript keeps; a busy answer names the running turn and links to it; a
watcher that comes mid-turn replays from the first event; ``DELETE`` on the
running turn closes the upstream request, ends the stream with
``turn-cancelled``, stores the message with the partial reply marked
``interrupted`` and frees the lane; a client that goes away does not stop the
turn (its reply is stored and a retry with its Idempotency-Key gets it without
a second model call); failover happens before the first piece, never after.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from sessiongate._problem import PROBLEM_TYPE_BASE
from sessiongate.gateway.client import EventDecoder, ServerEvent
from tests.fakes import serve_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.support import NO_RATE_LIMITS, assert_problem, free_port, messages_url, transcript, wait_for

STREAM = {"Accept": "text/event-stream"}
pytestmark = pytest.mark.anyio


def turn_url(base: str, session_id: str) -> str:
    return f"{base}/v1/sessions/{session_id}/turns/current"


class EventReader:
    """The events of one streamed answer, read as they come."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.events: list[ServerEvent] = []
        self._lines = response.aiter_lines()
        self._decoder = EventDecoder()

    async def next(self) -> ServerEvent | None:
        async for line in self._lines:
            event = self._decoder.feed(line)
            if event is not None:
                self.events.append(event)
                return event
        return None

    async def until(self, name: str, count: int = 1) -> None:
        while sum(event.name == name for event in self.events) < count:
            assert await self.next() is not None, f"the stream ended before {count} {name} event(s)"

    async def rest(self) -> list[ServerEvent]:
        while await self.next() is not None:
            pass
        return self.events

    @property
    def text(self) -> str:
        return "".join(event.data["text"] for event in self.events if event.name == "delta")


@asynccontextmanager
async def streamed(client: httpx.AsyncClient, method: str, url: str, **kwargs) -> AsyncIterator[EventReader]:
    async with client.stream(method, url, headers={**STREAM, **kwargs.pop("headers", {})}, **kwargs) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield EventReader(response)


def slow_fake(name: str = "model", piece_delay_s: float = 0.15, **kwargs) -> FakeOpenAI:
    return FakeOpenAI(name, piece_delay_s=piece_delay_s, **kwargs)


LONG_TEXT = "one two three four five six seven eight nine ten"


async def test_deltas_come_in_order_and_add_up_to_the_stored_reply(tmp_path: Path) -> None:
    with slow_fake(piece_delay_s=0.01) as fake, serve_gateway(tmp_path / "data", {"providers": [fake.provider()]}) as gw:
        async with httpx.AsyncClient(timeout=10) as client:
            async with streamed(client, "POST", messages_url(gw.url, "s1"), json={"text": LONG_TEXT}) as reader:
                events = await reader.rest()
        stored = transcript(gw.url, "s1")
    names = [event.name for event in events]
    assert names[0] == "turn" and names[-1] == "done"
    assert set(names[1:-1]) == {"delta"} and len(names) - 2 == len(LONG_TEXT.split()) + 1  # "model:" + words
    assert reader.text == f"model: {LONG_TEXT}" == events[-1].data["text"]
    assert events[0].data["messageId"] == stored[0]["id"]
    assert [(m["role"], m["text"]) for m in stored] == [("user", LONG_TEXT), ("assistant", reader.text)]
    assert events[-1].data == {"id": stored[1]["id"], "text": reader.text, "provider": "model"}
    assert fake.requests[0]["stream"] is True


async def test_the_echo_provider_streams_word_by_word(tmp_path: Path) -> None:
    config = {"providers": [{"id": "echo", "type": "echo", "delayMs": 50}]}
    with serve_gateway(tmp_path / "data", config) as gw:
        async with httpx.AsyncClient(timeout=10) as client:
            async with streamed(client, "POST", messages_url(gw.url, "e"), json={"text": "a b c"}) as reader:
                await reader.rest()
            plain = await client.post(messages_url(gw.url, "e2"), json={"text": "a b c"})
    assert [event.data["text"] for event in reader.events if event.name == "delta"] == ["a ", "b ", "c"]
    assert plain.json()["reply"]["text"] == "a b c"  # without Accept: text/event-stream, today's JSON answer


async def test_a_busy_answer_names_the_running_turn_and_a_late_watcher_replays_it(tmp_path: Path) -> None:
    with slow_fake() as fake, serve_gateway(tmp_path / "data", {"providers": [fake.provider()]}) as gw:
        async with httpx.AsyncClient(timeout=10) as client:
            async with streamed(client, "POST", messages_url(gw.url, "b"), json={"text": LONG_TEXT}) as reader:
                await reader.until("delta", 3)
                busy = await client.post(messages_url(gw.url, "b"), json={"text": "me too"})
                async with streamed(client, "GET", turn_url(gw.url, "b")) as watcher:
                    watched = await watcher.rest()
                events = await reader.rest()
            after = await client.get(turn_url(gw.url, "b"))
    problem = assert_problem(busy, 409, "session-busy", session_id="b")
    assert problem["turnId"] == events[0].data["turnId"]
    assert busy.headers["link"] == '</v1/sessions/b/turns/current>; rel="monitor"'
    assert [(e.name, e.data) for e in watched] == [(e.name, e.data) for e in events]  # from the very first
    assert assert_problem(after, 404, "not-found")


async def test_cancel_closes_the_upstream_request_keeps_the_message_and_frees_the_lane(tmp_path: Path) -> None:
    with slow_fake(piece_delay_s=0.3) as fake, \
            serve_gateway(tmp_path / "data", {"providers": [fake.provider()]}) as gw:
        async with httpx.AsyncClient(timeout=10) as client:
            async with streamed(client, "POST", messages_url(gw.url, "c"), json={"text": LONG_TEXT}) as reader:
                await reader.until("delta", 2)
                cancelled = await client.delete(turn_url(gw.url, "c"))
                events = await reader.rest()
            next_turn = await client.post(messages_url(gw.url, "c"), json={"text": "again"})
            await wait_for(lambda: fake.aborted == 1, what="the upstream stream closed")
            none_left = await client.delete(turn_url(gw.url, "c"))
        stored = transcript(gw.url, "c")
    assert cancelled.status_code == 204
    assert events[-1].name == "error"
    assert events[-1].data["type"] == PROBLEM_TYPE_BASE + "turn-cancelled" and events[-1].data["status"] == 409
    assert next_turn.status_code == 200, next_turn.text  # the lane was free at once
    assert fake.aborted == 1 and fake.completed == 1  # the cancelled stream was cut; the next one ran through
    assert stored[0]["text"] == LONG_TEXT
    assert stored[1]["interrupted"] is True and stored[1]["text"] == reader.text and stored[1]["replyTo"] == stored[0]["id"]
    assert [m["text"] for m in stored[2:]] == ["again", "model: again"]
    assert_problem(none_left, 404, "not-found")


async def test_a_json_client_of_a_cancelled_turn_gets_turn_cancelled(tmp_path: Path) -> None:
    with slow_fake(piece_delay_s=0.3) as fake, serve_gateway(tmp_path / "data", {"providers": [fake.provider()]}) as gw:
        async with httpx.AsyncClient(timeout=10) as client:
            waiting = asyncio.create_task(client.post(messages_url(gw.url, "j"), json={"text": LONG_TEXT}))
            await wait_for(lambda: fake.calls == 1)
            await asyncio.sleep(0.1)
            assert (await client.delete(turn_url(gw.url, "j"))).status_code == 204
            answer = await waiting
    assert_problem(answer, 409, "turn-cancelled", session_id="j")
    assert answer.headers["x-should-retry"] == "false" and "retry-after" not in answer.headers


async def test_a_client_that_goes_away_does_not_stop_the_turn(tmp_path: Path) -> None:
    with slow_fake(piece_delay_s=0.1) as fake:
        config = {"providers": [fake.provider()], "rateLimits": NO_RATE_LIMITS}
        with serve_gateway(tmp_path / "data", config) as gw:
            key = {"Idempotency-Key": "gone-1"}
            async with httpx.AsyncClient(timeout=10) as client:
                async with streamed(client, "POST", messages_url(gw.url, "g"), json={"text": LONG_TEXT},
                                    headers=key) as reader:
                    await reader.until("delta", 1)
                # the client closed its stream mid-turn; the turn goes on and stores its reply
                await wait_for(lambda: len(transcript(gw.url, "g")) == 2, what="the reply stored")
                retry = await client.post(messages_url(gw.url, "g"), json={"text": LONG_TEXT}, headers=key)
    assert fake.completed == 1 and fake.aborted == 0  # the upstream call ran to its end
    assert retry.status_code == 200, retry.text
    assert retry.json()["reply"]["text"] == f"model: {LONG_TEXT}"
    assert fake.calls == 1  # the retry got the stored reply without calling the model again


async def test_failover_before_the_first_delta_and_none_after(tmp_path: Path) -> None:
    with FakeOpenAI("down", behaviour="status") as down, FakeOpenAI("breaks", behaviour="break") as breaks, \
            FakeOpenAI("backup") as backup:
        refused = {"id": "refused", "type": "openai", "baseUrl": f"http://127.0.0.1:{free_port()}"}
        before = {"providers": [refused, down.provider(), backup.provider()]}
        with serve_gateway(tmp_path / "before", before) as gw:
            async with httpx.AsyncClient(timeout=10) as client:
                async with streamed(client, "POST", messages_url(gw.url, "f"), json={"text": "hi"}) as reader:
                    events = await reader.rest()
        assert events[-1].name == "done" and events[-1].data["provider"] == "backup"
        assert reader.text == "backup: hi" and backup.calls == 1

        after = {"providers": [breaks.provider(), backup.provider()]}
        with serve_gateway(tmp_path / "after", after) as gw:
            async with httpx.AsyncClient(timeout=10) as client:
                async with streamed(client, "POST", messages_url(gw.url, "f"), json={"text": "hi"}) as reader:
                    events = await reader.rest()
            stored = transcript(gw.url, "f")
    assert [event.name for event in events] == ["turn", "delta", "error"]
    assert events[-1].data["type"] == PROBLEM_TYPE_BASE + "all-providers-failed"
    assert "breaks" in events[-1].data["detail"]
    assert backup.calls == 1  # not called again: the reply had started
    assert stored == []  # nothing of that turn is kept


async def test_interrupt_cancels_the_running_turn_and_the_next_sees_its_message(tmp_path: Path) -> None:
    with slow_fake(piece_delay_s=0.3) as fake:
        config = {"providers": [fake.provider()], "lane": {"mode": "interrupt"}, "rateLimits": NO_RATE_LIMITS}
        with serve_gateway(tmp_path / "data", config) as gw:
            async with httpx.AsyncClient(timeout=10) as client:
                async with streamed(client, "POST", messages_url(gw.url, "i"), json={"text": LONG_TEXT}) as first:
                    await first.until("delta", 1)
                    second = await client.post(messages_url(gw.url, "i"), json={"text": "stop, new question"})
                    first_events = await first.rest()
            stored = transcript(gw.url, "i")
    assert first_events[-1].name == "error"
    assert first_events[-1].data["type"] == PROBLEM_TYPE_BASE + "turn-cancelled"
    assert second.status_code == 200, second.text
    assert fake.aborted == 1
    history = [m["content"] for m in fake.requests[1]["messages"]]
    assert history[0] == LONG_TEXT and history[-1] == "stop, new question"  # the interrupted message is not lost
    assert [m.get("interrupted", False) for m in stored] == [False, True, False, False]


async def test_collect_answers_the_waiting_messages_with_one_model_call(tmp_path: Path) -> None:
    with slow_fake(piece_delay_s=0.2) as fake:
        config = {"providers": [fake.provider()], "rateLimits": NO_RATE_LIMITS,
                  "lane": {"mode": "collect", "debounceMs": 200, "queueCap": 3}}
        with serve_gateway(tmp_path / "data", config) as gw:
            async with httpx.AsyncClient(timeout=20) as client:
                url = messages_url(gw.url, "k")
                first = asyncio.create_task(client.post(url, json={"text": LONG_TEXT}))
                await wait_for(lambda: fake.calls == 1)
                waiting = []
                for text in ("and also", "one more thing", "last"):
                    waiting.append(asyncio.create_task(client.post(url, json={"text": text})))
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)
                full = await client.post(url, json={"text": "over the cap"})
                answers = [await task for task in [first, *waiting]]
            stored = transcript(gw.url, "k")
    assert_problem(full, 429, "queue-full", session_id="k")
    assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers]
    assert fake.calls == 2  # the first turn, then one turn for the three waiting messages
    assert [m["content"] for m in fake.requests[1]["messages"]][-3:] == ["and also", "one more thing", "last"]
    collected = {answer.json()["reply"]["id"] for answer in answers[1:]}
    assert len(collected) == 1  # every waiting request got that one reply
    assert [m["text"] for m in stored] == [LONG_TEXT, f"model: {LONG_TEXT}", "and also", "one more thing", "last",
                                           "model: last"]
    assert [answer.json()["messageId"] for answer in answers[1:]] == [m["id"] for m in stored[2:5]]
