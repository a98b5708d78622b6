"""Python client of the sessiongate messages API that honours Retry-After.

A busy session is not an error to a well-behaved client: it is an answer
(409/429 with ``Retry-After`` and ``retryAfterMs``) saying when to come back.
This client sends every logical message with one ``Idempotency-Key`` — generated
once, reused on every retry — so a retry after a lost reply can never make the
gateway run the turn twice. The retry policy is tenacity's: retry only what is
retryable (409, 429, 503, connection errors), wait what the server asked (plus
jitter, so clients that were refused together do not come back together), and
stop within a bounded number of attempts and total time.

``SessionGateClient`` is synchronous; ``AsyncSessionGateClient`` is its
``asyncio`` twin with the same names.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import tenacity

from .paths import messages_path

RETRYABLE_STATUSES = frozenset({409, 429, 503})
DEFAULT_URL = "http://127.0.0.1:8787"


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
        return self.status in RETRYABLE_STATUSES


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
    error = retry_state.outcome.exception()
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
        self.http = self._http_class(base_url=self.base_url, headers=headers, transport=transport, timeout=timeout_s)

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

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> SessionGateClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncSessionGateClient(_ClientBase):
    """The ``asyncio`` twin of :class:`SessionGateClient`, name for name."""

    _http_class = httpx.AsyncClient

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

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncSessionGateClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
