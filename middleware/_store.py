"""Transcripts: one append-only JSONL file per session, crash-safe and fenced.

Every change happens under the session's write lock (held only for the file
work, never across a model call). An append is one ``write`` of all its lines
on an ``O_APPEND`` descriptor, then ``fsync`` per ``transcript.fsync``. A crash
mid-append can leave a torn last line; the next locked read or append moves
those bytes to a side file (``<name>.jsonl.torn-<time>``, kept for forensics)
and truncates the transcript to its last complete line. A write whose fencing
token is older than the session's newest comes from a turn that lost its lane
and is refused (:class:`FencedOut`).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio.to_thread

from ._backend import Backend
from ._config import Settings
from ._errors import FencedOut, SessionBusy, SessionGateError
from ._ids import file_stem, session_id_from_stem
from ._metrics import FENCING_REFUSALS
from ._write_lock import WriteLockHold

logger = logging.getLogger("sessiongate.store")

_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
_SUFFIX = ".jsonl"
_TAIL_CHUNK = 65_536


class TranscriptStore:
    """Read, repair and append the JSONL transcripts under ``<dataDir>/sessions``."""

    def __init__(self, backend: Backend, settings: Settings) -> None:
        self._backend = backend
        self.fsync = settings.transcript.fsync == "always"
        settings.sessions_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.sessions_dir = settings.sessions_dir.resolve()

    def path_for(self, session_id: str) -> Path:
        """The transcript path of a session; raises InvalidSessionId for a bad id."""
        path = self.sessions_dir / f"{file_stem(session_id)}{_SUFFIX}"
        if Path(os.path.realpath(path)).parent != self.sessions_dir:
            raise SessionGateError(f"transcript of {session_id!r} resolves outside {self.sessions_dir}")
        return path

    @asynccontextmanager
    async def locked(self, session_id: str) -> AsyncIterator[LockedTranscript]:
        """Hold the session's write lock for several steps (read, then append) as one critical section."""
        path = self.path_for(session_id)
        async with self._backend.write_lock(session_id) as hold:
            yield LockedTranscript(self, session_id, path, hold)

    async def read(self, session_id: str) -> list[dict[str, Any]]:
        """Every record, in order, under the write lock; a torn tail is set aside first."""
        async with self.locked(session_id) as transcript:
            return transcript.read()

    async def read_unlocked(self, session_id: str) -> list[dict[str, Any]]:
        """A lock-free snapshot (for GETs): complete lines only, a torn tail is skipped."""
        path = self.path_for(session_id)
        return _parse(_read_bytes(path, repair=False), path)

    async def append(
        self, session_id: str, records: list[dict[str, Any]], *, fence: int | None = None
    ) -> list[dict[str, Any]]:
        """Append ``records`` atomically under the write lock (see :meth:`LockedTranscript.append`)."""
        stored, payload = _prepared(records, fence)  # encoded before the lock: shorter holds
        async with self.locked(session_id) as transcript:
            await transcript._write(payload, fence)
        return stored

    def session_ids(self) -> list[str]:
        """Every session that has a transcript, sorted."""
        return sorted(
            session_id_from_stem(name[: -len(_SUFFIX)])
            for name in os.listdir(self.sessions_dir)
            if name.endswith(_SUFFIX)
        )



class LockedTranscript:
    """One session's transcript while its write lock is held (from :meth:`TranscriptStore.locked`)."""

    def __init__(self, store: TranscriptStore, session_id: str, path: Path, hold: WriteLockHold) -> None:
        self.session_id = session_id
        self.path = path
        self._store = store
        self._hold = hold

    def read(self) -> list[dict[str, Any]]:
        """Every record, in order; a torn tail is set aside first."""
        return _parse(_read_bytes(self.path, repair=True), self.path)

    async def append(self, records: list[dict[str, Any]], *, fence: int | None = None) -> list[dict[str, Any]]:
        """Append ``records`` in one write; fills ``id``/``at``, records ``fence``; returns what was stored.

        Raises :class:`FencedOut` when ``fence`` is older than the session's newest
        fencing token (the turn lost its lane).
        """
        stored, payload = _prepared(records, fence)
        await self._write(payload, fence)
        return stored

    async def _write(self, payload: bytes, fence: int | None) -> None:
        store = self._store
        if self._hold.lost:  # we stalled past staleMs and another writer took the lock over
            raise SessionBusy(
                f"the transcript write lock of session {self.session_id!r} was taken over",
                retry_after_ms=1,
                session_id=self.session_id,
            )
        if fence is not None:
            current = await store._backend.current_fence(self.session_id)
            if fence < current:
                FENCING_REFUSALS.inc()
                raise FencedOut(self.session_id, fence=fence, current_fence=current)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _OPEN_FLAGS, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                _set_aside_torn_tail(fd, self.path, size)
            _write_all(fd, payload)
            if store.fsync:
                await anyio.to_thread.run_sync(_fsync, fd, self.path.parent if size == 0 else None)
        finally:
            os.close(fd)


def _prepared(records: list[dict[str, Any]], fence: int | None) -> tuple[list[dict[str, Any]], bytes]:
    """The records as they will be stored, and their JSONL bytes."""
    stored = [_completed(record, fence) for record in records]
    return stored, b"".join(_encode(record) for record in stored)


def new_record_id() -> str:
    return uuid.uuid4().hex


def utc_now() -> str:
    """RFC 3339 UTC timestamp with milliseconds, e.g. ``2026-01-31T12:00:00.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _completed(record: dict[str, Any], fence: int | None) -> dict[str, Any]:
    done = dict(record)
    done.setdefault("id", new_record_id())
    done.setdefault("at", utc_now())
    done["fence"] = fence
    return done


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _write_all(fd: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]


def _fsync(fd: int, new_in_dir: Path | None) -> None:
    """Flush the file; a new file is durable only once its directory entry is flushed too."""
    os.fsync(fd)
    if new_in_dir is not None:
        dir_fd = os.open(new_in_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read_bytes(path: Path, *, repair: bool) -> bytes:
    """The transcript's complete lines; with ``repair``, a torn tail is set aside on disk."""
    try:
        fd = os.open(path, (os.O_RDWR if repair else os.O_RDONLY) | _OPEN_FLAGS)
    except FileNotFoundError:
        return b""
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0)
        end = data.rfind(b"\n") + 1
        if end < len(data) and repair:
            _set_aside_torn_tail(fd, path, len(data))
        return data[:end]
    finally:
        os.close(fd)


def _last_line_end(fd: int, size: int) -> int:
    """Offset just past the last newline before ``size`` (0 if none), scanning back in chunks."""
    end = size
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def _set_aside_torn_tail(fd: int, path: Path, size: int) -> None:
    """Move the bytes after the last newline to ``<path>.torn-<time>`` and truncate them away."""
    keep = _last_line_end(fd, size)
    torn = os.pread(fd, size - keep, keep)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{time.time_ns() % 1_000_000_000:09d}"
    side = path.with_name(f"{path.name}.torn-{stamp}")
    side_fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
    try:
        _write_all(side_fd, torn)
        os.fsync(side_fd)
    finally:
        os.close(side_fd)
    os.ftruncate(fd, keep)
    os.fsync(fd)
    logger.warning("transcript %s had a torn last line (%d bytes); set aside in %s", path, len(torn), side)


def _parse(data: bytes, path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.error("transcript %s line %d is not JSON; skipped", path, number)
    return records
