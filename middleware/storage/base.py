"""The storage interface: where leases, fences, queues and records live.

Following ``limits``, strategy is kept apart from storage. The strategies
(:mod:`sessiongate._lanes` waits, queues and estimates; :mod:`sessiongate._write_lock`
bounds the wait for the transcript lock) are written once, against this interface; the
storages (:mod:`.memory`, :mod:`.file`, :mod:`.redis`) only know how to take,
renew and give back one lease, issue fencing tokens, keep a FIFO of waiters and
keep small records with a time to live.

A *lease* is the right to hold one lock of one session: the lane (one turn at a
time) or the transcript write lock. It is kept alive by :meth:`StoredLease.renew`
(the heartbeat). A holder whose process is dead loses it at once; a holder that
has not renewed for ``stale_ms`` loses it to the next :meth:`LeaseStorage.try_acquire`.
"""

from __future__ import annotations

import enum
import functools
import json
import os
import socket
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as json_string
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from .._config import Settings

__all__ = [
    "THIS_HOST",
    "Holder",
    "HolderState",
    "LeaseKind",
    "LeaseStorage",
    "RecordStorage",
    "StoredLease",
    "Ticket",
    "decode_holder",
    "encode_holder",
    "holder_head",
    "owner_dead",
    "process_alive",
    "this_process_started_at",
]


class LeaseKind(str, enum.Enum):
    LANE = "lane"
    WRITE = "write"


class HolderState(str, enum.Enum):
    LIVE = "live"
    DEAD_PID = "dead-pid"
    STALE = "stale"


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as recorded beside it for takeover decisions and the operator CLI."""

    session_id: str
    kind: LeaseKind
    pid: int
    host: str
    process_started_at: float | None  # psutil create_time: tells a reused pid apart
    since: float  # wall clock (epoch seconds) of the grant
    heartbeat_at: float  # wall clock of the last sign of life
    fence: int  # the fencing token of the grant (0 for write locks)

    def state(self, stale_ms: int, *, now: float | None = None) -> HolderState:
        """Live, dead (same host, process gone or pid reused) or stale (silent for ``stale_ms``)."""
        if owner_dead(self.host, self.pid, self.process_started_at):
            return HolderState.DEAD_PID
        now = time.time() if now is None else now
        if (now - self.heartbeat_at) * 1000 >= stale_ms:
            return HolderState.STALE
        return HolderState.LIVE

    def to_json(self) -> dict[str, Any]:
        """The wire form (:func:`encode_holder`) as a dict, e.g. for the operator CLI's JSON output."""
        data: dict[str, Any] = json.loads(encode_holder(self))
        return data

    @classmethod
    def for_this_process(cls, session_id: str, kind: LeaseKind, fence: int = 0) -> Holder:
        now = time.time()
        pid = os.getpid()
        return cls(
            session_id=session_id,
            kind=kind,
            pid=pid,
            host=THIS_HOST,
            process_started_at=_process_started_at(pid),
            since=now,
            heartbeat_at=now,
            fence=fence,
        )


THIS_HOST = socket.gethostname()


def this_process_started_at() -> float | None:
    return _process_started_at(os.getpid())


@functools.lru_cache(maxsize=8)  # asked for this process's pid only: cached per pid, so a fork computes its own
def _process_started_at(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def owner_dead(host: str | None, pid: int, started_at: float | None) -> bool:
    """Whether a record's owner ran on this host and its process is gone (or its pid reused)."""
    return host == THIS_HOST and not process_alive(pid, started_at)


def process_alive(pid: int, started_at: float | None) -> bool:
    """Whether ``pid`` runs and is the same process (same start time) as recorded."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        if started_at is None:
            return True
        return abs(process.create_time() - started_at) < 0.01
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


# -- the holder wire codec: the one way every storage writes and reads a holder record --------


def encode_holder(holder: Holder) -> str:
    """The holder record as every storage writes it: compact JSON, the fence last.

    The fence comes last so that Redis' ``acquire.lua`` can complete a
    :func:`holder_head` with the fence it issues in the same atomic step. Built
    as one f-string (it is written on every lease grant): the kinds and the
    fields that only depend on the process are encoded once (:data:`_KIND_JSON`,
    :func:`_identity_json`), and ``heartbeatAt`` reuses ``since``'s text while
    they are equal (a fresh grant).
    """
    since = repr(holder.since)
    heartbeat_at = since if holder.heartbeat_at == holder.since else repr(holder.heartbeat_at)
    return (
        f'{{"sessionId":{json_string(holder.session_id)},"kind":{_KIND_JSON[holder.kind]},'
        f"{_identity_json(holder.pid, holder.host, holder.process_started_at)},"
        f'"since":{since},"heartbeatAt":{heartbeat_at},"fence":{holder.fence}}}'
    )


def holder_head(holder: Holder) -> str:
    """:func:`encode_holder` without its fence's digits and closing brace (what ``acquire.lua`` completes)."""
    return encode_holder(holder).removesuffix(f"{holder.fence}}}")


def decode_holder(raw: str | bytes) -> Holder:
    """The holder an :func:`encode_holder` record describes; ``ValueError`` if ``raw`` is not one.

    Also reads records written before the encoding was compact (any JSON spacing).
    """
    try:
        data = json.loads(raw)
        return Holder(
            session_id=str(data["sessionId"]),
            kind=LeaseKind(data["kind"]),
            pid=int(data["pid"]),
            host=str(data["host"]),
            process_started_at=data.get("processStartedAt"),
            since=float(data["since"]),
            heartbeat_at=float(data["heartbeatAt"]),
            fence=int(data.get("fence", 0)),
        )
    except (KeyError, TypeError) as exc:  # JSON, but not a holder record
        raise ValueError(f"not a holder record: {exc!r}") from None


_KIND_JSON = {kind: json_string(kind.value) for kind in LeaseKind}


@functools.lru_cache(maxsize=64)
def _identity_json(pid: int, host: str, process_started_at: float | None) -> str:
    """The ``"pid","host","processStartedAt"`` members of a holder record: the same for a process's every grant."""
    members = json.dumps({"pid": pid, "host": host, "processStartedAt": process_started_at}, separators=(",", ":"))
    return members[1:-1]


class StoredLease(ABC):
    """One held lease, as a storage keeps it."""

    holder: Holder
    #: set by the storage when this grant reclaimed a dead or stale holder (counted as a takeover)
    reclaimed: HolderState | None = None

    @abstractmethod
    async def renew(self) -> bool:
        """Show a sign of life. ``False`` once the lease is no longer ours (taken over)."""

    @abstractmethod
    async def release(self) -> None:
        """Give the lease back; a no-op if it was already lost."""


@dataclass(frozen=True)
class Ticket:
    """A waiter's place in a session's FIFO queue (``lane.mode = queue``)."""

    session_id: str
    id: str


class LeaseStorage(ABC):
    """Where leases live. One instance per process, shared by every request."""

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Settings) -> LeaseStorage:
        """The storage ``settings.backend.url`` describes (see :func:`sessiongate.storage.open_storage`)."""

    @abstractmethod
    async def try_acquire(
        self, kind: LeaseKind, session_id: str, *, stale_ms: int
    ) -> StoredLease | None:
        """One non-blocking attempt; a dead or stale holder is reclaimed (by one claimant only).

        A lane grant carries a new fencing token, larger than every earlier one of
        the session.
        """

    async def try_acquire_or_holder(
        self, kind: LeaseKind, session_id: str, *, stale_ms: int
    ) -> tuple[StoredLease | None, Holder | None]:
        """:meth:`try_acquire`; on refusal also the holder, where the attempt read it anyway (else ``None``).

        Saves the busy answer a second read of the holder for its retry estimate.
        """
        return await self.try_acquire(kind, session_id, stale_ms=stale_ms), None

    @abstractmethod
    async def current_fence(self, session_id: str) -> int:
        """The newest fencing token issued for the session (0 if none)."""

    @abstractmethod
    async def holder(self, kind: LeaseKind, session_id: str) -> Holder | None:
        """The current holder, if any (live, dead or stale)."""

    @abstractmethod
    async def holders(self) -> list[Holder]:
        """Every recorded holder of every session, for the operator CLI."""

    @abstractmethod
    async def break_lease(self, holder: Holder, *, stale_ms: int) -> bool:
        """Remove exactly this holder's lease if it is still dead or stale. Race-free with live gateways."""

    @abstractmethod
    async def enqueue(self, session_id: str, *, cap: int, stale_ms: int) -> Ticket | None:
        """Join the session's FIFO; ``None`` when ``cap`` live waiters are already in it."""

    @abstractmethod
    async def queue_position(self, ticket: Ticket, *, stale_ms: int) -> int:
        """0 when the ticket is at the head (its turn to try the lane); waiters that died are skipped."""

    @abstractmethod
    async def queue_length(self, session_id: str, *, stale_ms: int) -> int:
        """How many live waiters the session's FIFO holds (for the operator CLI)."""

    @abstractmethod
    async def leave_queue(self, ticket: Ticket) -> None:
        """Remove the ticket (granted, gave up or cancelled)."""

    @abstractmethod
    async def renew_ticket(self, ticket: Ticket) -> None:
        """Heartbeat of a waiting ticket, so dead waiters do not hold the queue."""

    records: RecordStorage

    @abstractmethod
    async def ping(self) -> None:
        """Raise ``BackendUnavailable`` if the storage cannot be reached."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release connections and files."""


class RecordStorage(ABC):
    """Small JSON records with a time to live: idempotency keys and webhook dedupe."""

    @abstractmethod
    async def add(self, key: str, value: dict[str, Any], *, ttl_ms: int) -> bool:
        """Store ``value`` only if ``key`` is absent (or expired); ``True`` if stored."""

    @abstractmethod
    async def get(self, key: str) -> dict[str, Any] | None:
        """The unexpired value under ``key``."""

    @abstractmethod
    async def put(self, key: str, value: dict[str, Any], *, ttl_ms: int) -> None:
        """Store ``value`` under ``key``, replacing what was there."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Forget ``key``."""
