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

Counting goes through ``limits``' async fixed-window strategy; the storage
follows ``backend.url``. With ``file://`` and ``memory://`` each process
counts alone, in :class:`~sessiongate._window_counts.LazyMemoryStorage`
(``limits``' storage interface, with no background expiry: see that module
for the cost of ``limits``' own memory storages on an event loop). With
``redis://`` / ``rediss://`` the counts are shared through ``limits``' async
Redis storage on redis-py's asyncio client (``limits`` defaults to coredis,
which is not a dependency), under ``backend.keyPrefix``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from limits import RateLimitItem, parse_many
from limits.aio.storage import RedisStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string

from ._config import Settings
from ._errors import BackendUnavailable, RateLimited
from ._window_counts import LazyMemoryStorage
from .storage import is_shared as storage_is_shared

__all__ = ["Policy", "RateLimits", "is_shared"]


@dataclass(frozen=True)
class Policy:
    """One named quota (``perSession`` or ``perSender``) and the items of its rate string."""

    name: str
    items: tuple[RateLimitItem, ...]


def is_shared(settings: Settings) -> bool:
    """Whether counts live in Redis (shared by every process) rather than in this process."""
    return storage_is_shared(settings.backend.url)


def _storage_for(settings: Settings) -> Storage:
    if not is_shared(settings):
        return LazyMemoryStorage()
    from .storage.redis import CONNECTION_OPTIONS  # short timeouts + one reconnect: survives a Redis restart

    storage = storage_from_string(
        "async+" + settings.backend.url,
        implementation="redispy",
        key_prefix=f"{settings.backend.key_prefix}:ratelimit",
        wrap_exceptions=True,
        **CONNECTION_OPTIONS,
    )
    assert isinstance(storage, Storage)  # an "async+" URL gives limits' async storage
    return storage


def _unavailable(error: StorageError) -> BackendUnavailable:
    return BackendUnavailable(f"rate limit storage unreachable: {error.storage_error!r}")


def _policy(name: str, rate: str | None) -> Policy | None:
    return Policy(name, tuple(parse_many(rate))) if rate else None


class RateLimits:
    """The configured quotas over one ``limits`` storage; shared by every request of a process."""

    def __init__(self, settings: Settings) -> None:
        configured = settings.rate_limits
        self.per_session = _policy("perSession", configured.per_session)
        self.per_sender = _policy("perSender", configured.per_sender)
        self.enabled = bool(self.per_session or self.per_sender)
        self._storage: Storage | None = None
        self._limiter: FixedWindowRateLimiter | None = None
        if self.enabled:
            self._storage = _storage_for(settings)
            self._limiter = FixedWindowRateLimiter(self._storage)

    async def hit(self, *, session_id: str, sender: str | None) -> None:
        """Count one request; raise :class:`RateLimited` if a quota is spent.

        Raises :class:`BackendUnavailable` when the Redis storage cannot be reached.
        """
        if self.per_session:
            await self._hit(self.per_session, "session", session_id, session_id)
        if self.per_sender and sender is not None:
            await self._hit(self.per_sender, "sender", sender, session_id)

    async def _hit(self, policy: Policy, scope: str, key: str, session_id: str) -> None:
        assert self._limiter is not None
        for item in policy.items:
            try:
                if await self._limiter.hit(item, scope, key):
                    continue
                stats = await self._limiter.get_window_stats(item, scope, key)
            except StorageError as exc:
                raise _unavailable(exc) from exc
            raise RateLimited(
                f"{policy.name} quota of {item.amount} per {item.get_expiry()} s is spent",
                retry_after_ms=int((stats.reset_time - time.time()) * 1000),
                limit=item.amount,
                remaining=stats.remaining,
                window_s=item.get_expiry(),
                policy=policy.name,
                session_id=session_id,
            )

    async def aclose(self) -> None:
        """Drop the Redis connection pool, if any."""
        if isinstance(self._storage, RedisStorage):
            await self._storage.bridge.storage.aclose()  # type: ignore[attr-defined]  # redis-py bridge's client
