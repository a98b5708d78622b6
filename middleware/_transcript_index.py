"""A transcript's index: where each record starts, and which record holds a key.

Why: a turn must cost the same at record 10 and at record 1 000 000. It sends
the model only the newest ``history.maxMessages`` records, a page of
``GET .../messages`` is a slice, and the crash-recovery lookup of an
``Idempotency-Key`` is one record. With the byte offset of every record and a
key → record map, each of them reads only the bytes it returns.

The index is a cache, never the truth: ``<name>.jsonl.idx`` beside the
transcript, one SQLite file (stdlib, safe across processes and threads, its
own locking) with

- ``records(seq, offset)``: record number (1-based, non-blank lines) → byte offset;
- ``keys(field, value, seq)``: the first record whose ``field`` is ``value``,
  for the fields in :data:`sessiongate.transcripts.base.INDEXED_FIELDS`;
- ``state``: how many bytes of the transcript are indexed, its mtime then, and
  an *anchor* (offset and CRC-32 of the last indexed line).

:meth:`TranscriptIndex.sync` brings it up to date before every use: new
complete lines are indexed (another process appended, or this one crashed
between its append and the index update); a transcript shorter than the
indexed size, rewritten at the same size (its mtime moved) or whose anchor
line changed (truncated by a repair, replaced, restored) is indexed again from scratch, as is a missing or unreadable index.
Reads check what they get (a record's key field, line boundaries, the number
of lines), so an index that is wrong in any other way raises
:class:`IndexMismatch` and is rebuilt too. Only complete lines are ever
indexed, so the index never points into a torn tail.

A transcript under :data:`INDEX_FROM_BYTES` gets no index: most sessions stay
that short, and one read of the whole file is cheaper than creating and
keeping an index for it (:class:`SmallTranscript` answers the same queries).

Everything here is blocking file work: callers run it in a worker thread.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import zlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .transcripts.base import indexed_values

__all__ = [
    "INDEX_FROM_BYTES", "IndexMismatch", "Records", "SmallTranscript", "Synced", "TranscriptIndex",
    "Window", "index_path", "parse_lines",
]

logger = logging.getLogger("sessiongate.store")

#: Record fields with a lookup: message ids (paging), ``Idempotency-Key``\ s
#: (crash recovery), the user message a reply answers, and a channel's message id (dedupe).
_SCHEMA_VERSION = 1
T = TypeVar("T")
#: Below this size a transcript gets no index (reading it whole is cheaper than keeping one).
INDEX_FROM_BYTES = 65_536
_CATCH_UP_CHUNK = 8 * 1_048_576  # bytes parsed per step of a rebuild: bounded memory
_BUSY_TIMEOUT_S = 30.0  # another process holds the index's write transaction (e.g. rebuilding)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS state (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    version INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, count INTEGER NOT NULL,
    anchor_offset INTEGER NOT NULL, anchor_crc INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, offset INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    field TEXT NOT NULL, value TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (field, value)
) WITHOUT ROWID;
INSERT OR IGNORE INTO state VALUES (0, {_SCHEMA_VERSION}, 0, 0, 0, -1, 0);
"""


class IndexMismatch(Exception):
    """The index disagrees with the transcript: rebuild it."""


def index_path(transcript: Path) -> Path:
    return transcript.with_name(transcript.name + ".idx")


@dataclass(frozen=True)
class Window:
    """A run of consecutive records: ``first`` is the number of the first one (1-based)."""

    first: int
    records: list[dict[str, Any]]


@dataclass(frozen=True)
class _State:
    size: int
    mtime_ns: int
    count: int
    anchor_offset: int
    anchor_crc: int


class TranscriptIndex:
    """The index of one transcript, used through an open descriptor of that transcript."""

    def __init__(self, transcript: Path) -> None:
        self.transcript = transcript
        self.path = index_path(transcript)

    def use(self, fd: int, query: Callable[[Records], T]) -> T:
        """``query`` on the index brought up to the complete lines of ``fd``; rebuilt once if it cannot be used.

        A transcript under :data:`INDEX_FROM_BYTES` that has no index yet is
        answered from its bytes (:class:`SmallTranscript`).
        """
        if os.fstat(fd).st_size < INDEX_FROM_BYTES and not os.path.exists(self.path):
            return query(SmallTranscript(fd))
        for attempt in range(2):
            try:
                with _CONNECTIONS.connection(self.path) as db:
                    return query(Synced(db, fd, self._sync(db, fd)))
            except (sqlite3.DatabaseError, IndexMismatch) as exc:
                if attempt or isinstance(exc, sqlite3.OperationalError):  # e.g. busy: not the index's fault
                    raise
                logger.warning("transcript index %s unusable (%s); rebuilding it", self.path, exc)
                self.discard()
        raise AssertionError("unreachable")

    def discard(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.unlink(f"{self.path}{suffix}")
            except FileNotFoundError:
                pass

    def _sync(self, db: sqlite3.Connection, fd: int) -> _State:
        state = _read_state(db)
        stat = os.fstat(fd)
        if (state.size, state.mtime_ns) == (stat.st_size, stat.st_mtime_ns) and _anchor_holds(fd, state):
            return state  # the common case: one query and one small pread
        db.execute("BEGIN IMMEDIATE")  # one catcher-up at a time, across processes
        try:
            state = _read_state(db)
            stat = os.fstat(fd)
            rewritten = state.size == stat.st_size and state.mtime_ns != stat.st_mtime_ns
            if state.size > stat.st_size or rewritten or not _anchor_holds(fd, state):
                if state.size:
                    logger.warning("transcript %s changed under its index; indexing it again", self.transcript)
                db.execute("DELETE FROM records")
                db.execute("DELETE FROM keys")
                state = _State(0, 0, 0, -1, 0)
            state = _index_lines(db, fd, state, stat.st_size, stat.st_mtime_ns)
            db.execute(
                "UPDATE state SET size=?, mtime_ns=?, count=?, anchor_offset=?, anchor_crc=? WHERE id=0",
                (state.size, state.mtime_ns, state.count, state.anchor_offset, state.anchor_crc),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return state


def _connect(path: Path) -> sqlite3.Connection:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.close(fd)  # created private (0600) before SQLite opens it
    db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")  # a cache: a lost or torn update is detected and rebuilt
        db.executescript(_SCHEMA)
    except BaseException:
        db.close()
        raise
    return db


@dataclass
class _Open:
    db: sqlite3.Connection
    inode: int

    def still_at(self, path: Path) -> bool:
        try:
            return os.stat(path).st_ino == self.inode
        except FileNotFoundError:
            return False


class _Connections:
    """Open index connections kept for reuse (opening one costs about a millisecond), one user at a time.

    A connection is taken out of the pool while in use, so two threads never
    share one (a second user of the same index opens its own); it is reused
    only while its file is still the one at the path (an index deleted and
    rebuilt is a new file); the least recently used close beyond :data:`_POOL_SIZE`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: OrderedDict[Path, _Open] = OrderedDict()

    @contextmanager
    def connection(self, path: Path) -> Iterator[sqlite3.Connection]:
        with self._lock:
            taken = self._idle.pop(path, None)
        if taken is not None and not taken.still_at(path):
            taken.db.close()
            taken = None
        if taken is None:
            db = _connect(path)
            taken = _Open(db, os.stat(path).st_ino)
        try:
            yield taken.db
        except BaseException:
            taken.db.close()
            raise
        self._give_back(path, taken)

    def _give_back(self, path: Path, taken: _Open) -> None:
        surplus = []
        with self._lock:
            if path in self._idle:
                surplus.append(taken)
            else:
                self._idle[path] = taken
            while len(self._idle) > _POOL_SIZE:
                surplus.append(self._idle.popitem(last=False)[1])
        for extra in surplus:
            extra.db.close()

    def forget(self) -> None:
        """In a forked child: the parent's connections are not this process's to use."""
        self._lock = threading.Lock()
        self._idle = OrderedDict()


_POOL_SIZE = 128
_CONNECTIONS = _Connections()
os.register_at_fork(after_in_child=_CONNECTIONS.forget)


class Records(ABC):
    """The queries a transcript answers by record number and key, whichever way they are answered."""

    count: int  # complete, non-blank lines

    @abstractmethod
    def seq_of(self, field: str, value: str) -> int | None:
        """The number of the first record whose ``field`` is ``value``."""

    @abstractmethod
    def window(self, first: int, last: int) -> Window:
        """Records ``first`` to ``last`` (1-based, inclusive, clipped to what exists), in order."""

    def find(self, field: str, value: str) -> dict[str, Any] | None:
        """The first record whose ``field`` is ``value``."""
        seq = self.seq_of(field, value)
        if seq is None:
            return None
        found = self.window(seq, seq).records
        if not found or str(found[0].get(field)) != value:
            raise IndexMismatch(f"record {seq} does not hold {field}={value!r}")
        return found[0]


class SmallTranscript(Records):
    """A transcript under :data:`INDEX_FROM_BYTES`, answered from its bytes: no index file to create or keep.

    Most sessions stay short; for them one ``pread`` of the whole file is
    cheaper than an index. Only the records returned are parsed: a key is
    looked for as a substring first.
    """

    def __init__(self, fd: int) -> None:
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        self._lines = [line for line in data[: data.rfind(b"\n") + 1].split(b"\n") if line.strip()]
        self._fd = fd
        self.count = len(self._lines)

    def seq_of(self, field: str, value: str) -> int | None:
        needle = json.dumps(value, ensure_ascii=False)[1:-1].encode()  # as the store encodes it
        for seq, line in enumerate(self._lines, start=1):
            if (needle in line or not needle.isascii()) and _holds(line, field, value):
                return seq
        return None

    def window(self, first: int, last: int) -> Window:
        first, last = max(1, first), min(last, self.count)
        return Window(first, parse_lines(self._lines[first - 1 : last], self._fd) if first <= last else [])


class Synced(Records):
    """Queries on an up-to-date index; every answer is checked against the transcript's bytes."""

    def __init__(self, db: sqlite3.Connection, fd: int, state: _State) -> None:
        self._db = db
        self._fd = fd
        self._state = state
        self.count = state.count

    def seq_of(self, field: str, value: str) -> int | None:
        row = self._db.execute("SELECT seq FROM keys WHERE field=? AND value=?", (field, value)).fetchone()
        return None if row is None else int(row[0])

    def window(self, first: int, last: int) -> Window:
        first, last = max(1, first), min(last, self._state.count)
        if first > last:
            return Window(first, [])
        start = self._offset(first)
        end = self._offset(last + 1) if last < self._state.count else self._state.size
        if start and os.pread(self._fd, 1, start - 1) != b"\n":
            raise IndexMismatch(f"record {first} does not start a line")
        lines = [line for line in os.pread(self._fd, end - start, start).split(b"\n") if line.strip()]
        if len(lines) != last - first + 1:
            raise IndexMismatch(f"records {first}..{last} are {len(lines)} lines")
        return Window(first, parse_lines(lines, self._fd))

    def _offset(self, seq: int) -> int:
        row = self._db.execute("SELECT offset FROM records WHERE seq=?", (seq,)).fetchone()
        if row is None:
            raise IndexMismatch(f"record {seq} has no offset")
        return int(row[0])


def _read_state(db: sqlite3.Connection) -> _State:
    version, *values = db.execute(
        "SELECT version, size, mtime_ns, count, anchor_offset, anchor_crc FROM state WHERE id=0"
    ).fetchone()
    if version != _SCHEMA_VERSION:
        raise IndexMismatch(f"index version {version}, expected {_SCHEMA_VERSION}")
    return _State(*values)


def _anchor_holds(fd: int, state: _State) -> bool:
    """The last indexed line is still where and what it was (an empty index has no anchor)."""
    if state.anchor_offset < 0:
        return state.size == 0
    line = os.pread(fd, state.size - state.anchor_offset, state.anchor_offset)
    return zlib.crc32(line) == state.anchor_crc


def _index_lines(db: sqlite3.Connection, fd: int, state: _State, size: int, mtime_ns: int) -> _State:
    """Index the complete lines between ``state.size`` and ``size``, a bounded chunk at a time."""
    position, count, anchor_offset, anchor_crc = state.size, state.count, state.anchor_offset, state.anchor_crc
    while position < size:
        chunk = os.pread(fd, min(_CATCH_UP_CHUNK, size - position), position)
        complete = chunk.rfind(b"\n") + 1
        if complete == 0:
            if len(chunk) < _CATCH_UP_CHUNK:
                break  # a torn or in-progress last line: not indexed until complete
            raise IndexMismatch(f"a line longer than {_CATCH_UP_CHUNK} bytes at offset {position}")
        offsets: list[tuple[int, int]] = []
        keys: list[tuple[str, str, int]] = []
        line_start = 0
        while line_start < complete:
            line_end = chunk.index(b"\n", line_start) + 1
            line = chunk[line_start:line_end]
            if line.strip():
                count += 1
                offset = position + line_start
                offsets.append((count, offset))
                keys.extend((field, value, count) for field, value in _keys_of(line))
                anchor_offset, anchor_crc = offset, zlib.crc32(line)
            line_start = line_end
        db.executemany("INSERT INTO records VALUES (?, ?)", offsets)
        db.executemany("INSERT OR IGNORE INTO keys VALUES (?, ?, ?)", keys)
        position += complete
    return _State(position, mtime_ns, count, anchor_offset, anchor_crc)


def _record_of(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _keys_of(line: bytes) -> list[tuple[str, str]]:
    record = _record_of(line)
    if record is None:
        return []
    return indexed_values(record)


def _holds(line: bytes, field: str, value: str) -> bool:
    record = _record_of(line)
    return record is not None and record.get(field) is not None and str(record[field]) == value


def parse_lines(lines: list[bytes], origin: object) -> list[dict[str, Any]]:
    """JSON records of non-blank lines; a line that is not JSON is logged and skipped."""
    records = []
    for line in lines:
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            logger.error("transcript %s has a line that is not JSON; skipped", origin)
    return records
