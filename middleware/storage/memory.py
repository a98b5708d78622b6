"""In-process storage (``memory://``): leases, fences, queues and records in dicts.

For one process only (unit tests, embedding without a data dir). Nothing
survives a restart and no other process sees it. A holder here can only be
stale (this process is alive by definition), never dead.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time
from typing import Any

from .._config import Settings
from .base import (
    Holder,
    HolderState,
    LeaseKind,
    LeaseStorage,
    RecordStorage,
    StoredLease,
    Ticket,
)

__all__ = ["SWEEP_INTERVAL_S", "MemoryRecords", "MemoryStorage"]

SWEEP_INTERVAL_S = 1.0  # how often ``put`` drops expired records


class _MemoryLease(StoredLease):
    def __init__(self, storage: MemoryStorage, holder: Holder) -> None:
        self._storage = storage
        self.holder = holder

    def _is_current(self) -> bool:
        return self._storage._leases.get((self.holder.kind, self.holder.session_id)) is self

    async def renew(self) -> bool:
        if not self._is_current():
            return False
        self.holder = dataclasses.replace(self.holder, heartbeat_at=time.time())
        return True

    async def release(self) -> None:
        if self._is_current():
            del self._storage._leases[(self.holder.kind, self.holder.session_id)]


class MemoryRecords(RecordStorage):
    """TTL records in a dict; values are copied in and out, as a real store would.

    Expired records are dropped when touched, and by a sweep that ``put`` runs
    at most every :data:`SWEEP_INTERVAL_S`, so keys nobody reads again do not
    pile up in a long-running process.
    """

    def __init__(self) -> None:
        self._records: dict[str, tuple[float, dict[str, Any]]] = {}
        self._next_sweep_at = 0.0

    def __len__(self) -> int:
        """How many records are held (expired ones included until the next sweep)."""
        return len(self._records)

    def _live(self, key: str) -> dict[str, Any] | None:
        entry = self._records.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._records[key]
            return None
        return entry[1]

    async def add(self, key: str, value: dict[str, Any], *, ttl_ms: int) -> bool:
        if self._live(key) is not None:
            return False
        await self.put(key, value, ttl_ms=ttl_ms)
        return True

    async def get(self, key: str) -> dict[str, Any] | None:
        value = self._live(key)
        return None if value is None else copy.deepcopy(value)

    async def put(self, key: str, value: dict[str, Any], *, ttl_ms: int) -> None:
        now = time.monotonic()
        if now >= self._next_sweep_at:
            self._sweep(now)
        self._records[key] = (now + ttl_ms / 1000, copy.deepcopy(value))

    async def delete(self, key: str) -> None:
        self._records.pop(key, None)

    def _sweep(self, now: float) -> None:
        expired = [key for key, (expires_at, _) in self._records.items() if expires_at <= now]
        for key in expired:
            del self._records[key]
        self._next_sweep_at = now + SWEEP_INTERVAL_S


@dataclasses.dataclass
class _Waiter:
    number: int
    heartbeat_at: float


class MemoryStorage(LeaseStorage):
    """Single-process :class:`LeaseStorage` and :class:`RecordStorage`."""

    def __init__(self) -> None:
        self._leases: dict[tuple[LeaseKind, str], _MemoryLease] = {}
        self._fences: dict[str, int] = {}
        self._queues: dict[str, dict[str, _Waiter]] = {}
        self._ticket_numbers = itertools.count(1)
        self.records = MemoryRecords()

    @classmethod
    def from_settings(cls, settings: Settings) -> MemoryStorage:
        return cls()

    async def try_acquire(
        self, kind: LeaseKind, session_id: str, *, stale_ms: int
    ) -> StoredLease | None:
        current = self._leases.get((kind, session_id))
        reclaimed = None
        if current is not None:
            state = current.holder.state(stale_ms)
            if state is HolderState.LIVE:
                return None
            reclaimed = state
        fence = 0
        if kind is LeaseKind.LANE:
            fence = self._fences[session_id] = self._fences.get(session_id, 0) + 1
        lease = _MemoryLease(self, Holder.for_this_process(session_id, kind, fence))
        lease.reclaimed = reclaimed
        self._leases[(kind, session_id)] = lease
        return lease

    async def current_fence(self, session_id: str) -> int:
        return self._fences.get(session_id, 0)

    async def holder(self, kind: LeaseKind, session_id: str) -> Holder | None:
        lease = self._leases.get((kind, session_id))
        return None if lease is None else lease.holder

    async def holders(self) -> list[Holder]:
        return [lease.holder for lease in self._leases.values()]

    async def break_lease(self, holder: Holder, *, stale_ms: int) -> bool:
        key = (holder.kind, holder.session_id)
        lease = self._leases.get(key)
        if lease is None or lease.holder.since != holder.since:
            return False
        if lease.holder.state(stale_ms) is HolderState.LIVE:
            return False
        del self._leases[key]
        return True

    def _live_waiters(self, session_id: str, stale_ms: int) -> list[_Waiter]:
        now = time.time()
        waiters = self._queues.get(session_id, {}).values()
        return [w for w in waiters if (now - w.heartbeat_at) * 1000 < stale_ms]

    async def enqueue(self, session_id: str, *, cap: int, stale_ms: int) -> Ticket | None:
        if len(self._live_waiters(session_id, stale_ms)) >= cap:
            return None
        number = next(self._ticket_numbers)
        ticket = Ticket(session_id, str(number))
        self._queues.setdefault(session_id, {})[ticket.id] = _Waiter(number, time.time())
        return ticket

    async def queue_position(self, ticket: Ticket, *, stale_ms: int) -> int:
        mine = int(ticket.id)
        return sum(1 for w in self._live_waiters(ticket.session_id, stale_ms) if w.number < mine)

    async def queue_length(self, session_id: str, *, stale_ms: int) -> int:
        return len(self._live_waiters(session_id, stale_ms))

    async def leave_queue(self, ticket: Ticket) -> None:
        queue = self._queues.get(ticket.session_id)
        if queue is not None:
            queue.pop(ticket.id, None)
            if not queue:
                del self._queues[ticket.session_id]

    async def renew_ticket(self, ticket: Ticket) -> None:
        waiter = self._queues.get(ticket.session_id, {}).get(ticket.id)
        if waiter is not None:
            waiter.heartbeat_at = time.time()

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        self._leases.clear()
        self._queues.clear()
