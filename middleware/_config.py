"""Configuration: defaults < JSON file < environment < CLI, validated by pydantic.

Keys are camelCase in the file (``sessionWriteLock.timeoutMs``) and
``SESSIONGATE_`` + UPPER_SNAKE path with ``__`` between levels in the
environment (``SESSIONGATE_SESSION_WRITE_LOCK__TIMEOUT_MS``). Pydantic does
the type coercion and range checks; this module only merges the sources and
turns pydantic's errors into :class:`ConfigError`\\ s that name the key and
where its value came from.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import urlsplit

import limits
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from ._errors import ConfigError
from .storage import check_scheme, scheme_of

__all__ = [
    "BackendSettings",
    "CONFIG_PATH_ENV",
    "ContentionSettings",
    "IdempotencySettings",
    "LaneSettings",
    "RateLimitSettings",
    "SessionWriteLockSettings",
    "Settings",
    "SettingsSection",
    "TranscriptSettings",
    "redis_address",
]

ENV_PREFIX = "SESSIONGATE_"
CONFIG_PATH_ENV = "SESSIONGATE_CONFIG"


class SettingsSection(BaseModel):
    """Common model behaviour: camelCase keys, unknown keys refused, no coercion of bool/str mixups."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


class SessionWriteLockSettings(SettingsSection):
    timeout_ms: int = Field(2_000, ge=0, le=600_000, description="longest wait for the write lock")
    stale_ms: int = Field(
        30_000,
        ge=100,
        le=86_400_000,
        description="a holder silent (no heartbeat) this long loses its lock (lanes too)",
    )


class LaneSettings(SettingsSection):
    mode: Literal["reject", "queue", "interrupt", "collect"] = "reject"
    max_wait_ms: int = Field(0, ge=0, le=600_000, description="0 is a non-blocking try")
    queue_cap: int = Field(8, ge=1, le=10_000)
    queue_wait_ms: int = Field(
        120_000, ge=0, le=3_600_000,
        description="queue, interrupt and collect modes: longest wait for the lane before session-busy",
    )
    debounce_ms: int = Field(
        0, ge=0, le=60_000, description="collect mode: the next turn waits this long after the last message"
    )


class ContentionSettings(SettingsSection):
    status: Literal[409, 429] = 409


class RateLimitSettings(SettingsSection):
    per_session: str | None = "60/minute"
    per_sender: str | None = "120/minute"

    @field_validator("per_session", "per_sender")
    @classmethod
    def _parse_with_limits(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            try:
                limits.parse_many(value)
            except ValueError as exc:
                raise ValueError(f"not a limits rate string like '30/minute': {exc}") from None
            return value
        return None


class BackendSettings(SettingsSection):
    url: str = "file://"
    key_prefix: str = Field("sessiongate", min_length=1, max_length=64)
    max_connections: int = Field(
        100, ge=1, le=10_000, description="redis: connections per process; more concurrent commands wait for one"
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        return check_scheme(value)


TRANSCRIPT_SCHEMES = ("file", "redis", "rediss")  # the transcript stores (sessiongate.transcripts)


def redis_address(url: str) -> tuple[str, str, int, int]:
    """``(scheme, host, port, db)`` of a ``redis://host:port/db`` URL, defaults filled in."""
    parts = urlsplit(url)
    db = parts.path.strip("/") or "0"
    return parts.scheme, parts.hostname or "localhost", parts.port or 6379, int(db) if db.isdecimal() else -1


class TranscriptSettings(SettingsSection):
    url: str = Field(
        "file://", description="file:// (<dataDir>/sessions/*.jsonl) or redis://host:port/db (the backend's Redis)"
    )
    fsync: Literal["always", "never"] = "always"

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if scheme_of(value) not in TRANSCRIPT_SCHEMES or (scheme_of(value) == "file" and value != "file://"):
            raise ValueError("must be file:// or start with redis:// or rediss://")
        return value


class IdempotencySettings(SettingsSection):
    ttl_ms: int = Field(86_400_000, ge=1_000, le=30 * 86_400_000)


class Settings(SettingsSection):
    """The session layer's configuration. ``Settings()`` is the embedded default: it runs as is.

    An application adds its own sections by subclassing (the gateway's
    ``GatewaySettings`` adds providers, channels, auth and server); loading,
    environment names and error messages are inherited unchanged.
    """

    data_dir: Path = Path("./data")
    session_write_lock: SessionWriteLockSettings = SessionWriteLockSettings()
    lane: LaneSettings = LaneSettings()
    contention: ContentionSettings = ContentionSettings()
    rate_limits: RateLimitSettings = RateLimitSettings()
    backend: BackendSettings = BackendSettings()
    transcript: TranscriptSettings = TranscriptSettings()
    idempotency: IdempotencySettings = IdempotencySettings()

    @model_validator(mode="after")
    def _transcripts_beside_their_fences(self) -> Self:
        """Redis transcripts are fenced by the lease storage's fence counter, so both must be one Redis."""
        url = self.transcript.url
        if scheme_of(url) != "file" and redis_address(url) != redis_address(self.backend.url):
            raise ValueError(
                "transcript.url must name the Redis server and db of backend.url: an append checks its fence"
                f" there inside Redis (transcript.url {redis_address(url)[1:]}, backend.url {self.backend.url!r})"
            )
        return self

    @property
    def sessions_dir(self) -> Path:
        return self.data_dir / "sessions"

    @property
    def file_storage_root(self) -> Path:
        """Where the file backend keeps ``locks/`` and ``records/``: ``file:///path``, else the data dir."""
        return Path(self.backend.url.split("://", 1)[1] or self.data_dir)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Self:
        """Build settings from file (``path`` or ``$SESSIONGATE_CONFIG``), environment and CLI overrides.

        ``overrides`` uses camelCase keys (``{"dataDir": "/x", "server": {"port": 1}}``).
        Raises :class:`ConfigError` naming the first offending key.
        """
        env = os.environ if env is None else env
        path = path or env.get(CONFIG_PATH_ENV) or None
        layers: list[tuple[dict[str, Any], dict[str, str]]] = []
        if path is not None:
            layers.append(_read_file(Path(path)))
        layers.append(_read_env(env))
        if overrides:
            cli = dict(overrides)
            layers.append((cli, {key: "the command line" for key in _key_paths(cli)}))
        merged: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for values, origin in layers:
            _deep_merge(merged, values)
            sources.update(origin)
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            raise _config_error(exc, sources) from None


def _read_file(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("(file)", f"cannot read {path}: {exc.strerror}", source=str(path)) from None
    try:
        values = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            "(file)", f"not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
            source=str(path),
        ) from None
    if not isinstance(values, dict):
        raise ConfigError("(file)", "the top level must be a JSON object", source=str(path))
    return values, {key: str(path) for key in _key_paths(values)}


def _read_env(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``SESSIONGATE_A_B__C_D=v`` becomes ``{"aB": {"cD": v}}``; JSON for lists and objects."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, raw in env.items():
        if not name.upper().startswith(ENV_PREFIX) or name.upper() == CONFIG_PATH_ENV:
            continue
        parts = [to_camel(part.lower()) for part in name[len(ENV_PREFIX):].split("__")]
        if not all(parts):
            raise ConfigError(name, "empty key segment in environment variable name", source=name)
        value: Any = raw
        if raw.lstrip()[:1] in ("[", "{"):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(".".join(parts), f"not valid JSON: {exc.msg}", source=name) from None
        node = values
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        sources[".".join(parts)] = name
    return values, sources


def _deep_merge(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def _key_paths(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(value, Mapping):
            paths.extend(_key_paths(value, f"{path}."))
    return paths


def _config_error(exc: ValidationError, sources: Mapping[str, str]) -> ConfigError:
    """The first pydantic error as a ConfigError with a camelCase key path and its source."""
    error = exc.errors(include_url=False)[0]
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        problem = "unknown key"
    else:
        problem = error["msg"]
        if "input" in error and not isinstance(error["input"], (dict, list)):
            problem += f" (got {error['input']!r})"
    source = None
    probe = key
    while probe:
        source = sources.get(probe)
        if source:
            break
        probe = re.sub(r"\.?[^.]*$", "", probe)
    return ConfigError(key, problem, source=source)
