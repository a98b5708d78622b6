"""Model providers and failover.

A provider turns a conversation into a reply. :class:`Failover` walks the
configured ``providers`` in order and moves on ONLY on :class:`ProviderError`
(connection error, timeout, HTTP 5xx / 429 / other refusal, malformed answer).
Errors of the session layer (``sessiongate.SessionGateError``: busy lane, lock
timeout, backend down, fenced out) are not caught here: they abort the walk at
once, never count against a provider, and can never read as "all providers
failed".

``openai`` speaks the OpenAI-compatible chat completions API over httpx; the
transport is injectable (tests may pass one, or point ``baseUrl`` at a local
fake server).

Streaming (:meth:`Provider.stream`, :meth:`Failover.stream`) yields the reply
piece by piece. Failover can only move on before the first piece: once text
went out to a client, another model's answer cannot replace it, so a failure
after it is final (:class:`AllProvidersFailed` naming that one provider).
Closing the stream (e.g. a cancelled turn) closes the upstream request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import httpx

from sessiongate import SessionGateError

from ._metrics import ALL_PROVIDERS_FAILED, PROVIDER_CALLS, PROVIDER_FAILURES, PROVIDER_SECONDS
from .settings import GatewaySettings, ProviderSettings

__all__ = [
    "AllProvidersFailed",
    "ChatMessage",
    "Completion",
    "Delta",
    "EchoProvider",
    "Failover",
    "OpenAIProvider",
    "Provider",
    "ProviderError",
    "Reply",
    "Usage",
    "build_failover",
    "chat_completions_url",
    "last_user_text",
    "usage_of",
]

log = logging.getLogger("sessiongate.providers")

ChatMessage = Mapping[str, str]  # {"role": "user" | "assistant" | "system", "content": str}


class ProviderError(Exception):
    """A provider could not produce a reply: the only error failover moves on from.

    ``reason`` is one of ``connection-error``, ``timeout``, ``server-error``
    (5xx), ``rate-limited`` (429), ``refused`` (other 4xx), ``bad-response``.
    """

    def __init__(self, provider_id: str, reason: str, detail: str) -> None:
        super().__init__(f"{provider_id}: {reason}: {detail}")
        self.provider_id = provider_id
        self.reason = reason
        self.detail = detail


class AllProvidersFailed(SessionGateError):
    """Every provider failed with a :class:`ProviderError` (502 ``all-providers-failed``).

    A problem+json error like those of the contract's table (hence the base
    class, which is what the problem renderer takes); only :class:`Failover`
    raises it, after the whole list was tried.
    """

    problem_type: ClassVar[str] = "all-providers-failed"
    default_status: ClassVar[int] = 502
    title: ClassVar[str] = "All providers failed"
    detail_is_public: ClassVar[bool] = True  # provider ids and failure kinds, nothing of the server's

    def __init__(self, errors: Sequence[ProviderError], *, session_id: str | None = None) -> None:
        super().__init__("every provider failed: " + "; ".join(str(error) for error in errors), session_id=session_id)
        self.errors = list(errors)


@dataclass(frozen=True)
class Usage:
    """Token counts of one model call, as the provider reported them."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Reply:
    """One provider's answer: the text, and its token usage where the provider reports it."""

    text: str
    usage: Usage | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    provider: str
    usage: Usage | None = None


@dataclass(frozen=True)
class Delta:
    """One piece of a streamed reply and the provider that produced it (``text`` may be empty).

    The last delta of a provider that reports token usage carries it (with empty text).
    """

    text: str
    provider: str
    usage: Usage | None = None


class Provider(ABC):
    """One configured model. ``complete`` raises :class:`ProviderError` for every failure of the model side."""

    def __init__(self, settings: ProviderSettings) -> None:
        self.id = settings.id

    @abstractmethod
    async def complete(self, messages: Sequence[ChatMessage]) -> Reply:
        """The assistant's reply to ``messages`` (oldest first)."""

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str | Usage]:
        """The reply in pieces as the model produces them, then its :class:`Usage` if reported (default: at once)."""
        reply = await self.complete(messages)
        yield reply.text
        if reply.usage is not None:
            yield reply.usage

    async def aclose(self) -> None:  # noqa: B027 (a no-op by default: only providers with connections override it)
        """Release connections (if any)."""


class EchoProvider(Provider):
    """Built in, the default: replies with the last user message, after ``delayMs`` (a stand-in model time)."""

    def __init__(self, settings: ProviderSettings) -> None:
        super().__init__(settings)
        self.delay_s = settings.delay_ms / 1000

    async def complete(self, messages: Sequence[ChatMessage]) -> Reply:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return Reply(last_user_text(messages))

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        """Word by word (spaces kept), ``delayMs`` spread over the words."""
        words = _WORDS.findall(last_user_text(messages)) or [""]
        pause_s = self.delay_s / len(words)
        for word in words:
            if pause_s:
                await asyncio.sleep(pause_s)
            yield word


_WORDS = re.compile(r"\s*\S+\s*")


def last_user_text(messages: Sequence[ChatMessage]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def chat_completions_url(base_url: str) -> str:
    """``{baseUrl}/v1/chat/completions``; a ``baseUrl`` already ending in ``/v1`` gets ``/chat/completions``."""
    base = base_url.rstrip("/")
    return f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"


class OpenAIProvider(Provider):
    """Any OpenAI-compatible chat completions endpoint; bearer key from the env var ``apiKeyEnv``.

    ``timeoutMs`` bounds the whole call (connect, send, wait, read).
    """

    def __init__(
        self,
        settings: ProviderSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        env: Mapping[str, str] = os.environ,
    ) -> None:
        super().__init__(settings)
        assert settings.base_url is not None  # enforced by ProviderSettings
        self.url = chat_completions_url(settings.base_url)
        self.model = settings.model
        self.timeout_s = settings.timeout_ms / 1000
        api_key = env.get(settings.api_key_env) if settings.api_key_env else None
        if settings.api_key_env and not api_key:
            log.warning("provider %s: environment variable %s is not set; calling without a key",
                        self.id, settings.api_key_env)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(transport=transport, headers=headers, timeout=self.timeout_s)

    def _body(self, messages: Sequence[ChatMessage], **extra: object) -> dict[str, object]:
        body: dict[str, object] = {"messages": [dict(m) for m in messages], **extra}
        if self.model:
            body["model"] = self.model
        return body

    async def complete(self, messages: Sequence[ChatMessage]) -> Reply:
        body = self._body(messages)
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await self.client.post(self.url, json=body)
        except (TimeoutError, httpx.TimeoutException):
            raise ProviderError(self.id, "timeout", f"no answer within {self.timeout_s * 1000:.0f} ms") from None
        except httpx.TransportError as exc:
            raise ProviderError(self.id, "connection-error", f"{type(exc).__name__}: {exc}") from None
        self._raise_for_status(response)
        answer = self._answer_json(response)
        return Reply(self._reply_text(answer), usage_of(answer))

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str | Usage]:
        """``stream: true``: the SSE ``choices[0].delta.content`` pieces; ``timeoutMs`` bounds each wait.

        Asks for the usage chunk (``stream_options.include_usage``, as OpenAI's
        API and the common compatible servers support) and yields its
        :class:`Usage` last. An upstream that answers with one JSON completion
        instead is one piece.
        """
        body = self._body(messages, stream=True, stream_options={"include_usage": True})
        try:
            async with self.client.stream("POST", self.url, json=body) as response:
                if response.status_code >= 400:
                    await response.aclose()
                    self._raise_for_status(response)
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    await response.aread()
                    answer = self._answer_json(response)
                    yield self._reply_text(answer)
                    if (usage := usage_of(answer)) is not None:
                        yield usage
                    return
                async for line in response.aiter_lines():
                    piece = self._sse_piece(line)
                    if piece is _DONE:
                        return
                    if piece:
                        yield piece
        except httpx.TimeoutException:
            raise ProviderError(self.id, "timeout", f"no data within {self.timeout_s * 1000:.0f} ms") from None
        except httpx.TransportError as exc:
            raise ProviderError(self.id, "connection-error", f"{type(exc).__name__}: {exc}") from None

    def _sse_piece(self, line: str) -> str | Usage | None:
        """The text (or usage) of one ``data:`` line (``_DONE`` for ``[DONE]``; ``None`` for anything else)."""
        if not line.startswith("data:"):
            return None
        data = line[5:].strip()
        if data == "[DONE]":
            return _DONE
        try:
            chunk = json.loads(data)
            choices = chunk["choices"]
            content = choices[0]["delta"].get("content") if choices else None
        except (ValueError, LookupError, TypeError, AttributeError):
            raise ProviderError(self.id, "bad-response", "not a chat.completion.chunk (choices[0].delta)") from None
        if not choices:  # the usage chunk comes last, with no choices
            return usage_of(chunk)
        if content is not None and not isinstance(content, str):
            raise ProviderError(self.id, "bad-response", "choices[0].delta.content is not a string")
        return content

    def _raise_for_status(self, response: httpx.Response) -> None:
        status = response.status_code
        if status < 400:
            return
        reason = "rate-limited" if status == 429 else "server-error" if status >= 500 else "refused"
        raise ProviderError(self.id, reason, f"HTTP {status} from {self.url}")

    def _answer_json(self, response: httpx.Response) -> object:
        try:
            return response.json()
        except ValueError:
            raise ProviderError(self.id, "bad-response", "the answer is not JSON") from None

    def _reply_text(self, answer: object) -> str:
        try:
            content = answer["choices"][0]["message"]["content"]  # type: ignore[index]
        except (LookupError, TypeError):
            raise ProviderError(self.id, "bad-response", "not a chat completion (choices[0].message.content)") from None
        if not isinstance(content, str):
            raise ProviderError(self.id, "bad-response", "choices[0].message.content is not a string")
        return content

    async def aclose(self) -> None:
        await self.client.aclose()


_DONE = "\x00[DONE]"  # a sentinel no model sends


def usage_of(answer: object) -> Usage | None:
    """``usage`` of a chat completion answer, if it has well-formed token counts (it is optional upstream)."""
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if type(prompt) is not int or type(completion) is not int or prompt < 0 or completion < 0:
        return None
    return Usage(prompt_tokens=prompt, completion_tokens=completion)


class Failover:
    """The providers in order: the first reply wins; the next one is tried only after a :class:`ProviderError`."""

    def __init__(self, providers: Sequence[Provider]) -> None:
        if not providers:
            raise ValueError("Failover needs at least one provider")
        self.providers = list(providers)

    def order(self, first: str | None) -> list[Provider]:
        """The providers to try: ``first`` (a provider id) ahead of the rest; an unknown id changes nothing."""
        chosen = [provider for provider in self.providers if provider.id == first]
        return chosen + [provider for provider in self.providers if provider.id != first]

    async def complete(
        self, messages: Sequence[ChatMessage], *, session_id: str | None = None, first: str | None = None
    ) -> Completion:
        """The reply of the first provider that answers (``first`` tried first); else :class:`AllProvidersFailed`."""
        errors: list[ProviderError] = []
        for provider in self.order(first):
            started = time.perf_counter()
            try:
                reply = await provider.complete(messages)
            except ProviderError as error:
                self._record(provider, started, error)
                errors.append(error)
                continue
            self._record(provider, started, None)
            return Completion(text=reply.text, provider=provider.id, usage=reply.usage)
        ALL_PROVIDERS_FAILED.inc()
        raise AllProvidersFailed(errors, session_id=session_id)

    async def stream(
        self, messages: Sequence[ChatMessage], *, session_id: str | None = None, first: str | None = None
    ) -> AsyncGenerator[Delta, None]:
        """The first provider's reply as it comes (``first`` tried first); failover only before its first piece.

        Yields at least one :class:`Delta` (an empty reply is one empty piece,
        naming its provider). Raises :class:`AllProvidersFailed`: every provider
        failed before its first piece, or the one that had started failed.
        """
        errors: list[ProviderError] = []
        for provider in self.order(first):
            started = time.perf_counter()
            produced = False
            try:
                async for piece in provider.stream(messages):
                    if isinstance(piece, Usage):
                        yield Delta("", provider.id, usage=piece)
                    elif piece:
                        produced = True
                        yield Delta(piece, provider.id)
            except ProviderError as error:
                self._record(provider, started, error)
                if produced:
                    raise AllProvidersFailed([error], session_id=session_id) from None
                errors.append(error)
                continue
            self._record(provider, started, None)
            if not produced:
                yield Delta("", provider.id)
            return
        ALL_PROVIDERS_FAILED.inc()
        raise AllProvidersFailed(errors, session_id=session_id)

    @staticmethod
    def _record(provider: Provider, started: float, error: ProviderError | None) -> None:
        PROVIDER_SECONDS.labels(provider=provider.id).observe(time.perf_counter() - started)
        PROVIDER_CALLS.labels(provider=provider.id, outcome="ok" if error is None else "error").inc()
        if error is not None:
            PROVIDER_FAILURES.labels(provider=provider.id, reason=error.reason).inc()
            log.warning("provider failed: %s", error)

    async def aclose(self) -> None:
        for provider in self.providers:
            await provider.aclose()


def build_failover(settings: GatewaySettings, *, transport: httpx.AsyncBaseTransport | None = None) -> Failover:
    """The ``providers`` list of ``settings`` as a :class:`Failover` (``transport`` for every openai provider)."""
    return Failover([
        EchoProvider(p) if p.type == "echo" else OpenAIProvider(p, transport=transport)
        for p in settings.providers
    ])
