"""sessiongate's session layer: locks, lanes and contention middleware for ASGI chat gateways.

Usable without the ``app`` package. Everything public is re-exported here;
the underscore modules behind it are private and may change.
"""

from ._backend import Backend, open_backend
from ._config import Settings
from ._errors import (
    BackendUnavailable,
    ConfigError,
    FencedOut,
    IdempotencyInFlight,
    IdempotencyKeyReused,
    InvalidRequest,
    InvalidSessionId,
    LockTimeout,
    PayloadTooLarge,
    QueueFull,
    RateLimited,
    RetryableError,
    SessionBusy,
    SessionGateError,
    Unauthorized,
)
from ._gate import SessionGate, client_address, lane_of
from ._ids import file_stem, is_valid_session_id, validate_session_id
from ._lanes import LaneGrant
from ._problem import EXPOSED_HEADERS, problem_response, problem_status, send_problem
from ._store import TranscriptStore

__all__ = [
    "EXPOSED_HEADERS",
    "Backend",
    "BackendUnavailable",
    "ConfigError",
    "FencedOut",
    "IdempotencyInFlight",
    "IdempotencyKeyReused",
    "InvalidRequest",
    "InvalidSessionId",
    "LaneGrant",
    "LockTimeout",
    "PayloadTooLarge",
    "QueueFull",
    "RateLimited",
    "RetryableError",
    "SessionBusy",
    "SessionGate",
    "SessionGateError",
    "Settings",
    "TranscriptStore",
    "Unauthorized",
    "client_address",
    "file_stem",
    "is_valid_session_id",
    "lane_of",
    "open_backend",
    "problem_response",
    "problem_status",
    "send_problem",
    "validate_session_id",
]
