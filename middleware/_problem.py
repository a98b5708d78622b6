"""RFC 9457 problem+json answers, rendered once from a typed error.

Every error a client sees is a :class:`SessionGateError`; this module is the
only place that turns one into bytes on the wire. The raw-ASGI path
(:func:`send_problem`, used by :class:`SessionGate` where no Starlette request
exists) and the Starlette path (:func:`problem_response`, used by the gateway's
exception handlers) both call :func:`render_problem`, so the two can never
drift apart.

Retryable errors (:class:`RetryableError`) carry ``Retry-After`` in whole
seconds (at least 1, rounded up from ``retryAfterMs``), the finer estimate as
``retry-after-ms`` (the OpenAI and Anthropic SDKs read it before
``Retry-After``), ``x-should-retry: true`` and ``Cache-Control: no-store``, so
no cache keeps a transient refusal. Every other error carries
``x-should-retry: false``: those SDKs otherwise resend a 409 or any 5xx.

The body has one of two formats (:class:`ErrorFormat`), chosen per route and
kept in the scope (:func:`use_error_format`): RFC 9457 problem+json by
default, or another wire format a route speaks (the gateway's OpenAI-style
``{"error": {...}}``). Status and headers are the same in every format.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_string  # what json.dumps uses for strings
from typing import Any

from starlette.responses import Response
from starlette.types import Scope, Send

from ._config import Settings
from ._errors import QueueFull, RateLimited, RetryableError, SessionBusy, SessionGateError

__all__ = [
    "ERROR_FORMAT_STATE_KEY",
    "EXPOSED_HEADERS",
    "PROBLEM_CONTENT_TYPE",
    "PROBLEM_JSON",
    "PROBLEM_TYPE_BASE",
    "REQUEST_ID",
    "ErrorFormat",
    "RenderedProblem",
    "error_format_of",
    "problem_body",
    "problem_headers",
    "problem_json",
    "problem_response",
    "problem_status",
    "public_detail",
    "ratelimit_fields",
    "render_problem",
    "retry_after_seconds",
    "send_problem",
    "use_error_format",
]

# The id the log knows the current request by (set by the embedding app, e.g. the gateway's request log).
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
PROBLEM_CONTENT_TYPE = "application/problem+json"
# A tag URI (RFC 4151), as RFC 9457 section 3.1.1 suggests for types that are not meant to be dereferenced.
PROBLEM_TYPE_BASE = "tag:sessiongate,2026:problems/"
# What a browser client must be able to read from a contention answer (for CORS ``expose_headers``).
EXPOSED_HEADERS = (
    "Retry-After", "retry-after-ms", "x-should-retry", "RateLimit", "RateLimit-Policy", "Idempotent-Replayed", "Link",
)
ERROR_FORMAT_STATE_KEY = "sessiongate.error_format"
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))  # one encoder, not one per answer as json.dumps(separators=...)
log = logging.getLogger("sessiongate.problem")


@dataclass(frozen=True)
class RenderedProblem:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def retry_after_seconds(retry_after_ms: int) -> int:
    """``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(retry_after_ms / 1000))


def problem_status(error: SessionGateError, settings: Settings) -> int:
    """The HTTP status for ``error``: its default, or ``contention.status`` for ``session-busy``."""
    return settings.contention.status if isinstance(error, SessionBusy) else error.default_status


def problem_body(error: SessionGateError, status: int) -> dict[str, Any]:
    """The RFC 9457 members of ``error``, plus the extension members of its type."""
    return {"type": PROBLEM_TYPE_BASE + error.problem_type, "title": error.title, "status": status,
            **_variable_members(error, status)}


def public_detail(error: SessionGateError, status: int) -> str:
    """``detail`` as the client may see it: a server fault's own detail (paths, hosts) goes to the log only.

    The client gets the request id instead, which finds the logged detail.
    """
    if status < 500 or error.detail_is_public:
        return error.detail
    request_id = REQUEST_ID.get()
    log.error("%s answered to the client: %s", error.problem_type, error.detail)
    reference = f"request id {request_id}" if request_id else "the time of the request"
    return f"{error.title}; the details are in the server log under {reference}"


def _variable_members(error: SessionGateError, status: int) -> dict[str, Any]:
    """The members that change from answer to answer (all but type, title and status)."""
    members: dict[str, Any] = {"detail": public_detail(error, status)}
    if error.session_id is not None:
        members["sessionId"] = error.session_id
    if isinstance(error, RetryableError):
        members["retryAfterMs"] = error.retry_after_ms
    if isinstance(error, RateLimited):
        members.update(policy=error.policy, limit=error.limit, remaining=error.remaining, windowSeconds=error.window_s)
    if isinstance(error, QueueFull):
        members["queueCap"] = error.queue_cap
    if isinstance(error, SessionBusy) and error.running_turn is not None:
        members["turnId"] = error.running_turn.turn_id
    return members


@functools.lru_cache(maxsize=256)
def _body_head(problem_type: str, title: str, status: int) -> str:
    """``{"type":…,"title":…,"status":…`` of one kind of answer, encoded once (no closing brace)."""
    return _COMPACT_JSON.encode({"type": PROBLEM_TYPE_BASE + problem_type, "title": title, "status": status})[:-1]


def _json_member(name: str, value: Any) -> str:
    kind = type(value)  # strings and integers (almost every member) skip the encoder's set-up
    if kind is str:
        encoded = _json_string(value)
    elif kind is int:
        encoded = int.__repr__(value)
    else:
        encoded = _COMPACT_JSON.encode(value)
    return f",{_json_string(name)}:{encoded}"


def problem_json(error: SessionGateError, status: int) -> bytes:
    """:func:`problem_body` as compact JSON: the constant head is cached, only the rest is encoded."""
    members = "".join([_json_member(name, value) for name, value in _variable_members(error, status).items()])
    return f"{_body_head(error.problem_type, error.title, status)}{members}}}".encode()


def problem_headers(error: SessionGateError) -> list[tuple[str, str]]:
    """Headers of the answer besides ``Content-Type``: the retry hints, caching, RateLimit fields."""
    if not isinstance(error, RetryableError):
        return [("x-should-retry", "false")]
    headers = [
        ("Retry-After", str(retry_after_seconds(error.retry_after_ms))),
        ("retry-after-ms", str(error.retry_after_ms)),
        ("x-should-retry", "true"),
        ("Cache-Control", "no-store"),
    ]
    if isinstance(error, RateLimited):
        headers.extend(ratelimit_fields(error))
    if isinstance(error, SessionBusy) and error.running_turn is not None and error.running_turn.monitor:
        headers.append(("Link", f'<{error.running_turn.monitor}>; rel="monitor"'))
    return headers


def ratelimit_fields(error: RateLimited) -> list[tuple[str, str]]:
    """``RateLimit-Policy`` / ``RateLimit`` in the syntax of draft-ietf-httpapi-ratelimit-headers-10.

    Both are Structured Field lists of a policy name with parameters: ``q``
    (quota) and ``w`` (window, seconds) for the policy, ``r`` (remaining) and
    ``t`` (seconds until quota is available again) for the current state.
    """
    name = json.dumps(error.policy)  # an sf-string: quoted, with \\ and \" escaped
    return [
        ("RateLimit-Policy", f"{name};q={error.limit};w={error.window_s}"),
        ("RateLimit", f"{name};r={error.remaining};t={retry_after_seconds(error.retry_after_ms)}"),
    ]


@dataclass(frozen=True)
class ErrorFormat:
    """How an error's body is written on one route: its media type and ``body(error, status)``."""

    media_type: str
    body: Callable[[SessionGateError, int], bytes]


PROBLEM_JSON = ErrorFormat(PROBLEM_CONTENT_TYPE, problem_json)


def use_error_format(scope: Scope, error_format: ErrorFormat) -> None:
    """Answer every error of this request in ``error_format`` (set before any middleware may refuse it)."""
    scope.setdefault("state", {})[ERROR_FORMAT_STATE_KEY] = error_format


def error_format_of(scope: Scope) -> ErrorFormat:
    """The error format chosen for this request: :data:`PROBLEM_JSON` unless a route chose another."""
    state = scope.get("state")
    return state.get(ERROR_FORMAT_STATE_KEY, PROBLEM_JSON) if state else PROBLEM_JSON


def render_problem(
    error: SessionGateError, status: int | None = None, error_format: ErrorFormat = PROBLEM_JSON
) -> RenderedProblem:
    """Status, headers and body of the answer for ``error`` (``status`` overrides the default)."""
    status = status or error.default_status
    body = error_format.body(error, status)
    headers = [("Content-Type", error_format.media_type), *problem_headers(error)]
    return RenderedProblem(status, headers, body)


def problem_response(
    error: SessionGateError, status: int | None = None, error_format: ErrorFormat = PROBLEM_JSON
) -> Response:
    """A Starlette response for ``error`` (for exception handlers)."""
    problem = render_problem(error, status, error_format)
    return Response(
        problem.body,
        status_code=problem.status,
        headers=dict(problem.headers),
        media_type=error_format.media_type,
    )


@functools.cache
def _raw_name(name: str) -> bytes:
    """A header name as raw ASGI wants it (lowercase bytes), encoded once per name."""
    return name.lower().encode("latin-1")


async def send_problem(
    send: Send, error: SessionGateError, status: int | None = None, error_format: ErrorFormat = PROBLEM_JSON
) -> None:
    """Answer ``error`` on a raw ASGI ``send`` (the response must not have started)."""
    problem = render_problem(error, status, error_format)
    headers = [(_raw_name(name), value.encode("latin-1")) for name, value in problem.headers]
    headers.append((b"content-length", b"%d" % len(problem.body)))
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": problem.body, "more_body": False})
