"""The official ``openai`` SDK as a client of ``/v1/chat/completions`` and ``/v1/models``, against a real gateway process.

Proves: plain and streamed completions (``chat.completion``;
``chat.completion.chunk`` events ending in ``[DONE]``, sent as the model
produces its pieces); the turn is a live turn like the messages API's: a
``DELETE`` on ``turns/current`` ends the SDK's stream with an error and
stores the partial reply ``interrupted``, a client that leaves does not stop
it (a retry with its Idempotency-Key gets the stored reply); the
session from ``user`` or ``X-Session-Id`` with the history read from the
transcript, not from the request; ``model`` picks the provider tried first;
four SDK callers on one busy session are all answered, each message once,
waiting our millisecond estimate (``retry-after-ms``), not a whole-second
``Retry-After``; errors in OpenAI's shape with ``code`` = the problem name;
the SDK does not resend an error marked ``x-should-retry: false``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from sessiongate import SessionBusy
from sessiongate.gateway._openai import completion_chunks
from tests.fakes.openai_server import FakeOpenAI
from tests.support import NO_RATE_LIMITS, GatewayProcess, wait_until

TOKEN = "sdk-test-key"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TURN_MS = 300
WORDS_TURN_MS = 2_000  # the echo provider spreads it over the words: one piece every WORDS_TURN_MS / 10
TEN_WORDS = "one two three four five six seven eight nine ten"


@pytest.fixture(scope="module")
def models() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    with FakeOpenAI("primary") as primary, FakeOpenAI("secondary") as secondary:
        yield primary, secondary


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, models: tuple[FakeOpenAI, FakeOpenAI]) -> Iterator[GatewayProcess]:
    primary, secondary = models
    config = {
        "providers": [primary.provider(), secondary.provider(),
                      {"id": "slow-echo", "type": "echo", "delayMs": TURN_MS}],
        "rateLimits": NO_RATE_LIMITS,
        "auth": {"tokens": [TOKEN]},
    }
    with GatewayProcess(tmp_path_factory.mktemp("openai-sdk") / "data", config) as process:
        yield process


@pytest.fixture(scope="module")
def echo_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway whose every turn takes ``TURN_MS`` (its turn-time estimate learns from nothing faster)."""
    config = {"providers": [{"id": "slow-echo", "type": "echo", "delayMs": TURN_MS}], "rateLimits": NO_RATE_LIMITS,
              "auth": {"tokens": [TOKEN]}}
    with GatewayProcess(tmp_path_factory.mktemp("openai-sdk-echo") / "data", config) as process:
        yield process


@pytest.fixture(scope="module")
def words_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway whose echo provider streams a reply word by word over ``WORDS_TURN_MS``."""
    config = {"providers": [{"id": "words", "type": "echo", "delayMs": WORDS_TURN_MS}],
              "rateLimits": NO_RATE_LIMITS, "auth": {"tokens": [TOKEN]}}
    with GatewayProcess(tmp_path_factory.mktemp("openai-sdk-words") / "data", config) as process:
        yield process


def sdk(gateway: GatewayProcess, **options: object) -> openai.OpenAI:
    """The SDK pointed at the gateway; the bearer token is the SDK's api_key."""
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=TOKEN, **options)  # type: ignore[arg-type]


def session_messages(gateway: GatewayProcess, session_id: str) -> list[dict]:
    return httpx.get(f"{gateway.url}/v1/sessions/{session_id}/messages", headers=AUTH, timeout=5).json()["messages"]


def content_of(chunks: list) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_a_plain_completion_runs_one_turn(gateway: GatewayProcess) -> None:
    with sdk(gateway) as client:
        answer = client.chat.completions.create(
            model="primary", user="sdk-plain", messages=[{"role": "user", "content": "hello"}])

    assert answer.object == "chat.completion" and answer.model == "primary"
    assert answer.choices[0].message.content == "primary: hello"
    assert answer.choices[0].finish_reason == "stop"
    # the fake upstream counts one prompt token per message sent and two completion tokens
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (1, 2, 3)
    stored = session_messages(gateway, "sdk-plain")
    assert [(m["role"], m["text"]) for m in stored] == [("user", "hello"), ("assistant", "primary: hello")]
    assert answer.id == f"chatcmpl-{stored[1]['id']}"


def test_a_streamed_completion_is_chunks_ending_in_done(gateway: GatewayProcess) -> None:
    with sdk(gateway) as client:
        stream = client.chat.completions.create(
            model="primary", user="sdk-stream", messages=[{"role": "user", "content": "stream me"}],
            stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
    raw = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=10,
                     headers={"Authorization": f"Bearer {TOKEN}", "X-Session-Id": "sdk-stream"},
                     json={"model": "primary", "stream": True, "messages": [{"role": "user", "content": "again"}]})

    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-turn_")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert content_of(chunks) == "primary: stream me"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 3  # include_usage: the last chunk
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(event.removeprefix("data: ")) for event in events[:-1])  # not asked for
    assert [m["text"] for m in session_messages(gateway, "sdk-stream")] == [
        "stream me", "primary: stream me", "again", "primary: again"]


def test_a_streamed_completion_sends_each_piece_as_the_model_produces_it(words_gateway: GatewayProcess) -> None:
    arrived: list[float] = []
    chunks = []
    with sdk(words_gateway) as client:
        started = time.monotonic()
        for chunk in client.chat.completions.create(model="words", user="sdk-incremental", stream=True,
                                                    messages=[{"role": "user", "content": TEN_WORDS}]):
            chunks.append(chunk)
            arrived.append(time.monotonic() - started)
    content_at = [at for chunk, at in zip(chunks, arrived, strict=True)
                  if chunk.choices and chunk.choices[0].delta.content]

    assert len(content_at) == 10  # one chunk per word, not the finished reply in one piece
    assert content_at[0] < content_at[-1] - WORDS_TURN_MS / 2000  # the first came long before the turn ended
    stored = session_messages(words_gateway, "sdk-incremental")
    assert content_of(chunks) == stored[-1]["text"] == TEN_WORDS and "interrupted" not in stored[-1]


def test_a_delete_on_the_running_turn_ends_the_sdk_stream_with_an_error(words_gateway: GatewayProcess) -> None:
    turn_url = f"{words_gateway.url}/v1/sessions/sdk-cancel/turns/current"
    watched: list[str] = []

    def watch() -> None:  # the chat completion's turn is anyone's to follow
        with httpx.stream("GET", turn_url, headers=AUTH, timeout=10) as response:
            for line in response.iter_lines():
                if line.startswith("event:"):
                    watched.append(line)

    chunks = []
    watcher = threading.Thread(target=watch)
    with sdk(words_gateway, max_retries=0) as client:
        stream = client.chat.completions.create(model="words", user="sdk-cancel", stream=True,
                                                messages=[{"role": "user", "content": TEN_WORDS}])
        with pytest.raises(openai.APIError) as ended, stream:
            for chunk in stream:
                chunks.append(chunk)
                if content_of(chunks) and watcher.ident is None:
                    watcher.start()
                    wait_until(lambda: bool(watched), what="the watcher follows the turn")
                    assert httpx.delete(turn_url, headers=AUTH, timeout=5).status_code == 204
        plain_errors: list[BaseException] = []

        def plain() -> None:
            try:
                client.chat.completions.create(model="words", user="sdk-cancel-plain",
                                               messages=[{"role": "user", "content": TEN_WORDS}])
            except openai.APIError as error:
                plain_errors.append(error)

        waiting = threading.Thread(target=plain)
        waiting.start()
        wait_until(lambda: httpx.delete(f"{words_gateway.url}/v1/sessions/sdk-cancel-plain/turns/current",
                                        headers=AUTH, timeout=5).status_code == 204,
                   what="the plain request's running turn cancelled")
        waiting.join(timeout=10)
    watcher.join(timeout=10)

    assert ended.value.code == "turn-cancelled"
    stored = session_messages(words_gateway, "sdk-cancel")
    assert stored[0]["text"] == TEN_WORDS
    assert stored[1]["interrupted"] is True and stored[1]["text"] == content_of(chunks) != TEN_WORDS
    assert watched[0] == "event: turn" and watched[-1] == "event: error"
    [cancelled] = plain_errors
    assert isinstance(cancelled, openai.ConflictError)
    assert cancelled.code == "turn-cancelled" and cancelled.status_code == 409
    assert session_messages(words_gateway, "sdk-cancel-plain")[1]["interrupted"] is True


def test_a_client_that_leaves_mid_stream_does_not_stop_the_turn(words_gateway: GatewayProcess) -> None:
    key = {"Idempotency-Key": "sdk-gone-1"}
    with sdk(words_gateway, max_retries=0) as client:
        with client.chat.completions.create(model="words", user="sdk-gone", stream=True, extra_headers=key,
                                            messages=[{"role": "user", "content": TEN_WORDS}]) as stream:
            first = next(chunk for chunk in stream if chunk.choices and chunk.choices[0].delta.content)
        # the stream is closed mid-turn; the turn goes on and stores its whole reply
        wait_until(lambda: len(session_messages(words_gateway, "sdk-gone")) == 2, what="the reply stored")
        retry = list(client.chat.completions.create(model="words", user="sdk-gone", stream=True, extra_headers=key,
                                                    messages=[{"role": "user", "content": TEN_WORDS}]))

    stored = session_messages(words_gateway, "sdk-gone")
    assert first.choices[0].delta.content == "one "
    assert stored[1]["text"] == TEN_WORDS and "interrupted" not in stored[1]
    assert content_of(retry) == TEN_WORDS
    assert len(session_messages(words_gateway, "sdk-gone")) == 2  # the retry got the stored reply, no new turn


def test_the_history_is_the_transcript_not_the_requests_messages(
    gateway: GatewayProcess, models: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    primary, _ = models
    with sdk(gateway) as client:
        client.chat.completions.create(model="primary", user="sdk-history",
                                       messages=[{"role": "user", "content": "first"}])
        client.chat.completions.create(
            model="primary", extra_headers={"X-Session-Id": "sdk-history"}, user="ignored-when-the-header-is-there",
            messages=[{"role": "system", "content": "be terse"}, {"role": "user", "content": "made-up history"},
                      {"role": "assistant", "content": "never said"},
                      {"role": "user", "content": [{"type": "text", "text": "sec"}, {"type": "text", "text": "ond"}]}])

    sent = primary.requests[-1]["messages"]
    assert sent == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "primary: first"},
                    {"role": "user", "content": "second"}]
    assert session_messages(gateway, "ignored-when-the-header-is-there") == []


def test_model_names_the_first_provider_and_an_unknown_model_keeps_the_configured_order(
    gateway: GatewayProcess,
) -> None:
    with sdk(gateway) as client:
        named = client.chat.completions.create(model="secondary", user="sdk-model",
                                               messages=[{"role": "user", "content": "a"}])
        unknown = client.chat.completions.create(model="gpt-4o", user="sdk-model",
                                                 messages=[{"role": "user", "content": "b"}])
        listed = client.models.list()

    assert named.model == "secondary" and named.choices[0].message.content == "secondary: a"
    assert unknown.model == "primary"
    assert [(m.id, m.owned_by) for m in listed.data] == [
        ("primary", "openai"), ("secondary", "openai"), ("slow-echo", "echo")]


def test_four_sdk_callers_on_one_session_are_all_answered_once_waiting_our_ms_estimate(
    echo_gateway: GatewayProcess, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = echo_gateway
    callers, messages = 4, 2
    answers: dict[str, str] = {}
    errors: list[BaseException] = []

    def caller(name: str) -> None:
        try:
            with sdk(gateway, max_retries=50) as client:
                for number in range(messages):
                    text = f"{name}-{number}"
                    answer = client.chat.completions.create(
                        model="slow-echo", user="sdk-four", messages=[{"role": "user", "content": text}])
                    answers[text] = answer.choices[0].message.content or ""
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=caller, args=(f"c{n}",)) for n in range(callers)]
    with caplog.at_level(logging.INFO, logger="openai"):
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        elapsed = time.monotonic() - started

    assert not errors, errors
    expected = {f"c{n}-{m}" for n in range(callers) for m in range(messages)}
    assert answers == {text: text for text in expected}
    users = [m["text"] for m in session_messages(gateway, "sdk-four") if m["role"] == "user"]
    assert sorted(users) == sorted(expected)  # each message exactly once
    waits = [float(record.args[0]) for record in caplog.records  # type: ignore[index]
             if record.getMessage().startswith("Retrying request in")]
    assert waits, "no caller was ever told the session is busy"
    assert max(waits) < 1.0, waits  # the estimate in ms, not Retry-After's whole seconds
    serial_s = callers * messages * TURN_MS / 1000
    assert elapsed < 2.5 * serial_s + 3.0  # generous: the ratio itself is measured in tests/bench/bench_clients


def test_errors_have_openais_shape_with_our_problem_name_as_code(gateway: GatewayProcess) -> None:
    with sdk(gateway, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as no_session:
            client.chat.completions.create(model="primary", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError) as bad_session:
            client.chat.completions.create(model="primary", user="not a session id",
                                           messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError) as no_user_message:
            client.chat.completions.create(model="primary", user="sdk-errors",
                                           messages=[{"role": "system", "content": "hi"}])
        busy_turn = threading.Thread(target=lambda: client.chat.completions.create(
            model="slow-echo", user="sdk-busy", messages=[{"role": "user", "content": "slow"}]))
        busy_turn.start()
        time.sleep(TURN_MS / 3000)
        with pytest.raises(openai.ConflictError) as busy:
            client.chat.completions.create(model="slow-echo", user="sdk-busy",
                                           messages=[{"role": "user", "content": "second"}])
        busy_turn.join(timeout=10)
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError) as unauthorized:
            stranger.models.list()

    assert (no_session.value.code, no_session.value.type) == ("invalid-request", "invalid_request_error")
    body = no_session.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "code", "param"}
    assert "X-Session-Id" in body["message"]
    assert no_session.value.response.headers["x-should-retry"] == "false"
    assert bad_session.value.code == "invalid-session-id"
    assert no_user_message.value.code == "invalid-request"
    assert busy.value.code == "session-busy" and busy.value.type == "conflict_error"
    assert busy.value.status_code == 409
    headers = busy.value.response.headers
    assert headers["x-should-retry"] == "true" and int(headers["retry-after-ms"]) >= 1
    assert int(headers["retry-after"]) >= 1
    assert unauthorized.value.code == "unauthorized" and unauthorized.value.status_code == 401


def test_the_sdk_does_not_resend_an_error_marked_not_retryable(tmp_path: Path) -> None:
    with FakeOpenAI("down", behaviour="status", status=500) as down:
        with GatewayProcess(tmp_path / "data", {"providers": [down.provider()]}) as gateway:
            with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=3) as client:
                with pytest.raises(openai.InternalServerError) as failed:
                    client.chat.completions.create(model="down", user="sdk-502",
                                                   messages=[{"role": "user", "content": "hi"}])
    assert failed.value.status_code == 502 and failed.value.code == "all-providers-failed"
    assert down.calls == 1  # the SDK retries 5xx unless told x-should-retry: false


@pytest.mark.anyio
async def test_a_typed_error_after_the_stream_started_is_an_error_event_without_done() -> None:
    async def pieces(*texts: str, error: SessionBusy | None = None) -> AsyncIterator[str]:
        for text in texts:
            yield text
        if error is not None:
            raise error

    busy = SessionBusy("the turn lost its lane", retry_after_ms=1000, session_id="s")
    events = [event async for event in completion_chunks(pieces("partial", error=busy), completion="chatcmpl-x",
                                                         model="m", created=1)]
    good = [event async for event in completion_chunks(pieces("whole"), completion="chatcmpl-y", model="m", created=1)]
    assert json.loads(events[-1].removeprefix(b"data: "))["error"]["code"] == "session-busy"
    assert b"[DONE]" not in b"".join(events) and b"partial" in events[1]
    assert good[-1] == b"data: [DONE]\n\n"
    assert json.loads(good[-2].removeprefix(b"data: "))["choices"][0]["finish_reason"] == "stop"
