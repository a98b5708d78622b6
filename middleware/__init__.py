"""sessiongate: session locks, lanes and contention middleware for ASGI chat gateways.

Everything public is re-exported here; the underscore modules behind it are
private and may change. The gateway (``sessiongate.gateway``) imports nothing else.
"""

from importlib.metadata import PackageNotFoundError, version

from ._backend import Backend, open_backend
from ._config import CONFIG_PATH_ENV, Settings, SettingsSection
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
    RunningTurn,
    SessionBusy,
    SessionGateError,
    StorageFailed,
    TurnCancelled,
    Unauthorized,
    UnsupportedMediaType,
)
from ._gate import (
    DEFAULT_MAX_BODY_BYTES,
    Admission,
    BodyParser,
    SessionGate,
    SessionKey,
    TurnControl,
    admission_of,
    client_address,
    lane_of,
    parsed_body,
    take_lane,
)
from ._idempotency import MAX_KEY_LENGTH as MAX_IDEMPOTENCY_KEY_LENGTH
from ._idempotency import idempotency_key
from ._ids import (
    SESSION_ID_PATTERN,
    existing_file,
    file_stem,
    is_valid_session_id,
    session_id_from_stem,
    validate_session_id,
)
from ._lanes import LaneGrant
from ._problem import (
    EXPOSED_HEADERS,
    PROBLEM_CONTENT_TYPE,
    PROBLEM_TYPE_BASE,
    REQUEST_ID,
    ErrorFormat,
    error_format_of,
    problem_body,
    problem_response,
    problem_status,
    send_problem,
    use_error_format,
)
from ._store import FileTranscriptStore
from .storage import Holder, HolderState, LeaseKind, LeaseStorage, RecordStorage
from .transcripts import Durability, LockedTranscript, Page, TranscriptStore, new_record_id, open_transcripts, utc_now

try:
    __version__ = version("sessiongate")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CONFIG_PATH_ENV",
    "DEFAULT_MAX_BODY_BYTES",
    "EXPOSED_HEADERS",
    "MAX_IDEMPOTENCY_KEY_LENGTH",
    "PROBLEM_CONTENT_TYPE",
    "PROBLEM_TYPE_BASE",
    "REQUEST_ID",
    "SESSION_ID_PATTERN",
    "Admission",
    "Backend",
    "BackendUnavailable",
    "BodyParser",
    "ConfigError",
    "Durability",
    "ErrorFormat",
    "FencedOut",
    "FileTranscriptStore",
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
    "LockedTranscript",
    "Page",
    "PayloadTooLarge",
    "QueueFull",
    "RateLimited",
    "RecordStorage",
    "RetryableError",
    "RunningTurn",
    "SessionBusy",
    "SessionGate",
    "SessionGateError",
    "SessionKey",
    "Settings",
    "SettingsSection",
    "StorageFailed",
    "TranscriptStore",
    "TurnCancelled",
    "TurnControl",
    "Unauthorized",
    "UnsupportedMediaType",
    "__version__",
    "admission_of",
    "client_address",
    "existing_file",
    "file_stem",
    "idempotency_key",
    "error_format_of",
    "is_valid_session_id",
    "lane_of",
    "new_record_id",
    "open_transcripts",
    "open_backend",
    "parsed_body",
    "problem_body",
    "problem_response",
    "problem_status",
    "send_problem",
    "session_id_from_stem",
    "take_lane",
    "use_error_format",
    "utc_now",
    "validate_session_id",
]
