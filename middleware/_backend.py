"""The backend: one object that the gate and the gateway use for everything sessions share.

:func:`open_backend` opens the storage ``backend.url`` names (its schemes are
registered in :mod:`sessiongate.storage`, as ``limits`` registers its storages)
and puts the strategies on top of it: lanes (one turn per session, reject or
queue, Retry-After estimates) and transcript write locks (bounded wait).
Callers never touch storages directly.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from ._config import Settings
from ._lanes import LaneGrant, Lanes
from ._waiting import Heartbeats
from ._write_lock import WriteLockHold, WriteLocks
from .storage import LeaseStorage, RecordStorage, open_storage

__all__ = ["Backend", "open_backend"]


class Backend:
    """Lanes, write locks, fencing and records over one storage."""

    def __init__(self, storage: LeaseStorage, settings: Settings, *, longest_turn_ms: float | None = None) -> None:
        self.settings = settings
        self.storage = storage
        heartbeats = Heartbeats.for_stale_ms(settings.session_write_lock.stale_ms)  # one timer for both kinds
        self.lanes = Lanes(storage, settings, heartbeats, longest_turn_ms=longest_turn_ms)
        self.write_locks = WriteLocks(storage, settings, heartbeats)

    @property
    def records(self) -> RecordStorage:
        return self.storage.records

    async def acquire_lane(self, session_id: str, *, max_wait_ms: int | None = None) -> LaneGrant:
        """The session's lane, per ``lane.*`` settings; raises SessionBusy, QueueFull or BackendUnavailable."""
        return await self.lanes.acquire(session_id, max_wait_ms=max_wait_ms)

    def write_lock(self, session_id: str) -> AbstractAsyncContextManager[WriteLockHold]:
        """Hold the session's transcript write lock; raises LockTimeout after ``sessionWriteLock.timeoutMs``."""
        return self.write_locks.hold(session_id)

    async def current_fence(self, session_id: str) -> int:
        return await self.storage.current_fence(session_id)

    async def ping(self) -> None:
        await self.storage.ping()

    async def aclose(self) -> None:
        await self.lanes.aclose()
        await self.storage.aclose()


def open_backend(settings: Settings, *, longest_turn_ms: float | None = None) -> Backend:
    """A :class:`Backend` for ``settings.backend.url`` (``file://``, ``memory://``, ``redis://``).

    ``longest_turn_ms`` (the app knows it, e.g. its model call's timeout) bounds
    the first busy answers of a process, before any turn has finished.
    """
    return Backend(open_storage(settings), settings, longest_turn_ms=longest_turn_ms)
