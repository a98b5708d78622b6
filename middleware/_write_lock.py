"""Transcript write locks: held only around a read, repair or append, never across a model call.

Tasks of one process queue on a per-session ``asyncio.Lock`` first (a storage
lease object is not safe to share between tasks, as with filelock's and
redis-py's lock objects), then the head task takes a *new* storage lease for
its acquisition, polling with a capped backoff while another process holds
it. The whole wait is bounded by ``sessionWriteLock.timeoutMs``; past it comes
:class:`LockTimeout` (a ``session-busy`` answer).
"""

from __future__ import annotations

import asyncio
import time

from ._config import Settings
from ._errors import LockTimeout
from ._metrics import WRITE_LOCK_HOLD_SECONDS, WRITE_LOCK_WAIT_SECONDS, count_takeover
from ._waiting import Backoff, Beating, Heartbeats, moving_average
from .storage import LeaseKind, LeaseStorage, StoredLease

__all__ = ["WriteLockHold", "WriteLocks"]


class _LocalQueue:
    """The per-session asyncio lock and how many tasks use it (dropped at zero)."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class WriteLockHold:
    """One acquisition of a session's write lock; an async context manager."""

    def __init__(self, locks: WriteLocks, session_id: str) -> None:
        self.session_id = session_id
        self.acquired_at: float | None = None  # time.monotonic() once held
        self.lost = False  # the heartbeat found the lease taken over (we were stale)
        self._locks = locks
        self._local: _LocalQueue | None = None
        self._lease: StoredLease | None = None
        self._beating: Beating | None = None

    def _mark_lost(self) -> None:
        self.lost = True

    async def __aenter__(self) -> WriteLockHold:
        locks = self._locks
        asked_at = time.monotonic()
        deadline = asked_at + locks.timeout_ms / 1000
        local = self._local = locks._local_queue(self.session_id)
        local.users += 1
        try:
            await self._lock_locally(local.lock, asked_at, deadline)
            try:
                self._lease = await locks._take_lease(self.session_id, asked_at, deadline)
            except BaseException:
                local.lock.release()
                raise
        except BaseException:
            locks._leave(self.session_id, local)
            raise
        self.acquired_at = time.monotonic()
        WRITE_LOCK_WAIT_SECONDS.observe(self.acquired_at - asked_at)
        self._beating = locks.heartbeats.add(self, self._lease.renew, self._mark_lost)
        return self

    async def _lock_locally(self, lock: asyncio.Lock, asked_at: float, deadline: float) -> None:
        if not lock.locked():  # the common case: no await, no timer
            await lock.acquire()
            return
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await lock.acquire()
        except TimeoutError:
            raise self._locks._timeout(self.session_id, asked_at) from None

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._lease is not None and self._local is not None and self._beating is not None
        Heartbeats.discard(self._beating, self)
        try:
            await self._lease.release()
        finally:
            held_s = time.monotonic() - (self.acquired_at or 0.0)
            WRITE_LOCK_HOLD_SECONDS.observe(held_s)
            self._locks._observe_hold(held_s * 1000)
            self._local.lock.release()
            self._locks._leave(self.session_id, self._local)


class WriteLocks:
    """The write-lock strategy over any :class:`LeaseStorage`."""

    def __init__(self, storage: LeaseStorage, settings: Settings, heartbeats: Heartbeats | None = None) -> None:
        self._storage = storage
        self.timeout_ms = settings.session_write_lock.timeout_ms
        self.stale_ms = settings.session_write_lock.stale_ms
        self._local: dict[str, _LocalQueue] = {}
        self.heartbeats = heartbeats or Heartbeats.for_stale_ms(self.stale_ms)  # one timer renews every lock held here
        self._expected_hold_ms = 5.0  # EWMA of hold times, for LockTimeout's retry_after_ms

    def hold(self, session_id: str) -> WriteLockHold:
        """``async with write_locks.hold(session_id):`` the critical section of one transcript."""
        return WriteLockHold(self, session_id)

    def _local_queue(self, session_id: str) -> _LocalQueue:
        local = self._local.get(session_id)
        if local is None:
            local = self._local[session_id] = _LocalQueue()
        return local

    def _leave(self, session_id: str, local: _LocalQueue) -> None:
        local.users -= 1
        if local.users == 0 and self._local.get(session_id) is local:
            del self._local[session_id]

    async def _take_lease(self, session_id: str, asked_at: float, deadline: float) -> StoredLease:
        backoff = Backoff()
        while True:
            lease = await self._storage.try_acquire(LeaseKind.WRITE, session_id, stale_ms=self.stale_ms)
            if lease is not None:
                count_takeover(lease)
                return lease
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout(session_id, asked_at)
            await asyncio.sleep(min(remaining, backoff.next_delay()))

    def _observe_hold(self, held_ms: float) -> None:
        self._expected_hold_ms = moving_average(self._expected_hold_ms, held_ms)

    def _timeout(self, session_id: str, asked_at: float) -> LockTimeout:
        waiters = self._local[session_id].users if session_id in self._local else 1
        return LockTimeout(
            session_id,
            waited_ms=(time.monotonic() - asked_at) * 1000,
            retry_after_ms=max(1, round(self._expected_hold_ms * waiters)),
        )
