"""Python client of the sessiongate messages API that honours Retry-After.

A busy session is not an error to a well-behaved client: it is an answer
(409/429 with ``Retry-After`` and ``retryAfterMs``) saying when to come back.
This client sends every logical message with one ``Idempotency-Key`` — generated
once, reused on every retry — so a retry after a lost reply can never make the
gateway run the turn twice. The retry policy is tenacity's: retry only what is
retryable (409, 429, 503, connection errors), wait what the server asked (plus
jitter, so clients that were refused together do not come back together), and
stop within a bounded number of attempts and total time.

``stream`` sends a message and yields the turn's server-sent events as they
come (``turn``, ``delta``…, then ``done`` or ``error``); only the opening of
the stream is retried, never a stream that has started. ``attach`` follows a
session's running turn from its first event; ``cancel`` stops it.

``SessionGateClient`` is synchronous; ``AsyncSessionGateClient`` is its
``asyncio`` twin with the same names.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import tenacity

from .paths import current_turn_path, messages_path

__all__ = [
    "DEFAULT_URL",
    "EVENT_STREAM",
    "RETRYABLE_STATUSES",
    "AsyncSessionGateClient",
    "ClientError",
    "EventDecoder",
    "GaveUp",
    "ProblemError",
    "RetryNotice",
    "RetryPolicy",
    "ServerEvent",
    "SessionGateClient",
    "parse_response",
    "retry_after_ms",
]

RETRYABLE_STATUSES = frozenset({409, 429, 503})
DEFAULT_URL = "http://127.0.0.1:8787"
EVENT_STREAM = "text/event-stream"


class ClientError(Exception):
    """Base class of the errors this client raises."""


class ProblemError(ClientError):
    """The gateway answered with an error (an RFC 9457 problem, or something else non-2xx)."""

    def __init__(self, status: int, problem: dict[str, Any], *, retry_after_ms: int | None) -> None:
        self.status = status
        self.problem = problem
        self.type = str(problem.get("type", "about:blank")).rstrip("/").rsplit("/", 1)[-1]
        self.title = str(problem.get("title", httpx.codes.get_reason_phrase(status) or "Error"))
        self.detail = str(problem.get("detail", ""))
        self.retry_after_ms = retry_after_ms
        super().__init__(f"{status} {self.type}: {self.detail or self.title}")

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE_STATUSES and self.type != "turn-cancelled"


class GaveUp(ClientError):
    """The retry budget (attempts or total time) was spent; ``last`` is the final failure."""

    def __init__(self, last: BaseException, *, attempts: int, elapsed_s: float) -> None:
        self.last = last
        self.attempts = attempts
        self.elapsed_s = elapsed_s
        super().__init__(f"gave up after {attempts} attempts in {elapsed_s:.1f} s: {last}")


@dataclass(frozen=True)
class RetryNotice:
    """Passed to ``on_retry`` before each wait: what failed and how long the client will wait."""

    attempt: int
    error: BaseException
    wait_s: float


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds and pacing of retries.

    With a server hint the wait is the hint plus up to ``hint_jitter`` of it (never
    less than the server asked); without one (connection errors) it is full-jitter
    exponential backoff: uniform in ``[0, min(backoff_max_s, backoff_base_s * 2**n)]``.
    """

    max_attempts: int = 8
    total_s: float = 30.0
    backoff_base_s: float = 0.25
    backoff_max_s: float = 5.0
    hint_jitter: float = 0.5

    def tenacity_options(self, on_retry: Callable[[RetryNotice], None] | None) -> dict[str, Any]:
        options: dict[str, Any] = {
            "retry": tenacity.retry_if_exception(_is_retryable),
            "wait": _WaitForServerHint(self),
            "stop": tenacity.stop_after_attempt(self.max_attempts) | tenacity.stop_before_delay(self.total_s),
            "retry_error_callback": _give_up,
        }
        if on_retry is not None:
            options["before_sleep"] = lambda state: on_retry(
                RetryNotice(state.attempt_number, state.outcome.exception(), state.upcoming_sleep)
            )
        return options


class _WaitForServerHint(tenacity.wait.wait_base):
    """Wait what the server asked (``retryAfterMs``, else ``Retry-After``) plus jitter, else back off."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.backoff = tenacity.wait_random_exponential(
            multiplier=policy.backoff_base_s, max=policy.backoff_max_s
        )

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        hint_ms = error.retry_after_ms if isinstance(error, ProblemError) else None
        if hint_ms is None:
            return self.backoff(retry_state)
        hint_s = hint_ms / 1000
        return hint_s + random.uniform(0, hint_s * self.policy.hint_jitter)


def _is_retryable(error: BaseException) -> bool:
    if isinstance(error, ProblemError):
        return error.retryable
    return isinstance(error, httpx.TransportError)


def _give_up(retry_state: tenacity.RetryCallState) -> Any:
    """Called by tenacity when the budget is spent (non-retryable errors never get here)."""
    error = retry_state.outcome.exception() if retry_state.outcome is not None else None
    assert error is not None  # tenacity gives up only after an attempt that failed
    raise GaveUp(
        error, attempts=retry_state.attempt_number, elapsed_s=retry_state.seconds_since_start or 0.0
    ) from error


def retry_after_ms(response: httpx.Response, problem: dict[str, Any]) -> int | None:
    """The server's hint: ``retryAfterMs`` from the problem body, else the ``Retry-After`` header."""
    hint = problem.get("retryAfterMs")
    if isinstance(hint, (int, float)) and not isinstance(hint, bool) and hint >= 0:
        return int(hint)
    header = response.headers.get("Retry-After", "").strip()
    if header.isdigit():
        return int(header) * 1000
    if not header:
        return None
    try:
        wait_s = (parsedate_to_datetime(header) - datetime.now(UTC)).total_seconds()
    except (TypeError, ValueError):  # not a date, or one without a time zone
        return None
    return max(0, int(wait_s * 1000))


def parse_response(response: httpx.Response) -> dict[str, Any]:
    """The JSON body of a 2xx answer; a :class:`ProblemError` for anything else."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success and isinstance(body, dict):
        return body
    problem = body if isinstance(body, dict) else {"detail": response.text[:500]}
    raise ProblemError(response.status_code, problem, retry_after_ms=retry_after_ms(response, problem))


@dataclass(frozen=True)
class ServerEvent:
    """One server-sent event of a turn: ``turn``, ``delta``, ``done`` or ``error`` and its JSON data."""

    name: str
    data: dict[str, Any]


class EventDecoder:
    """``text/event-stream`` lines in, one :class:`ServerEvent` per event out (the subset the gateway sends)."""

    def __init__(self) -> None:
        self._name = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> ServerEvent | None:
        """The event a blank line completes, else ``None``."""
        if not line:
            event = ServerEvent(self._name, json.loads("\n".join(self._data))) if self._data else None
            self._name, self._data = "message", []
            return event
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            self._name = value
        elif field == "data":
            self._data.append(value)
        return None


class _ClientBase:
    """What both clients share: base URL, auth header, request shapes, retry policy.

    ``transport`` is httpx's seam (a real transport, or ``httpx.MockTransport``).
    """

    _http_class: type[httpx.Client] | type[httpx.AsyncClient]

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        *,
        timeout_s: float = 60.0,
        policy: RetryPolicy | None = None,
        on_retry: Callable[[RetryNotice], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.policy = policy or RetryPolicy()
        self.on_retry = on_retry
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = self._http_class(
            base_url=self.base_url, headers=headers, timeout=timeout_s,
            transport=transport,  # type: ignore[arg-type]  # each subclass is given its http class's kind
        )

    def _streamed_post(self, *args: Any) -> httpx.Request:
        request = self._post(*args)
        request["headers"]["Accept"] = EVENT_STREAM
        return self.http.build_request("POST", **request)

    def _post(self, session_id: str, text: str, sender: str | None, idempotency_key: str | None) -> dict[str, Any]:
        """``http.post`` arguments of one logical message: its key is chosen here, once."""
        body: dict[str, Any] = {"text": text}
        if sender is not None:
            body["sender"] = sender
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        return {"url": messages_path(session_id), "json": body, "headers": headers}

    def _retrying(self, retrying_class: type[tenacity.BaseRetrying]) -> Any:
        return retrying_class(**self.policy.tenacity_options(self.on_retry))


class SessionGateClient(_ClientBase):
    """Blocking client."""

    _http_class = httpx.Client
    http: httpx.Client

    def send(
        self, session_id: str, text: str, sender: str | None = None, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Post one message; retries with the same ``Idempotency-Key``. Returns the 200 body."""
        request = self._post(session_id, text, sender, idempotency_key)
        for attempt in self._retrying(tenacity.Retrying):
            with attempt:
                return parse_response(self.http.post(**request))
        raise AssertionError("unreachable: tenacity either returns or raises")

    def messages(self, session_id: str) -> list[dict[str, Any]]:
        """The session's transcript, in order."""
        return parse_response(self.http.get(messages_path(session_id)))["messages"]

    def stream(
        self, session_id: str, text: str, sender: str | None = None, idempotency_key: str | None = None
    ) -> Iterator[ServerEvent]:
        """Post one message and yield its turn's events; opening the stream is retried like :meth:`send`."""
        request = self._streamed_post(session_id, text, sender, idempotency_key)
        for attempt in self._retrying(tenacity.Retrying):
            with attempt:
                response = self._open(request)
        yield from self._events(response)

    def attach(self, session_id: str) -> Iterator[ServerEvent]:
        """The session's running turn from its first event (``ProblemError`` 404 when none runs)."""
        yield from self._events(self._open(self.http.build_request(
            "GET", current_turn_path(session_id), headers={"Accept": EVENT_STREAM})))

    def cancel(self, session_id: str) -> bool:
        """Cancel the session's running turn; ``False`` if none ran."""
        response = self.http.delete(current_turn_path(session_id))
        if response.status_code == 404:
            return False
        if response.status_code != 204:
            parse_response(response)  # raises for an error answer
        return True

    def _open(self, request: httpx.Request) -> httpx.Response:
        response = self.http.send(request, stream=True)
        if not response.is_success:
            response.read()
            response.close()
            parse_response(response)
        return response

    @staticmethod
    def _events(response: httpx.Response) -> Iterator[ServerEvent]:
        decoder = EventDecoder()
        try:
            for line in response.iter_lines():
                if (event := decoder.feed(line)) is not None:
                    yield event
        finally:
            response.close()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> SessionGateClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncSessionGateClient(_ClientBase):
    """The ``asyncio`` twin of :class:`SessionGateClient`, name for name."""

    _http_class = httpx.AsyncClient
    http: httpx.AsyncClient

    async def send(
        self, session_id: str, text: str, sender: str | None = None, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Post one message; retries with the same ``Idempotency-Key``. Returns the 200 body."""
        request = self._post(session_id, text, sender, idempotency_key)
        async for attempt in self._retrying(tenacity.AsyncRetrying):
            with attempt:
                return parse_response(await self.http.post(**request))
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def messages(self, session_id: str) -> list[dict[str, Any]]:
        """The session's transcript, in order."""
        return parse_response(await self.http.get(messages_path(session_id)))["messages"]

    async def stream(
        self, session_id: str, text: str, sender: str | None = None, idempotency_key: str | None = None
    ) -> AsyncIterator[ServerEvent]:
        """Post one message and yield its turn's events; opening the stream is retried like :meth:`send`."""
        request = self._streamed_post(session_id, text, sender, idempotency_key)
        async for attempt in self._retrying(tenacity.AsyncRetrying):
            with attempt:
                response = await self._open(request)
        async for event in self._events(response):
            yield event

    async def attach(self, session_id: str) -> AsyncIterator[ServerEvent]:
        """The session's running turn from its first event (``ProblemError`` 404 when none runs)."""
        response = await self._open(self.http.build_request(
            "GET", current_turn_path(session_id), headers={"Accept": EVENT_STREAM}))
        async for event in self._events(response):
            yield event

    async def cancel(self, session_id: str) -> bool:
        """Cancel the session's running turn; ``False`` if none ran."""
        response = await self.http.delete(current_turn_path(session_id))
        if response.status_code == 404:
            return False
        if response.status_code != 204:
            parse_response(response)  # raises for an error answer
        return True

    async def _open(self, request: httpx.Request) -> httpx.Response:
        response = await self.http.send(request, stream=True)
        if not response.is_success:
            await response.aread()
            await response.aclose()
            parse_response(response)
        return response

    @staticmethod
    async def _events(response: httpx.Response) -> AsyncIterator[ServerEvent]:
        decoder = EventDecoder()
        try:
            async for line in response.aiter_lines():
                if (event := decoder.feed(line)) is not None:
                    yield event
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncSessionGateClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
