"""File storage (``file://``, the default): leases on flock'ed files beside the transcripts.

Exclusion across processes sharing ``<dataDir>`` comes from ``flock``, which the
kernel drops when its holder dies, even by ``kill -9``: a dead holder blocks
nobody. The hard parts, each with a test in ``tests/test_file_storage.py`` and
``tests/test_multiprocess_locks.py``:

- **Symlinks.** Every lock file is opened with ``O_NOFOLLOW`` (a planted symlink
  makes the attempt fail, it is never written through) and the locks folder
  itself must not be a symlink (filelock's CVE-2025-68146 / CVE-2026-22701).
- **Replaced files.** After the flock we compare the inode of our descriptor with
  the inode at the path; a file broken (unlinked) meanwhile is retried.
- **Stale holders.** An alive but frozen holder keeps its flock. Its heartbeat is
  the file's mtime; once older than ``stale_ms`` one claimant, under the
  ``<lock>.guard`` flock, re-checks the same inode and holder, unlinks the file
  and takes a fresh one. The frozen holder's renew then sees the path's inode
  changed and reports the lease lost.
- **Fencing.** A lane grant appends one byte to ``<stem>.fence`` with
  ``O_APPEND``; the offset after that write is the token: atomic across
  processes, monotonic, and it survives restarts.
- **Queues.** A waiter holds a flock on its ticket file ``<stem>.queue/<number>``,
  so a dead waiter is seen (its file is lockable) and skipped.

A lock file holds its holder record (:func:`.base.encode_holder`: pid, host,
process start time, since, fence) while held; release overwrites its first byte
with :data:`RELEASED` (the rest is left for the next holder to write over:
rewriting allocated bytes costs a fraction of truncating the file and allocating
it again). A record under a free flock therefore means its holder died holding it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .._config import Settings
from .._errors import BackendUnavailable, SessionGateError
from .._ids import file_stem
from .._waiting import Backoff
from .base import (
    THIS_HOST,
    Holder,
    HolderState,
    LeaseKind,
    LeaseStorage,
    RecordStorage,
    StoredLease,
    Ticket,
    decode_holder,
    encode_holder,
)

__all__ = ["SWEEP_INTERVAL_S", "FileRecords", "FileStorage", "LockPathAttack"]

logger = logging.getLogger(__name__)

_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | _FLAGS
#: The first byte of a lock file released cleanly (a holder record starts with "{").
RELEASED = b"."
_MAX_ATTEMPTS = 4  # re-opens after finding the file replaced or broken meanwhile
_GUARD_WAIT_S = 2.0  # longest wait for a guard flock (held for microseconds by live processes)
SWEEP_INTERVAL_S = 60.0  # how often a process sweeps expired records
_TEMP_PREFIX = ".tmp-"
_ORPHAN_AGE_S = 3600.0  # a temp file this old was left by a crash mid-write


class LockPathAttack(SessionGateError):
    """A lock path is a symlink (or the locks folder is): refused, never followed."""


def _open_lock_file(path: str, flags: int = _LOCK_FLAGS) -> int:
    try:
        return os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockPathAttack(f"{path} is a symlink; refusing to follow it") from None
        raise


def _try_flock(fd: int, operation: int = fcntl.LOCK_EX) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file_at(path: str, st_ino: int) -> bool:
    try:
        return os.stat(path, follow_symlinks=False).st_ino == st_ino
    except FileNotFoundError:
        return False


def _ensure_dir(path: Path) -> None:
    """Create ``path`` (0700) if missing; refuse it if it is a symlink or not a folder."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        pass
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
        raise LockPathAttack(f"{path} must be a real folder, not a symlink or file")


@contextmanager
def _guard(path: str) -> Iterator[bool]:
    """A short non-blocking guard flock; yields whether we have it."""
    fd = _open_lock_file(path)
    try:
        yield _try_flock(fd)
    finally:
        os.close(fd)


async def _wait_for_guard(path: str) -> int:
    """The guard flock at ``path`` (as an open fd), polling briefly; BackendUnavailable if stuck."""
    fd = _open_lock_file(path)
    deadline = time.monotonic() + _GUARD_WAIT_S
    backoff = Backoff()
    while not _try_flock(fd):
        if time.monotonic() > deadline:
            os.close(fd)
            raise BackendUnavailable(f"guard lock {path} held for over {_GUARD_WAIT_S} s")
        await asyncio.sleep(backoff.next_delay())
    return fd


def _bump_counter(path: str) -> int:
    """Add one to the counter at ``path``: an O_APPEND write of one byte; the new size is the value."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _FLAGS, 0o600)
    try:
        os.write(fd, b".")
        return os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)


def _counter_value(path: str) -> int:
    try:
        return os.stat(path, follow_symlinks=False).st_size
    except FileNotFoundError:
        return 0


def _released(fd: int, st: os.stat_result) -> bool:
    """Whether a lock file holds no holder: never used, emptied, or marked released."""
    return st.st_size == 0 or os.pread(fd, 1, 0) == RELEASED


def _read_holder(fd: int, st: os.stat_result) -> Holder | None:
    """The holder recorded in a lock file, its heartbeat being the file's mtime."""
    record = os.pread(fd, st.st_size, 0) if st.st_size else b""
    if not record or record[:1] == RELEASED:
        return None
    try:
        holder = decode_holder(record)
    except ValueError:
        return None  # being written right now, or garbage: not a holder we may judge
    if st.st_mtime > holder.heartbeat_at:
        return dataclasses.replace(holder, heartbeat_at=st.st_mtime)
    return holder


def _may_be_gone(holder: Holder, stale_ms: int) -> bool:
    """A cheap first look before the full :meth:`Holder.state` check under the guard.

    Keeps the busy path fast: a recent heartbeat from a pid that exists is
    taken as live without asking psutil for the process start time.
    """
    if (time.time() - holder.heartbeat_at) * 1000 >= stale_ms or holder.host != THIS_HOST:
        return holder.state(stale_ms) is not HolderState.LIVE
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


class _FileLease(StoredLease):
    def __init__(self, fd: int, path: str, st_ino: int, holder: Holder) -> None:
        self._fd: int | None = fd
        self._path = path
        self._ino = st_ino
        self.holder = holder

    async def renew(self) -> bool:
        if self._fd is None:
            return False
        os.utime(self._fd)
        return _same_file_at(self._path, self._ino)

    async def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.pwrite(fd, RELEASED, 0)  # released cleanly; if broken meanwhile, it is our own inode
        finally:
            os.close(fd)  # drops the flock


class FileRecords(RecordStorage):
    """One JSON file per key (named by the key's hash) with its expiry; guard flocks striped by hash.

    A record's file carries its expiry as its mtime too, so a sweep finds the
    expired ones with one ``stat`` each, without opening them. Records nobody
    reads again (most idempotency keys and webhook dedupe ids) would otherwise
    pile up for ever; ``add`` and ``put`` start a sweep in a worker thread at
    most every :data:`SWEEP_INTERVAL_S`.
    """

    def __init__(self, folder: Path) -> None:
        _ensure_dir(folder)
        self._folder = folder
        self._next_sweep_at = 0.0
        self._sweeping: asyncio.Task[None] | None = None

    def _paths(self, key: str) -> tuple[str, str]:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return str(self._folder / f"{digest}.json"), self._guard_path(digest)

    def _guard_path(self, name: str) -> str:
        return str(self._folder / f".guard-{name[:2]}")

    @staticmethod
    def _read(path: str) -> dict[str, Any] | None:
        """The entry at ``path``, expired or not; ``None`` if there is none or it is not JSON."""
        try:
            fd = os.open(path, os.O_RDONLY | _FLAGS)
        except FileNotFoundError:
            return None
        try:
            entry: dict[str, Any] = json.loads(os.read(fd, os.fstat(fd).st_size or 1))
            return entry
        except ValueError:
            return None
        finally:
            os.close(fd)

    def _load(self, path: str) -> dict[str, Any] | None:
        entry = self._read(path)
        return entry if entry is not None and entry["expiresAt"] > time.time() else None

    def _store(self, path: str, key: str, value: dict[str, Any], ttl_ms: int) -> None:
        expires_at = time.time() + ttl_ms / 1000
        entry = {"key": key, "expiresAt": expires_at, "value": value}
        fd, temp = tempfile.mkstemp(dir=self._folder, prefix=_TEMP_PREFIX)
        try:
            os.write(fd, json.dumps(entry).encode())
            os.utime(fd, (expires_at, expires_at))
        finally:
            os.close(fd)
        os.replace(temp, path)

    async def add(self, key: str, value: dict[str, Any], *, ttl_ms: int) -> bool:
        path, guard = self._paths(key)
        guard_fd = await _wait_for_guard(guard)
        try:
            if self._load(path) is not None:
                return False
            self._store(path, key, value, ttl_ms)
        finally:
            os.close(guard_fd)
        self._sweep_if_due()
        return True

    async def get(self, key: str) -> dict[str, Any] | None:
        entry = self._load(self._paths(key)[0])
        return None if entry is None else entry["value"]

    async def put(self, key: str, value: dict[str, Any], *, ttl_ms: int) -> None:
        path, guard = self._paths(key)
        guard_fd = await _wait_for_guard(guard)
        try:
            self._store(path, key, value, ttl_ms)
        finally:
            os.close(guard_fd)
        self._sweep_if_due()

    async def delete(self, key: str) -> None:
        _unlink_quietly(self._paths(key)[0])

    async def finish_sweeping(self) -> None:
        """Wait for a sweep in progress (on shutdown, so no thread outlives the event loop)."""
        if self._sweeping is not None:
            await self._sweeping

    def _sweep_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep_at or (self._sweeping is not None and not self._sweeping.done()):
            return
        self._next_sweep_at = now + SWEEP_INTERVAL_S
        self._sweeping = asyncio.get_running_loop().create_task(self._sweep_in_background())

    async def _sweep_in_background(self) -> None:
        try:
            await asyncio.to_thread(self.sweep)
        except OSError:  # a full disk or lost permissions: the next sweep tries again
            logger.warning("sweeping expired records in %s failed", self._folder, exc_info=True)

    def sweep(self) -> int:
        """Delete the expired records (and temp files a crash left); how many records went.

        Safe beside other processes: each file is judged again under its
        stripe's guard flock, by its content, before it is unlinked.
        """
        now = time.time()
        with os.scandir(self._folder) as entries:
            overdue = [
                (entry.name, entry.stat(follow_symlinks=False).st_mtime) for entry in entries
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime <= now
            ]
        removed = 0
        for name, mtime in overdue:
            if name.endswith(".json"):
                removed += self._remove_if_expired(name, now)
            elif name.startswith(_TEMP_PREFIX) and mtime < now - _ORPHAN_AGE_S:
                _unlink_quietly(str(self._folder / name))
        return removed

    def _remove_if_expired(self, name: str, now: float) -> int:
        path = str(self._folder / name)
        with _guard(self._guard_path(name)) as guarded:
            if not guarded:
                return 0  # being written right now: the next sweep looks again
            entry = self._read(path)
            if entry is not None and entry.get("expiresAt", 0) > now:
                return 0  # replaced meanwhile, or written before records carried their expiry as mtime
            _unlink_quietly(path)
            return 1


class FileStorage(LeaseStorage):
    """:class:`LeaseStorage` on flock'ed files in ``locks_dir``; records in ``records_dir``."""

    records: FileRecords

    def __init__(self, locks_dir: Path, records_dir: Path) -> None:
        _ensure_dir(locks_dir)
        self.locks_dir = locks_dir
        self._locks = str(locks_dir)
        self.records = FileRecords(records_dir)
        self._stems: dict[str, str] = {}
        self._tickets: dict[Ticket, int] = {}  # our waiting tickets and their flock'ed fds

    @classmethod
    def from_settings(cls, settings: Settings) -> FileStorage:
        root = settings.file_storage_root
        return cls(root / "locks", root / "records")

    # -- paths -----------------------------------------------------------------------------

    def _base(self, session_id: str) -> str:
        base = self._stems.get(session_id)
        if base is None:
            if len(self._stems) > 10_000:
                self._stems.clear()
            base = self._stems[session_id] = f"{self._locks}/{file_stem(session_id)}"
        return base

    def _lease_path(self, kind: LeaseKind, session_id: str) -> str:
        return f"{self._base(session_id)}.{kind.value}"

    # -- leases ----------------------------------------------------------------------------

    async def try_acquire(
        self, kind: LeaseKind, session_id: str, *, stale_ms: int
    ) -> StoredLease | None:
        path = self._lease_path(kind, session_id)
        try:
            return self._try_acquire(path, kind, session_id, stale_ms)
        except OSError as exc:  # a full disk, a read-only mount, lost permissions: the storage is down
            raise BackendUnavailable(f"lock file {path}: {exc.strerror or exc}") from exc

    def _try_acquire(
        self, path: str, kind: LeaseKind, session_id: str, stale_ms: int
    ) -> _FileLease | None:
        reclaimed: HolderState | None = None
        for _ in range(_MAX_ATTEMPTS):
            fd = _open_lock_file(path)
            if not _try_flock(fd):
                broken = self._break_if_stale(fd, path, stale_ms)
                os.close(fd)
                if broken is None:
                    return None
                reclaimed = broken
                continue
            lease = self._take(fd, path, kind, session_id)
            if lease is not None:
                lease.reclaimed = lease.reclaimed or reclaimed
                return lease
        return None

    def _take(self, fd: int, path: str, kind: LeaseKind, session_id: str) -> _FileLease | None:
        """We have the flock of ``fd``: check it is still the file at ``path`` and record ourselves."""
        try:
            st = os.fstat(fd)
            if not _same_file_at(path, st.st_ino):  # broken meanwhile by a stale-lease claimant
                os.close(fd)
                return None
            if _released(fd, st):
                return self._record(fd, path, st, kind, session_id)
            # its last holder died holding it: stale-lease claimants may be looking, so under the guard
            with _guard(f"{path}.guard") as guarded:
                if not guarded or not _same_file_at(path, st.st_ino):
                    os.close(fd)
                    return None
                lease = self._record(fd, path, st, kind, session_id)
            lease.reclaimed = HolderState.DEAD_PID
            return lease
        except BaseException:
            os.close(fd)
            raise

    def _record(
        self, fd: int, path: str, st: os.stat_result, kind: LeaseKind, session_id: str
    ) -> _FileLease:
        fence = _bump_counter(f"{self._base(session_id)}.fence") if kind is LeaseKind.LANE else 0
        holder = Holder.for_this_process(session_id, kind, fence)
        # padded over whatever an earlier holder left (JSON allows trailing blanks): no truncation
        os.pwrite(fd, encode_holder(holder).encode().ljust(st.st_size), 0)
        return _FileLease(fd, path, st.st_ino, holder)

    def _break_if_stale(self, fd: int, path: str, stale_ms: int) -> HolderState | None:
        """The flock of ``fd`` is held by someone: break it if its holder is stale or dead."""
        st = os.fstat(fd)
        holder = _read_holder(fd, st)
        if holder is None or not _may_be_gone(holder, stale_ms):
            return None
        return self._break(path, holder, stale_ms, st.st_ino)

    def _break(
        self, path: str, holder: Holder, stale_ms: int, st_ino: int | None = None
    ) -> HolderState | None:
        """Under the guard: if ``path`` still holds this very holder, not live, remove its lease.

        Returns the holder's state when removed. A lease whose flock is free
        (its holder died) is emptied; one still flock'ed (a frozen holder) is
        unlinked, so the next acquisition creates a fresh file.
        """
        with _guard(f"{path}.guard") as guarded:
            if not guarded:
                return None  # another claimant is at it
            try:
                fd = _open_lock_file(path, os.O_RDWR | _FLAGS)
            except FileNotFoundError:
                return None
            try:
                st = os.fstat(fd)
                if (st_ino is not None and st.st_ino != st_ino) or not _same_file_at(path, st.st_ino):
                    return None
                current = _read_holder(fd, st)
                if current is None or (current.pid, current.since, current.fence) != (
                    holder.pid,
                    holder.since,
                    holder.fence,
                ):
                    return None
                state = current.state(stale_ms)
                if state is HolderState.LIVE:
                    return None
                if _try_flock(fd):
                    os.pwrite(fd, RELEASED, 0)
                else:
                    os.unlink(path)
                return state
            finally:
                os.close(fd)

    async def current_fence(self, session_id: str) -> int:
        return _counter_value(f"{self._base(session_id)}.fence")

    async def holder(self, kind: LeaseKind, session_id: str) -> Holder | None:
        return self._holder_at(self._lease_path(kind, session_id))

    @staticmethod
    def _holder_at(path: str) -> Holder | None:
        try:
            fd = _open_lock_file(path, os.O_RDONLY | _FLAGS)
        except FileNotFoundError:
            return None
        try:
            return _read_holder(fd, os.fstat(fd))
        finally:
            os.close(fd)

    async def holders(self) -> list[Holder]:
        found = []
        kinds = tuple(f".{kind.value}" for kind in LeaseKind)
        for name in sorted(os.listdir(self._locks)):
            if name.endswith(kinds):
                holder = self._holder_at(f"{self._locks}/{name}")
                if holder is not None:
                    found.append(holder)
        return found

    async def break_lease(self, holder: Holder, *, stale_ms: int) -> bool:
        return self._break(self._lease_path(holder.kind, holder.session_id), holder, stale_ms) is not None

    # -- queues ----------------------------------------------------------------------------

    def _queue_dir(self, session_id: str) -> str:
        return f"{self._base(session_id)}.queue"

    def _live_tickets(self, session_id: str, stale_ms: int) -> list[int]:
        """Numbers of the tickets whose waiters are alive and not stale; dead ones are removed."""
        folder = self._queue_dir(session_id)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        ours = {int(t.id): fd for t, fd in self._tickets.items() if t.session_id == session_id}
        now = time.time()
        live = []
        for name in names:
            if name.startswith("."):
                continue  # being created
            number = int(name)
            fd = ours.get(number)
            if fd is not None:
                if (now - os.fstat(fd).st_mtime) * 1000 < stale_ms:
                    live.append(number)
                continue
            try:
                fd = os.open(f"{folder}/{name}", os.O_RDONLY | _FLAGS)
            except FileNotFoundError:
                continue
            try:
                if _try_flock(fd, fcntl.LOCK_SH):  # nobody holds it: its waiter is gone
                    _unlink_quietly(f"{folder}/{name}")
                elif (now - os.fstat(fd).st_mtime) * 1000 < stale_ms:
                    live.append(number)
            finally:
                os.close(fd)
        return live

    async def enqueue(self, session_id: str, *, cap: int, stale_ms: int) -> Ticket | None:
        folder = self._queue_dir(session_id)
        _ensure_dir(Path(folder))
        guard_fd = await _wait_for_guard(f"{folder}.guard")
        try:
            if len(self._live_tickets(session_id, stale_ms)) >= cap:
                return None
            number = _bump_counter(f"{folder}.counter")
            temp = f"{folder}/.{number}"
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _FLAGS, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)  # a fresh file nobody else knows yet
            os.rename(temp, f"{folder}/{number:016d}")
        finally:
            os.close(guard_fd)
        ticket = Ticket(session_id, str(number))
        self._tickets[ticket] = fd
        return ticket

    async def queue_position(self, ticket: Ticket, *, stale_ms: int) -> int:
        mine = int(ticket.id)
        return sum(1 for number in self._live_tickets(ticket.session_id, stale_ms) if number < mine)

    async def queue_length(self, session_id: str, *, stale_ms: int) -> int:
        return len(self._live_tickets(session_id, stale_ms))

    async def leave_queue(self, ticket: Ticket) -> None:
        fd = self._tickets.pop(ticket, None)
        if fd is not None:
            _unlink_quietly(f"{self._queue_dir(ticket.session_id)}/{int(ticket.id):016d}")
            os.close(fd)

    async def renew_ticket(self, ticket: Ticket) -> None:
        fd = self._tickets.get(ticket)
        if fd is not None:
            os.utime(fd)

    # -- lifecycle -------------------------------------------------------------------------

    async def ping(self) -> None:
        if not os.access(self._locks, os.W_OK | os.X_OK):
            raise BackendUnavailable(f"lock folder {self._locks} is not writable")

    async def aclose(self) -> None:
        for ticket in list(self._tickets):
            await self.leave_queue(ticket)
        await self.records.finish_sweeping()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

