"""A careless or hostile client against the newer routes of a real gateway process.

Each test is one defect an outside check found, driven over HTTP on
127.0.0.1 against ``sessiongate serve`` as a separate OS process: a paging
``limit`` of thousands of digits (a 500), ``Accept`` headers read as
substrings (``text/event-stream;q=0`` streamed, ``TEXT/EVENT-STREAM`` did
not), ``interrupt``/``collect`` waiting ``lane.maxWaitMs`` before acting
(no interrupt, no collecting), a streamed turn's failure kept as its
Idempotency-Key's answer (a retry never ran again), and a retry of a
collected message that stored it a second time.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support import (
    NO_RATE_LIMITS,
    GatewayProcess,
    assert_problem,
    free_port,
    messages_url,
    transcript,
    wait_until,
)

ECHO = {"providers": [{"id": "echo", "type": "echo", "delayMs": 200}], "rateLimits": NO_RATE_LIMITS}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with GatewayProcess(tmp_path_factory.mktemp("outside") / "data", ECHO) as running:
        yield running


@pytest.mark.parametrize("limit", ["1" * 5000, "0" * 4 + "1", "\u0663"])  # past int()'s digit limit, padded, Arabic 3
def test_a_page_limit_that_is_not_a_few_ascii_digits_is_invalid_request(gateway: GatewayProcess, limit: str) -> None:
    answer = httpx.get(messages_url(gateway.url, "paged"), params={"limit": limit}, timeout=10)
    assert_problem(answer, 400, "invalid-request")


def test_an_unknown_before_is_invalid_request_without_echoing_it_whole(gateway: GatewayProcess) -> None:
    answer = httpx.get(messages_url(gateway.url, "paged"), params={"before": "x" * 6000}, timeout=10)
    problem = assert_problem(answer, 400, "invalid-request")
    assert len(problem["detail"]) < 200


@pytest.mark.parametrize(("accept", "streams"), [
    ("text/event-stream", True),
    ("TEXT/Event-Stream", True),  # media types are case-insensitive
    ("application/json, text/event-stream", True),
    ("text/event-stream;q=0", False),  # q=0: "not acceptable"
    ("application/json, text/event-stream;q=0.1", False),  # JSON preferred
    ("*/*", False),
])
def test_the_answer_follows_the_accept_header(gateway: GatewayProcess, accept: str, streams: bool) -> None:
    answer = httpx.post(messages_url(gateway.url, "accept"), json={"text": "hi"}, headers={"Accept": accept}, timeout=10)
    assert answer.status_code == 200, answer.text
    media_type = answer.headers["content-type"].split(";")[0]
    assert media_type == ("text/event-stream" if streams else "application/json")
    assert ("event: done" in answer.text) if streams else answer.json()["reply"]["text"] == "hi"


def lane_gateway(data_dir: Path, mode: str) -> GatewayProcess:
    """A slow echo whose ``lane.maxWaitMs`` outlasts a turn: it must not delay ``interrupt`` nor split ``collect``."""
    config = {**ECHO, "providers": [{"id": "echo", "type": "echo", "delayMs": 1500}],
              "lane": {"mode": mode, "maxWaitMs": 10_000, "debounceMs": 100}}
    return GatewayProcess(data_dir, config)


def turn_runs(messages: str) -> bool:
    """Whether the session of ``messages`` has a running turn (the status only: its stream lasts the turn)."""
    with httpx.stream("GET", f"{messages.removesuffix('/messages')}/turns/current", timeout=5) as answer:
        return answer.status_code == 200


def test_interrupt_mode_cancels_at_once_whatever_lane_max_wait(tmp_path: Path) -> None:
    with lane_gateway(tmp_path / "data", "interrupt") as gateway, ThreadPoolExecutor(2) as pool:
        url = messages_url(gateway.url, "interrupted")
        first = pool.submit(httpx.post, url, json={"text": "first"}, timeout=20)
        wait_until(lambda: turn_runs(url), timeout=10, what="the first turn runs")
        second = httpx.post(url, json={"text": "second"}, timeout=20)
        assert second.status_code == 200 and second.json()["reply"]["text"] == "second"
        assert_problem(first.result(), 409, "turn-cancelled")
        stored = transcript(gateway.url, "interrupted")
    assert [(m["role"], m["text"], m.get("interrupted")) for m in stored][::2] == [("user", "first", None),
                                                                                  ("user", "second", None)]
    assert stored[1]["interrupted"] is True and "interrupted" not in stored[3]


def test_collect_mode_answers_what_came_during_a_turn_with_one_turn_whatever_lane_max_wait(tmp_path: Path) -> None:
    with lane_gateway(tmp_path / "data", "collect") as gateway, ThreadPoolExecutor(4) as pool:
        url = messages_url(gateway.url, "collected")
        first = pool.submit(httpx.post, url, json={"text": "first"}, timeout=20)
        wait_until(lambda: turn_runs(url), timeout=10, what="the first turn runs")
        later = [pool.submit(httpx.post, url, json={"text": f"later {n}"}, timeout=20) for n in range(3)]
        assert [answer.result().status_code for answer in [first, *later]] == [200] * 4
        stored = transcript(gateway.url, "collected")
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "user", "user", "assistant"], stored


def test_a_streamed_turn_that_failed_is_not_the_idempotency_keys_answer(tmp_path: Path) -> None:
    """As for the JSON answer (502, dropped): a retry with the same key runs again, the provider may be back."""
    dead = {"id": "dead", "type": "openai", "baseUrl": f"http://127.0.0.1:{free_port()}/v1", "model": "m",
            "timeoutMs": 1000}
    with GatewayProcess(tmp_path / "data", {"providers": [dead], "rateLimits": NO_RATE_LIMITS}) as gateway:
        attempts = [httpx.post(messages_url(gateway.url, "failing"), json={"text": "hi"}, timeout=20,
                               headers={"Accept": "text/event-stream", "Idempotency-Key": "one-key"})
                    for _ in range(2)]
        chats = [httpx.post(f"{gateway.url}/v1/chat/completions", timeout=20,
                            json={"messages": [{"role": "user", "content": "hi"}], "stream": True},
                            headers={"X-Session-Id": "failing-chat", "Idempotency-Key": "chat-key"})
                 for _ in range(2)]
    for attempt in attempts + chats:
        assert attempt.status_code == 200 and "all-providers-failed" in attempt.text
    assert "idempotent-replayed" not in attempts[1].headers and "idempotent-replayed" not in chats[1].headers


def test_a_retry_of_a_collected_message_whose_turn_was_cancelled_is_not_stored_twice(tmp_path: Path) -> None:
    """The collected reply's ``replyTo`` names only the last message; a retry of another must still find it."""
    with lane_gateway(tmp_path / "data", "collect") as gateway, ThreadPoolExecutor(3) as pool:
        url = messages_url(gateway.url, "recollected")
        first = pool.submit(httpx.post, url, json={"text": "first"}, timeout=20)
        wait_until(lambda: turn_runs(url), timeout=10, what="the first turn runs")
        later = [pool.submit(httpx.post, url, json={"text": f"later {n}"}, headers={"Idempotency-Key": f"key-{n}"},
                             timeout=20) for n in range(2)]
        assert first.result().status_code == 200  # the later two joined the inbox meanwhile (1.5 s turn)
        wait_until(lambda: turn_runs(url), timeout=10, what="the collected turn runs")
        assert httpx.delete(f"{url.removesuffix('/messages')}/turns/current", timeout=5).status_code == 204
        for answer in later:
            assert_problem(answer.result(), 409, "turn-cancelled")
        for n in range(2):  # whichever joined first (the reply's replyTo names the other)
            retry = httpx.post(url, json={"text": f"later {n}"}, headers={"Idempotency-Key": f"key-{n}"}, timeout=20)
            assert_problem(retry, 409, "turn-cancelled")  # the message is stored, and so is its (interrupted) answer
        stored = transcript(gateway.url, "recollected")
    users = [m["text"] for m in stored if m["role"] == "user"]
    assert sorted(users) == ["first", "later 0", "later 1"], users
