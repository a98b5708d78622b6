"""An in-process storage for ``limits``' async strategies that expires counts lazily.

``limits`` ships two memory storages and both expire keys in the background:
the synchronous one in a timer thread that restarts every 10 ms under
traffic, the asyncio one in a task that walks every key on each event-loop
turn. A second thread is not free for an event loop: every ``epoll`` wait
then hands the GIL over, measured at about 15 µs per loop turn, more than
the counting itself. Here a count is judged expired when it is touched, and
one inline sweep at most every :data:`SWEEP_INTERVAL_S` drops the keys
nobody touched again, so memory stays bounded by the keys of the last window.

Everything runs on the event loop with no ``await`` inside an update, so no
lock is needed: each ``incr`` is atomic with respect to the other tasks.
"""

from __future__ import annotations

import time

from limits.aio.storage import Storage

__all__ = ["SWEEP_INTERVAL_S", "LazyMemoryStorage"]

SWEEP_INTERVAL_S = 1.0


class LazyMemoryStorage(Storage):
    """Fixed-window counts in two dicts, for one process; see the module docstring for why not ``limits``' own."""

    STORAGE_SCHEME = None  # constructed directly, never from a URI

    def __init__(self) -> None:
        super().__init__()
        self._counts: dict[str, int] = {}
        self._expires_at: dict[str, float] = {}
        self._next_sweep_at = 0.0

    @property
    def base_exceptions(self) -> type[Exception]:
        return ValueError  # as limits' own memory storages: a dict has no outage to report

    async def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        now = time.time()
        if now >= self._next_sweep_at:
            self._sweep(now)
        if self._expires_at.get(key, 0.0) <= now:  # a new window starts with this hit
            self._expires_at[key] = now + expiry
            self._counts[key] = amount
            return amount
        count = self._counts[key] + amount
        self._counts[key] = count
        return count

    async def get(self, key: str) -> int:
        if self._expires_at.get(key, 0.0) <= time.time():
            return 0
        return self._counts[key]

    async def get_expiry(self, key: str) -> float:
        """When the key's window ends (now, for a key with no live window)."""
        now = time.time()
        return max(self._expires_at.get(key, now), now)

    async def check(self) -> bool:
        return True

    async def reset(self) -> int:
        cleared = len(self._counts)
        self._counts.clear()
        self._expires_at.clear()
        return cleared

    async def clear(self, key: str) -> None:
        self._counts.pop(key, None)
        self._expires_at.pop(key, None)

    def __len__(self) -> int:
        """How many keys are held (expired ones included until the next sweep)."""
        return len(self._counts)

    def _sweep(self, now: float) -> None:
        expired = [key for key, expires_at in self._expires_at.items() if expires_at <= now]
        for key in expired:
            del self._expires_at[key]
            del self._counts[key]
        self._next_sweep_at = now + SWEEP_INTERVAL_S
