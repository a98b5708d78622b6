"""Providers and failover against a real local fake OpenAI-compatible server (and httpx's MockTransport).

Proves: echo replies with the last user message; openai sends model,
messages and the key from ``apiKeyEnv`` to ``/v1/chat/completions``; each
failure of the model side (500, 429, other 4xx, hang past ``timeoutMs``,
connection refused, a non-completion body) is a typed ``ProviderError`` with
its reason; failover walks only on ProviderError, and a session-layer error
aborts at once without touching the next provider or the failure counters.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import httpx
import pytest

from sessiongate import LockTimeout, SessionBusy
from sessiongate.gateway._metrics import PROVIDER_FAILURES
from sessiongate.gateway.providers import (
    AllProvidersFailed,
    ChatMessage,
    EchoProvider,
    Failover,
    OpenAIProvider,
    Provider,
    ProviderError,
    Reply,
    Usage,
    chat_completions_url,
)
from sessiongate.gateway.settings import ProviderSettings
from tests.fakes.openai_server import FakeOpenAI
from tests.support import free_port

HELLO: list[ChatMessage] = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "ok"},
                            {"role": "user", "content": "hello"}]


def openai_settings(base_url: str, **extra: object) -> ProviderSettings:
    return ProviderSettings.model_validate({"id": "m", "type": "openai", "baseUrl": base_url, **extra})


def test_chat_completions_url_accepts_both_base_url_styles() -> None:
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("https://api.example/v1") == "https://api.example/v1/chat/completions"


@pytest.mark.anyio
async def test_echo_replies_with_the_last_user_message_after_its_delay() -> None:
    echo = EchoProvider(ProviderSettings(id="e", type="echo", delay_ms=200))
    started = time.monotonic()
    assert (await echo.complete(HELLO)).text == "hello"
    assert time.monotonic() - started >= 0.2


@pytest.mark.anyio
async def test_openai_sends_model_messages_and_key_from_env() -> None:
    with FakeOpenAI("gpt") as fake:
        provider = OpenAIProvider(
            openai_settings(fake.url, model="m-1", apiKeyEnv="FAKE_KEY"), env={"FAKE_KEY": "sk-test"}
        )
        try:
            assert (await provider.complete(HELLO)).text == "gpt: hello"
        finally:
            await provider.aclose()
    assert fake.requests == [{"model": "m-1", "messages": [dict(m) for m in HELLO]}]
    assert fake.headers[0]["authorization"] == "Bearer sk-test"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("behaviour", "status", "reason"),
    [("status", 500, "server-error"), ("status", 503, "server-error"), ("status", 429, "rate-limited"),
     ("status", 401, "refused"), ("garbage", 200, "bad-response"), ("hang", 200, "timeout")],
)
async def test_openai_failures_are_typed_provider_errors(behaviour: str, status: int, reason: str) -> None:
    with FakeOpenAI("bad", behaviour=behaviour, status=status) as fake:
        provider = OpenAIProvider(openai_settings(fake.url, timeoutMs=300))
        started = time.monotonic()
        with pytest.raises(ProviderError) as raised:
            await provider.complete(HELLO)
        elapsed = time.monotonic() - started
        await provider.aclose()
    assert raised.value.reason == reason and raised.value.provider_id == "m"
    assert elapsed < 5  # a hang is cut at timeoutMs, not waited out


@pytest.mark.anyio
async def test_connection_refused_is_a_provider_error() -> None:
    provider = OpenAIProvider(openai_settings(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(ProviderError) as raised:
        await provider.complete(HELLO)
    await provider.aclose()
    assert raised.value.reason == "connection-error"


@pytest.mark.anyio
async def test_openai_takes_an_injected_transport() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": "via transport"}}]})

    provider = OpenAIProvider(openai_settings("http://model.invalid/v1"), transport=httpx.MockTransport(answer))
    assert (await provider.complete(HELLO)).text == "via transport"
    await provider.aclose()
    assert str(seen[0].url) == "http://model.invalid/v1/chat/completions"


@pytest.mark.anyio
@pytest.mark.parametrize(("usage", "read"), [
    ({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}, Usage(7, 3)),
    ({"prompt_tokens": "7", "completion_tokens": 3}, None),
    (None, None),
])
async def test_openai_reads_upstream_usage_when_well_formed(usage: object, read: Usage | None) -> None:
    message = {"choices": [{"message": {"role": "assistant", "content": "hi"}}]}

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={**message, "usage": usage} if usage is not None else message)

    provider = OpenAIProvider(openai_settings("http://model.invalid/v1"), transport=httpx.MockTransport(answer))
    assert await provider.complete(HELLO) == Reply("hi", read)
    await provider.aclose()


class ScriptedProvider(Provider):
    """A provider that raises or answers as scripted, counting its calls."""

    def __init__(self, provider_id: str, outcome: str | Exception) -> None:
        super().__init__(ProviderSettings(id=provider_id, type="echo"))
        self.outcome = outcome
        self.calls = 0

    async def complete(self, messages: Sequence[ChatMessage]) -> Reply:
        self.calls += 1
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return Reply(self.outcome)


@pytest.mark.anyio
async def test_failover_moves_on_only_after_a_provider_error() -> None:
    first = ScriptedProvider("first", ProviderError("first", "server-error", "HTTP 500"))
    second = ScriptedProvider("second", "from second")
    third = ScriptedProvider("third", "never")
    completion = await Failover([first, second, third]).complete(HELLO)
    assert (completion.text, completion.provider) == ("from second", "second")
    assert (first.calls, second.calls, third.calls) == (1, 1, 0)


@pytest.mark.anyio
async def test_failover_tries_the_named_provider_first_and_ignores_an_unknown_name() -> None:
    providers = [ScriptedProvider("a", "from a"), ScriptedProvider("b", "from b")]
    failover = Failover(providers)
    assert (await failover.complete(HELLO, first="b")).provider == "b"
    assert (await failover.complete(HELLO, first="gpt-4o")).provider == "a"
    assert [p.id for p in failover.order("b")] == ["b", "a"]


@pytest.mark.anyio
async def test_all_failed_lists_every_provider_error() -> None:
    providers = [ScriptedProvider("a", ProviderError("a", "timeout", "no answer within 300 ms")),
                 ScriptedProvider("b", ProviderError("b", "connection-error", "ConnectError: refused"))]
    with pytest.raises(AllProvidersFailed) as raised:
        await Failover(providers).complete(HELLO, session_id="s")
    assert [e.provider_id for e in raised.value.errors] == ["a", "b"]
    assert "a: timeout" in raised.value.detail and "b: connection-error" in raised.value.detail
    assert raised.value.default_status == 502 and raised.value.session_id == "s"
    assert failures_counted("a") >= 1 and failures_counted("b") >= 1


@pytest.mark.anyio
@pytest.mark.parametrize("error", [SessionBusy("lane busy", retry_after_ms=50, session_id="s"),
                                   LockTimeout("s", waited_ms=10, retry_after_ms=50)])
async def test_session_layer_errors_abort_failover_and_count_against_nobody(error: Exception) -> None:
    locked = ScriptedProvider("locked", error)
    spare = ScriptedProvider("spare", "never")
    with pytest.raises(type(error)):
        await Failover([locked, spare]).complete(HELLO)
    assert (locked.calls, spare.calls) == (1, 0)
    assert failures_counted("locked") == 0


def failures_counted(provider_id: str) -> float:
    """Every ``sessiongate_provider_failures_total`` sample of one provider, whatever the reason."""
    return sum(
        sample.value
        for metric in PROVIDER_FAILURES.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels["provider"] == provider_id
    )
