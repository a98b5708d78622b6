"""The Python client's streams and ``sessiongate send`` / ``cancel`` against a real gateway process.

Proves: ``stream`` yields the turn's events as they come and their deltas add
up to the reply; ``attach`` follows another client's running turn from its
first event; ``cancel`` (and ``sessiongate cancel``) stops it, the follower
sees ``turn-cancelled``, and nothing is retried; ``sessiongate send --stream``
prints the reply, ``send --attach`` follows a running turn, and both report a
cancelled turn with exit status 2.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing

import pytest

from sessiongate.gateway.client import AsyncSessionGateClient, ProblemError, SessionGateClient
from tests.support import NO_RATE_LIMITS, GatewayProcess, run_cli, wait_until

WORDS = "alpha beta gamma delta epsilon zeta eta theta"
TURN_MS = 2_400  # the echo provider spreads it over the words: 300 ms a word


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = {"providers": [{"id": "echo", "type": "echo", "delayMs": TURN_MS}], "rateLimits": NO_RATE_LIMITS}
    with GatewayProcess(tmp_path_factory.mktemp("stream") / "data", config) as process:
        yield process


def test_stream_yields_the_turn_as_it_comes(gateway: GatewayProcess) -> None:
    with SessionGateClient(gateway.url) as client:
        events = list(client.stream("cs-1", "one two three"))
        stored = client.messages("cs-1")
    assert [e.name for e in events] == ["turn", "delta", "delta", "delta", "done"]
    assert "".join(e.data["text"] for e in events if e.name == "delta") == "one two three" == stored[1]["text"]
    assert events[0].data["messageId"] == stored[0]["id"]


def start_streaming(gateway: GatewayProcess, session_id: str) -> tuple[threading.Thread, list]:
    seen: list = []

    def run() -> None:
        with SessionGateClient(gateway.url) as client:
            seen.extend(client.stream(session_id, WORDS))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_until(lambda: bool(seen), timeout=10, what="the turn started")
    return thread, seen


def test_attach_follows_and_cancel_stops_another_clients_turn(gateway: GatewayProcess) -> None:
    thread, seen = start_streaming(gateway, "cs-2")
    with SessionGateClient(gateway.url) as client:
        attached = client.attach("cs-2")
        first = next(attached)
        assert client.cancel("cs-2") is True
        rest = list(attached)
        assert client.cancel("cs-2") is False
    thread.join(10)
    assert first.name == "turn" and first.data == seen[0].data  # from the very first event
    assert rest[-1].name == "error" and rest[-1].data["type"].endswith("/turn-cancelled")
    assert seen[-1].data == rest[-1].data
    with SessionGateClient(gateway.url) as client, pytest.raises(ProblemError) as none:
        list(client.attach("cs-2"))
    assert none.value.status == 404


@pytest.mark.anyio
async def test_the_async_client_streams_too(gateway: GatewayProcess) -> None:
    async with AsyncSessionGateClient(gateway.url) as client:
        events = [event async for event in client.stream("cs-3", "async words")]
    assert [e.name for e in events] == ["turn", "delta", "delta", "done"]


def test_send_streams_attaches_and_cancel_stops(gateway: GatewayProcess) -> None:
    streamed = run_cli("send", "cs-4", "hello streaming shell", "--stream", "--url", gateway.url)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == "hello streaming shell\n"

    sender = subprocess.Popen(
        [*_cli(), "send", "cs-5", WORDS, "--stream", "--url", gateway.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with SessionGateClient(gateway.url) as client:
            wait_until(lambda: _running(client, "cs-5"), timeout=10, what="the turn runs")
        attach = subprocess.Popen([*_cli(), "send", "cs-5", "--attach", "--url", gateway.url],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # the attach process starts (an interpreter's imports) and connects; the turn runs 2.4 s
        cancelled = run_cli("cancel", "cs-5", "--url", gateway.url)
        sent_out, sent_err = sender.communicate(timeout=20)
        attach_out, attach_err = attach.communicate(timeout=20)
    finally:
        sender.kill()
    assert cancelled.returncode == 0, cancelled.stderr
    assert sender.returncode == 2 and "Turn cancelled" in sent_err
    assert attach.returncode == 2 and "Turn cancelled" in attach_err
    assert sent_out.strip() and WORDS.startswith(sent_out.strip()) and sent_out.strip() != WORDS
    assert attach_out == sent_out
    nothing = run_cli("cancel", "cs-5", "--url", gateway.url)
    assert nothing.returncode == 2 and "no turn" in nothing.stderr


def _cli() -> list[str]:
    return [sys.executable, "-m", "sessiongate.gateway"]


def _running(client: SessionGateClient, session_id: str) -> bool:
    try:
        with closing(client.attach(session_id)) as events:
            return next(events).name == "turn"
    except ProblemError:
        return False
