"""Typed errors of sessiongate.

Every error a client can see maps to one problem type of the contract
(``problem_type``) and a default HTTP status. Retryable errors carry
``retry_after_ms`` so callers never parse strings to know when to come back.

None of these is a provider error: the gateway's failover walks its provider
list only on ``sessiongate.gateway.providers.ProviderError``, so a lock or lane problem can
never read as "all models failed".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "BackendUnavailable",
    "ClientGone",
    "ConfigError",
    "FencedOut",
    "IdempotencyInFlight",
    "IdempotencyKeyReused",
    "InvalidRequest",
    "InvalidSessionId",
    "LockTimeout",
    "PayloadTooLarge",
    "QueueFull",
    "RateLimited",
    "RetryableError",
    "RunningTurn",
    "SessionBusy",
    "SessionGateError",
    "StorageFailed",
    "TurnCancelled",
    "Unauthorized",
    "UnsupportedMediaType",
]


@dataclass(frozen=True)
class RunningTurn:
    """The turn a busy session is running: named in its ``session-busy`` answer.

    ``monitor`` is where to watch it (the ``Link: <monitor>; rel="monitor"``
    header); the embedding app decides the URL, the library only renders it.
    """

    turn_id: str
    monitor: str | None = None


class SessionGateError(Exception):
    """Base class of every error raised by the ``middleware`` package."""

    problem_type: ClassVar[str] = "internal-error"
    default_status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    # A 5xx detail may name server paths or hosts: only errors that say so show it to clients.
    detail_is_public: ClassVar[bool] = False

    def __init__(self, detail: str, *, session_id: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.session_id = session_id


class RetryableError(SessionGateError):
    """An error the client should retry after ``retry_after_ms``."""

    def __init__(
        self, detail: str, *, retry_after_ms: int, session_id: str | None = None
    ) -> None:
        super().__init__(detail, session_id=session_id)
        self.retry_after_ms = max(1, int(retry_after_ms))


class SessionBusy(RetryableError):
    """The session's lane or write lock was not had within its wait.

    ``running_turn`` names the turn that holds the lane, when the app told the
    gate (see ``SessionGate(turns=...)``).
    """

    problem_type = "session-busy"
    default_status = 409
    title = "Session busy"
    running_turn: RunningTurn | None = None


class LockTimeout(SessionBusy):
    """The transcript write lock was not had within ``sessionWriteLock.timeoutMs``."""

    def __init__(
        self, session_id: str, *, waited_ms: float, retry_after_ms: int
    ) -> None:
        super().__init__(
            f"the transcript write lock of session {session_id!r} was not had "
            f"within {waited_ms:.0f} ms",
            retry_after_ms=retry_after_ms,
            session_id=session_id,
        )
        self.waited_ms = waited_ms


class FencedOut(SessionBusy):
    """A write came with a fencing token older than the newest issued.

    The writer lost its lane (it was stale and another holder took over), so
    its turn no longer has the right to write. Answered as ``session-busy``.
    """

    def __init__(
        self, session_id: str, *, fence: int, current_fence: int, retry_after_ms: int = 1000
    ) -> None:
        super().__init__(
            f"write to session {session_id!r} refused: fencing token {fence} is older "
            f"than the newest issued ({current_fence}); the turn lost its lane",
            retry_after_ms=retry_after_ms,
            session_id=session_id,
        )
        self.fence = fence
        self.current_fence = current_fence


class TurnCancelled(SessionGateError):
    """The turn was cancelled (``DELETE .../turns/current``) or interrupted by a newer message.

    Not retryable: the user's message is in the transcript already, beside the
    partial reply marked ``"interrupted": true``.
    """

    problem_type = "turn-cancelled"
    default_status = 409
    title = "Turn cancelled"


class QueueFull(RetryableError):
    """``queue`` mode and the session's queue is at ``lane.queueCap``."""

    problem_type = "queue-full"
    default_status = 429
    title = "Session queue full"

    def __init__(self, session_id: str, *, queue_cap: int, retry_after_ms: int) -> None:
        super().__init__(
            f"session {session_id!r} already has {queue_cap} messages waiting",
            retry_after_ms=retry_after_ms,
            session_id=session_id,
        )
        self.queue_cap = queue_cap


class RateLimited(RetryableError):
    """A ``rateLimits`` quota is spent."""

    problem_type = "rate-limited"
    default_status = 429
    title = "Rate limited"

    def __init__(
        self,
        detail: str,
        *,
        retry_after_ms: int,
        limit: int,
        remaining: int,
        window_s: int,
        policy: str,
        session_id: str | None = None,
    ) -> None:
        super().__init__(detail, retry_after_ms=retry_after_ms, session_id=session_id)
        self.limit = limit
        self.remaining = remaining
        self.window_s = window_s
        self.policy = policy


class IdempotencyInFlight(RetryableError):
    """The same ``Idempotency-Key`` is still being processed."""

    problem_type = "idempotency-in-flight"
    default_status = 409
    title = "Request with this Idempotency-Key in flight"


class IdempotencyKeyReused(SessionGateError):
    """The same ``Idempotency-Key`` came with a different request body."""

    problem_type = "idempotency-key-reused"
    default_status = 422
    title = "Idempotency-Key reused with a different request"


class BackendUnavailable(RetryableError):
    """The lock backend (e.g. Redis) cannot be reached."""

    problem_type = "backend-unavailable"
    default_status = 503
    title = "Lock backend unavailable"

    def __init__(self, detail: str, *, retry_after_ms: int = 1000) -> None:
        super().__init__(detail, retry_after_ms=retry_after_ms)


class StorageFailed(SessionGateError):
    """The transcript could not be written (disk full, file-size limit); nothing of the turn was kept."""

    problem_type = "storage-failed"
    default_status = 507
    title = "Storage failed"


class InvalidRequest(SessionGateError):
    """Malformed JSON, missing or wrong fields."""

    problem_type = "invalid-request"
    default_status = 400
    title = "Invalid request"


class InvalidSessionId(InvalidRequest):
    """A session id outside the contract's alphabet or length."""

    problem_type = "invalid-session-id"
    title = "Invalid session id"

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session id {session_id[:160]!r} is not 1-128 characters of [A-Za-z0-9._:@-]"
            " (and not '.' or '..')"
        )
        self.session_id = None  # never echo an invalid id back as if it were one


class UnsupportedMediaType(SessionGateError):
    """A JSON route called with another ``Content-Type`` (e.g. a browser's ``text/plain`` "simple" request)."""

    problem_type = "unsupported-media-type"
    default_status = 415
    title = "Unsupported media type"


class PayloadTooLarge(SessionGateError):
    """The request body is over the configured limit."""

    problem_type = "payload-too-large"
    default_status = 413
    title = "Payload too large"

    @classmethod
    def over_limit(cls, max_bytes: int) -> PayloadTooLarge:
        return cls(f"the request body is over the limit of {max_bytes} bytes (server.maxBodyBytes)")


class Unauthorized(SessionGateError):
    """A bad or missing bearer token, webhook secret or signature."""

    problem_type = "unauthorized"
    default_status = 401
    title = "Unauthorized"


class ClientGone(Exception):
    """The client of a request waiting for its session's lane went away; nobody is left to answer.

    Not a :class:`SessionGateError`: there is no answer to render. The wait
    ends at once, giving up the request's queue place.
    """

    def __init__(self, session_id: str) -> None:
        super().__init__(f"the client waiting for session {session_id!r} went away")
        self.session_id = session_id


class ConfigError(SessionGateError, ValueError):
    """A configuration value is unknown, of the wrong type, or out of range.

    ``key`` is the camelCase path (``sessionWriteLock.timeoutMs``) and
    ``source`` where the value came from (a file path, an environment
    variable, a CLI flag), so the message points at what to fix.
    """

    def __init__(self, key: str, problem: str, *, source: str | None = None) -> None:
        where = f" (from {source})" if source else ""
        super().__init__(f"config error: {key}: {problem}{where}")
        self.key = key
        self.problem = problem
        self.source = source
