"""Transcripts: one append-only JSONL file per session, crash-safe and fenced.

Every change happens under the session's write lock (held only for the file
work, never across a model call). An append is one ``write`` of all its lines
on an ``O_APPEND`` descriptor, then ``fsync`` per ``transcript.fsync``. A crash
mid-append can leave a torn last line; the next locked read or append moves
those bytes to a side file (``<name>.jsonl.torn-<time>``, kept for forensics)
and truncates the transcript to its last complete line. A write whose fencing
token is older than the session's newest comes from a turn that lost its lane
and is refused (:class:`FencedOut`).

Reads go through the transcript's index (:mod:`._transcript_index`): a turn's
history, a page of messages and an ``Idempotency-Key`` lookup read only the
records they return, so their cost does not grow with the conversation.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from ._backend import Backend
from ._config import Settings
from ._errors import FencedOut, SessionBusy, SessionGateError, StorageFailed
from ._ids import HASHED_MARK, existing_file, session_id_from_stem
from ._metrics import FENCING_REFUSALS
from ._transcript_index import Records, TranscriptIndex, parse_lines
from ._write_lock import WriteLockHold
from .transcripts.base import Durability, LockedTranscript, Page, TranscriptStore, completed, encode

__all__ = ["FILE_THREADS", "FileLockedTranscript", "FileTranscriptStore"]

logger = logging.getLogger("sessiongate.store")

_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
_SUFFIX = ".jsonl"
_ID_SUFFIX = ".id"  # beside a transcript whose name is hashed (a long id): the id, for the operator CLI
_TAIL_CHUNK = 65_536
T = TypeVar("T")


#: Worker threads for transcript file work (reads, parsing, fsync, repairs, index
#: updates), apart from anyio's shared default limiter: a burst of turns queues
#: here for a thread and never starves other users of ``to_thread`` (or fails).
FILE_THREADS = 16


UNHEALTHY_AFTER_FAILURE_S = 30.0  # /readyz reports a failed append this long, unless one succeeds sooner


class FileTranscriptStore(TranscriptStore):
    """Read, repair and append the JSONL transcripts under ``<dataDir>/sessions``.

    Every file operation runs in a worker thread (:data:`FILE_THREADS` of them,
    shared by this store), never on the event loop, and reads only the records
    it returns, through the transcript's index (:mod:`._transcript_index`).
    """

    def __init__(self, backend: Backend, settings: Settings) -> None:
        self._backend = backend
        self.fsync = settings.transcript.fsync == "always"
        settings.sessions_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.sessions_dir = settings.sessions_dir.resolve()
        self.location = str(self.sessions_dir)
        self._threads = anyio.CapacityLimiter(FILE_THREADS)
        self._failed_at: float | None = None  # monotonic time of the last failed append, until one succeeds

    def check_writable(self) -> None:
        """Raise :class:`StorageFailed` while appends fail (the last one failed, recently; for readiness probes)."""
        if self._failed_at is not None and time.monotonic() - self._failed_at < UNHEALTHY_AFTER_FAILURE_S:
            raise StorageFailed("the last transcript append failed; see the log")

    def path_for(self, session_id: str) -> Path:
        """The transcript path of a session; raises InvalidSessionId for a bad id."""
        path = existing_file(self.sessions_dir, session_id, _SUFFIX)
        if Path(os.path.realpath(path)).parent != self.sessions_dir:
            raise SessionGateError(f"transcript of {session_id!r} resolves outside {self.sessions_dir}")
        return path

    async def off_loop(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` in one of this store's worker threads (waits, uncancelled, until it is done)."""
        return await anyio.to_thread.run_sync(work, *args, limiter=self._threads)

    @asynccontextmanager
    async def locked(self, session_id: str) -> AsyncIterator[FileLockedTranscript]:
        """Hold the session's write lock for several steps (read, then append) as one critical section."""
        path = self.path_for(session_id)
        async with self._backend.write_lock(session_id) as hold:
            yield FileLockedTranscript(self, session_id, path, hold)

    async def read(self, session_id: str) -> list[dict[str, Any]]:
        """Every record, in order, under the write lock; a torn tail is set aside first."""
        async with self.locked(session_id) as transcript:
            return await transcript.read()

    async def read_unlocked(self, session_id: str) -> list[dict[str, Any]]:
        """A lock-free snapshot of every record: complete lines only, a torn tail is skipped."""
        path = self.path_for(session_id)
        return await self.off_loop(_read_all, path, False)

    async def page(self, session_id: str, *, limit: int, before: str | None = None) -> Page | None:
        """Lock-free: the newest ``limit`` records, or those just before record id ``before``.

        ``None`` when ``before`` names no record of this session.
        """
        path = self.path_for(session_id)
        return await self.off_loop(_page, path, limit, before)

    async def find(self, session_id: str, field: str, value: str) -> dict[str, Any] | None:
        """Lock-free: the first record whose ``field`` (one of ``INDEXED_FIELDS``) is ``value``."""
        path = self.path_for(session_id)
        return await self.off_loop(_find, path, field, value)

    async def append(
        self, session_id: str, records: list[dict[str, Any]], *, fence: int | None = None
    ) -> list[dict[str, Any]]:
        """Append ``records`` atomically under the write lock (see :meth:`LockedTranscript.append`)."""
        stored, payload = _prepared(records, fence)  # encoded before the lock: shorter holds
        async with self.locked(session_id) as transcript:
            await transcript._write(payload, fence)
        return stored

    async def restore(self, session_id: str, records: list[dict[str, Any]]) -> bool:
        if not records:
            return False
        payload = "".join(f"{encode(record)}\n" for record in records).encode()
        async with self.locked(session_id) as transcript:
            if await transcript.find("id", str(records[0]["id"])) is not None:
                return False
            await transcript._write(payload, None)
        return True

    async def session_ids(self) -> list[str]:
        """Every session that has a transcript, sorted (a hashed name's id is read from beside it)."""
        return await self.off_loop(self._session_ids)

    def _session_ids(self) -> list[str]:
        found = []
        for name in os.listdir(self.sessions_dir):
            if name.endswith(_SUFFIX):
                stem = name[: -len(_SUFFIX)]
                session_id = session_id_from_stem(stem)
                if session_id is None:
                    session_id = (self.sessions_dir / f"{stem}{_ID_SUFFIX}").read_text(encoding="utf-8")
                found.append(session_id)
        return sorted(found)

    async def durability(self) -> Durability:
        if self.fsync:
            return Durability(True, "transcript.fsync = always: each append is fsynced before it is acknowledged")
        return Durability(False, "transcript.fsync = never: a power loss can drop acknowledged appends")

    async def count(self, session_id: str) -> int:
        """How many records the transcript holds, from its index."""
        return await self.off_loop(_count, self.path_for(session_id))


class FileLockedTranscript(LockedTranscript):
    """One session's transcript while its write lock is held (from :meth:`TranscriptStore.locked`)."""

    def __init__(self, store: FileTranscriptStore, session_id: str, path: Path, hold: WriteLockHold) -> None:
        self.session_id = session_id
        self.path = path
        self._store = store
        self._hold = hold

    async def read(self) -> list[dict[str, Any]]:
        """Every record, in order; a torn tail is set aside first."""
        return await self._store.off_loop(_read_all, self.path, True)

    async def tail(self, limit: int, *, through: str | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` records (up to and including record id ``through``); a torn tail is set aside first.

        Raises ``ValueError`` when ``through`` names no record.
        """
        return await self._store.off_loop(_tail, self.path, limit, through)

    async def find(self, field: str, value: str) -> dict[str, Any] | None:
        """The first record whose ``field`` (one of ``INDEXED_FIELDS``) is ``value``."""
        return await self._store.off_loop(_find, self.path, field, value)

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
        try:
            await store.off_loop(_append, self.path, self.session_id, payload, store.fsync)
        except OSError as exc:
            store._failed_at = time.monotonic()
            logger.error("append to %s failed: %s", self.path, exc)
            raise StorageFailed(
                f"the transcript of session {self.session_id!r} could not be written ({exc.strerror or exc})",
                session_id=self.session_id,
            ) from exc
        store._failed_at = None


def _prepared(records: list[dict[str, Any]], fence: int | None) -> tuple[list[dict[str, Any]], bytes]:
    """The records as they will be stored, and their JSONL bytes."""
    stored = [completed(record, fence) for record in records]
    return stored, "".join(f"{encode(record)}\n" for record in stored).encode()



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


def _append(path: Path, session_id: str, payload: bytes, fsync: bool) -> None:
    """One ``O_APPEND`` write of whole lines after setting a torn tail aside; then fsync and the index.

    An append that fails part-way (disk full, file-size limit) is cut off again,
    so the transcript is exactly as before it, and the ``OSError`` is raised.
    """
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _OPEN_FLAGS, 0o600)
    try:
        before = _repair_torn_tail(fd, path)  # the length to go back to if the append fails part-way
        try:
            if before == 0 and HASHED_MARK in path.name:
                _keep_id_beside(path, session_id)
            _write_all(fd, payload)
            if fsync:
                _fsync(fd, path.parent if before == 0 else None)
        except OSError:
            _truncate_back(fd, path, before)
            raise
        try:
            TranscriptIndex(path).use(fd, _nothing)  # indexes the new lines
        except (OSError, sqlite3.Error):  # the append itself is durable; the next read rebuilds the index
            logger.warning("indexing %s after an append failed", path, exc_info=True)
    finally:
        os.close(fd)


def _nothing(index: Records) -> None:
    return None


@contextmanager
def _opened(path: Path, *, repair: bool) -> Iterator[int | None]:
    """A descriptor of the transcript (``None`` if it does not exist); with ``repair``, a torn tail set aside."""
    try:
        fd = os.open(path, (os.O_RDWR if repair else os.O_RDONLY) | _OPEN_FLAGS)
    except FileNotFoundError:
        yield None
        return
    try:
        if repair:
            _repair_torn_tail(fd, path)
        yield fd
    finally:
        os.close(fd)


def _read_all(path: Path, repair: bool) -> list[dict[str, Any]]:
    """Every complete record (for the few callers that need them all, e.g. channel recovery)."""
    with _opened(path, repair=repair) as fd:
        if fd is None:
            return []
        data = os.pread(fd, os.fstat(fd).st_size, 0)
    return parse_lines(data[: data.rfind(b"\n") + 1].split(b"\n"), path)


def _tail(path: Path, limit: int, through: str | None) -> list[dict[str, Any]]:
    def query(index: Records) -> list[dict[str, Any]]:
        last = index.count if through is None else index.seq_of("id", through)
        if last is None:
            raise ValueError(f"record {through!r} is not in the transcript {path}")
        return index.window(last - limit + 1, last).records if limit > 0 else []

    with _opened(path, repair=True) as fd:
        if fd is None:
            if through is not None:
                raise ValueError(f"record {through!r} is not in the transcript {path} (it does not exist)")
            return []
        return TranscriptIndex(path).use(fd, query)


def _page(path: Path, limit: int, before: str | None) -> Page | None:
    def query(index: Records) -> Page | None:
        if before is None:
            last = index.count
        elif (seq := index.seq_of("id", before)) is not None:
            last = seq - 1
        else:
            return None
        window = index.window(last - limit + 1, last)
        return Page(window.records, more=bool(window.records) and window.first > 1)

    with _opened(path, repair=False) as fd:
        if fd is None:
            return None if before is not None else Page([], more=False)
        return TranscriptIndex(path).use(fd, query)


def _count(path: Path) -> int:
    with _opened(path, repair=False) as fd:
        return 0 if fd is None else TranscriptIndex(path).use(fd, lambda index: index.count)


def _find(path: Path, field: str, value: str) -> dict[str, Any] | None:
    with _opened(path, repair=False) as fd:
        return None if fd is None else TranscriptIndex(path).use(fd, lambda index: index.find(field, value))


def _repair_torn_tail(fd: int, path: Path) -> int:
    """Set a torn last line aside (see :func:`_set_aside_torn_tail`); the size of the complete lines."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        _set_aside_torn_tail(fd, path, size)
        size = os.fstat(fd).st_size
    return size


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


def _keep_id_beside(path: Path, session_id: str) -> None:
    """Write ``<stem>.id`` for a transcript whose name cannot be turned back into its session id."""
    id_path = path.with_name(path.name[: -len(_SUFFIX)] + _ID_SUFFIX)
    fd = os.open(id_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _OPEN_FLAGS, 0o600)
    try:
        _write_all(fd, session_id.encode())
    finally:
        os.close(fd)


def _truncate_back(fd: int, path: Path, length: int) -> None:
    """Cut a failed append off, so the transcript is exactly as before it; logged if even that fails."""
    try:
        os.ftruncate(fd, length)
        os.fsync(fd)
    except OSError as exc:  # the next locked read sets the torn tail aside
        logger.error("could not truncate %s back to %d bytes after a failed append: %s", path, length, exc)


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
