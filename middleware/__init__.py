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
    StorageFailed,
    Unauthorized,
    UnsupportedMediaType,
)
from ._gate import SessionGate, lane_of
from ._ids import validate_session_id
from ._lanes import LaneGrant
from ._problem import REQUEST_ID
from ._store import TranscriptStore

__all__ = [
    "REQUEST_ID",
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
    "StorageFailed",
    "TranscriptStore",
    "Unauthorized",
    "UnsupportedMediaType",
    "lane_of",
    "open_backend",
    "validate_session_id",
]
