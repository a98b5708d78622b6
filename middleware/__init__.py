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
from ._gate import SessionGate, lane_of
from ._ids import validate_session_id
from ._lanes import LaneGrant
from ._store import TranscriptStore
from .storage import Holder, HolderState, LeaseKind, LeaseStorage, RecordStorage

__all__ = [
    "Backend",
    "BackendUnavailable",
    "ConfigError",
    "FencedOut",
    "Holder",
    "HolderState",
    "IdempotencyInFlight",
    "IdempotencyKeyReused",
    "InvalidRequest",
    "InvalidSessionId",
    "LaneGrant",
    "LeaseKind",
    "LeaseStorage",
    "LockTimeout",
    "PayloadTooLarge",
    "QueueFull",
    "RateLimited",
    "RecordStorage",
    "RetryableError",
    "SessionBusy",
    "SessionGate",
    "SessionGateError",
    "Settings",
    "TranscriptStore",
    "Unauthorized",
    "lane_of",
    "open_backend",
    "validate_session_id",
]
