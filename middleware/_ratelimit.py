"""Rate limits (``rateLimits.perSession`` / ``rateLimits.perSender``) on the ``limits`` async API.

``limits`` already does storage and strategy well; this module only chooses
them from the settings and turns a spent quota into :class:`RateLimited`
(with what the RateLimit header fields need).

Strategy: the *fixed window*, as slowapi and flask-limiter use by default.
It is the cheapest ``limits`` strategy on every storage (one counter per key:
on the in-process storage a hit costs about half the sliding window counter's
time; on Redis one small script over one key instead of two), and its
memory does not grow with the quota or the traffic, unlike the moving window
(one timestamp per counted request, so a generous ``perSender`` quota for a
shared proxy keeps and copies lists of thousands of entries). Its price: a
client may spend one quota at the end of a window and the next at the start
of the following one (up to twice the quota within a short span), while the
average over any longer period stays within the quota. These limits guard a
gateway against floods, where that is enough; ``Retry-After`` (the window's
end) is always enough for one more request. Measurements and the comparison
are in ``docs/gate.md`` ("Rate limits").

Storage follows ``backend.url``. With ``file://`` and ``memory://`` each
process counts alone, in memory, with ``limits``' *synchronous* memory
storage: counting in a dict never blocks the event loop, and it sweeps
expired entries at most every 10 ms in a timer thread, whereas its asyncio
twin starts a sweep over every key on each event-loop turn (measured: about
0.35 ms of CPU per request with 2 000 live sessions, against 0.02 ms).
With ``redis://`` / ``rediss://`` the counts are shared through ``limits``'
async Redis storage on redis-py's asyncio client (``limits`` defaults to
coredis, which is not a dependency), under ``backend.keyPrefix``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from limits import RateLimitItem, WindowStats, parse_many
from limits.aio.strategies import FixedWindowRateLimiter as AsyncFixedWindowRateLimiter
from limits.errors import StorageError
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import FixedWindowRateLimiter

from ._backend import storage_scheme
from ._config import Settings
from ._errors import BackendUnavailable, RateLimited


@dataclass(frozen=True)
class Policy:
    """One named quota (``perSession`` or ``perSender``) and the items of its rate string."""

    name: str
    items: tuple[RateLimitItem, ...]


def is_shared(settings: Settings) -> bool:
    """Whether counts live in Redis (shared by every process) rather than in this process."""
    return storage_scheme(settings.backend.url) in ("redis", "rediss")


class _InProcessCounter:
    """``limits``' synchronous memory storage and fixed window, awaited like the Redis one."""

    def __init__(self) -> None:
        self._storage = MemoryStorage()
        self._limiter = FixedWindowRateLimiter(self._storage)

    async def hit(self, item: RateLimitItem, *identifiers: str) -> bool:
        return self._limiter.hit(item, *identifiers)

    async def window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        return self._limiter.get_window_stats(item, *identifiers)

    async def reset(self) -> None:
        self._storage.reset()

    async def aclose(self) -> None:
        """Nothing to close: the expiry timer thread stops by itself once there is nothing to expire."""


class _SharedCounter:
    """``limits``' async Redis storage (redis-py) and fixed window; errors are :class:`BackendUnavailable`."""

    def __init__(self, settings: Settings) -> None:
        from ._redis import CONNECTION_OPTIONS  # short timeouts + one reconnect: survives a Redis restart

        self._storage = storage_from_string(
            "async+" + settings.backend.url,
            implementation="redispy",
            key_prefix=f"{settings.backend.key_prefix}:ratelimit",
            wrap_exceptions=True,
            **CONNECTION_OPTIONS,
        )
        self._limiter = AsyncFixedWindowRateLimiter(self._storage)

    async def hit(self, item: RateLimitItem, *identifiers: str) -> bool:
        with _unavailable_on_storage_error():
            return await self._limiter.hit(item, *identifiers)

    async def window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        with _unavailable_on_storage_error():
            return await self._limiter.get_window_stats(item, *identifiers)

    async def reset(self) -> None:
        with _unavailable_on_storage_error():
            await self._storage.reset()

    async def aclose(self) -> None:
        """Drop the Redis connection pool."""
        await self._storage.bridge.storage.aclose()


@contextlib.contextmanager
def _unavailable_on_storage_error() -> Iterator[None]:
    try:
        yield
    except StorageError as exc:
        raise BackendUnavailable(f"rate limit storage unreachable: {exc.storage_error!r}") from exc


def _policy(name: str, rate: str | None) -> Policy | None:
    return Policy(name, tuple(parse_many(rate))) if rate else None


class RateLimits:
    """The configured quotas over one ``limits`` storage; shared by every request of a process."""

    def __init__(self, settings: Settings) -> None:
        configured = settings.rate_limits
        self.per_session = _policy("perSession", configured.per_session)
        self.per_sender = _policy("perSender", configured.per_sender)
        self.enabled = bool(self.per_session or self.per_sender)
        self._counter: _InProcessCounter | _SharedCounter | None = None
        if self.enabled:
            self._counter = _SharedCounter(settings) if is_shared(settings) else _InProcessCounter()

    async def hit(self, *, session_id: str, sender: str | None) -> None:
        """Count one request; raise :class:`RateLimited` if a quota is spent.

        Raises :class:`BackendUnavailable` when the Redis storage cannot be reached.
        """
        if self.per_session:
            await self._hit(self.per_session, "session", session_id, session_id)
        if self.per_sender and sender is not None:
            await self._hit(self.per_sender, "sender", sender, session_id)

    async def _hit(self, policy: Policy, scope: str, key: str, session_id: str) -> None:
        assert self._counter is not None
        for item in policy.items:
            if not await self._counter.hit(item, scope, key):
                stats = await self._counter.window_stats(item, scope, key)
                raise RateLimited(
                    f"{policy.name} quota of {item.amount} per {item.get_expiry()} s is spent",
                    retry_after_ms=int((stats.reset_time - time.time()) * 1000),
                    limit=item.amount,
                    remaining=stats.remaining,
                    window_s=item.get_expiry(),
                    policy=policy.name,
                    session_id=session_id,
                )

    async def reset(self) -> None:
        """Forget every count (tests and the operator CLI)."""
        if self._counter is not None:
            await self._counter.reset()

    async def aclose(self) -> None:
        """Drop the Redis connection pool, if any."""
        if self._counter is not None:
            await self._counter.aclose()
