"""Redis storage: leases, fences, queues and records shared by gateways on many hosts.

Why Redis, and how: every instance talks to one Redis, so one turn per session
and one transcript writer hold across hosts. A lease is ``SET NX PX`` of
``"<random token> <holder record>"`` with a time to live of ``staleMs`` (a silent
holder simply expires); renew and release check the token in Lua so nobody
renews or deletes a successor's lease. A lane grant and its fencing token are
issued by one script, so no grant lacks a fence. The scripts live in
``lua/*.lua``, are loaded once per process (EVALSHA, reloaded after
``NOSCRIPT``, e.g. when Redis restarted) and are described in their headers.

Every lease acquisition makes a new :class:`RedisLease` with its own token:
nothing lock-like is shared between tasks (redis-py's own asyncio ``Lock``
keeps its token per thread, which is unsafe across tasks of one loop).

An unreachable Redis is reported as :class:`BackendUnavailable` (503 with
Retry-After): a refused or cut connection at once (one immediate reconnect
attempt), a hung Redis after the connect or read timeout (5 s). A burst of
requests is load, not an outage: commands wait for a free pooled connection.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from importlib import resources
from typing import Any, cast

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .._config import Settings
from .._errors import BackendUnavailable
from .base import (
    Holder,
    HolderState,
    LeaseKind,
    LeaseStorage,
    RecordStorage,
    StoredLease,
    Ticket,
    decode_holder,
    encode_holder,
    holder_head,
)

__all__ = [
    "CONNECTION_OPTIONS",
    "OUTAGE_ERRORS",
    "RETRY_AFTER_OUTAGE_MS",
    "RedisLease",
    "RedisRecords",
    "RedisStorage",
    "lapse_on_outage",
    "outage_as_backend_unavailable",
    "unavailable",
]

logger = logging.getLogger("sessiongate.redis")

#: Connection options of every Redis client sessiongate opens (this storage and the
#: ``limits`` rate-limit storage): one immediate reconnect, so a pooled connection cut
#: by a Redis restart is replaced at once and a Redis that is down (connection
#: refused) fails at once instead of backing off for seconds. The timeouts only
#: catch a Redis that hangs; they are measured on this process's event loop, so
#: they are long enough that a burst of this process's own requests, which delays
#: the loop, never reads as a Redis outage. Options in ``backend.url``'s query
#: string (``?socket_timeout=2``) override them.
CONNECTION_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": 5.0,
    "socket_timeout": 5.0,
    "health_check_interval": 5,
    "retry": Retry(NoBackoff(), retries=1, supported_errors=(redis_errors.ConnectionError,)),
}

#: Errors that mean "Redis cannot serve us now" rather than a bug in a command.
OUTAGE_ERRORS: tuple[type[Exception], ...] = (
    redis_errors.ConnectionError,  # includes BusyLoadingError (Redis loading its data)
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # a replica after failover, before clients move
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
)

RETRY_AFTER_OUTAGE_MS = 1_000

#: A burst is load, not an outage: a command waits this long for one of the pool's
#: ``backend.maxConnections`` connections to come free (redis-py's plain pool would
#: refuse at once with ``MaxConnectionsError``, which read as ``backend-unavailable``).
POOL_WAIT_S = 10.0


def unavailable(exc: Exception) -> BackendUnavailable:
    """The typed error for a redis-py connection-level error (logged with its cause, which clients never see)."""
    logger.warning("redis unavailable: %s: %s", type(exc).__name__, exc)
    return BackendUnavailable(
        f"the Redis lock backend cannot be reached ({type(exc).__name__})",
        retry_after_ms=RETRY_AFTER_OUTAGE_MS,
    )


@contextmanager
def outage_as_backend_unavailable() -> Iterator[None]:
    """Turn redis-py's connection-level errors into the typed :class:`BackendUnavailable`."""
    try:
        yield
    except OUTAGE_ERRORS as exc:
        raise unavailable(exc) from exc


@contextmanager
def lapse_on_outage(what: str) -> Iterator[None]:
    """For clean-ups of keys that expire anyway: during an outage they lapse by TTL instead of failing.

    A release or a queue exit runs after the work it guarded is done (often after
    the response started); raising there would only break a finished request.
    """
    try:
        yield
    except OUTAGE_ERRORS as exc:
        logger.warning("%s left to expire by its time to live: Redis unreachable (%s)", what, type(exc).__name__)


def _load_script(client: aioredis.Redis, name: str) -> Any:
    source = (resources.files(__package__) / "lua" / f"{name}.lua").read_text(encoding="utf-8")
    return client.register_script(source)


class _Keys:
    """Key names under ``backend.keyPrefix``.

    ``{session}`` is a hash tag, so every key one script touches lies in one
    cluster slot (ready for Redis Cluster, though the client here is standalone).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def lease(self, kind: LeaseKind, session_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:lease:{kind.value}"

    def lease_pattern(self) -> str:
        """SCAN pattern of every lease (glob characters in the prefix escaped)."""
        return re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + ":{*}:lease:*"

    def fence(self, session_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:fence"

    def queue(self, session_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:queue"

    def ticket_prefix(self, session_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:ticket:"

    def record(self, key: str) -> str:
        return f"{self.prefix}:record:{key}"


def _lease_value(token: str, holder: Holder) -> str:
    """``"<token> <holder record>"``, the record being :func:`.base.encode_holder`'s."""
    return f"{token} {encode_holder(holder)}"


def _parse_lease_value(value: str) -> tuple[str, Holder]:
    token, _, record = value.partition(" ")
    return token, decode_holder(record)


class RedisLease(StoredLease):
    """One acquisition of one lease: its own token, never shared with another task."""

    def __init__(self, storage: RedisStorage, key: str, token: str, holder: Holder, ttl_ms: int,
                 *, reclaimed: HolderState | None = None) -> None:
        self._storage = storage
        self._key = key
        self._token = token
        self._ttl_ms = ttl_ms
        self.holder = holder
        #: the state of the holder this acquisition replaced at once (DEAD_PID), if any
        self.reclaimed = reclaimed

    async def renew(self) -> bool:
        holder = replace(self.holder, heartbeat_at=time.time())
        renewed = await self._storage._run(
            self._storage._renew, keys=[self._key], args=[self._token, _lease_value(self._token, holder), self._ttl_ms]
        )
        if renewed:
            self.holder = holder
        return bool(renewed)

    async def release(self) -> None:
        """Give the lease back; if Redis cannot be reached it lapses after ``staleMs`` (its TTL)."""
        with lapse_on_outage(f"lease {self._key}"):
            await self._storage._release(keys=[self._key], args=[self._token])


class RedisStorage(LeaseStorage):
    """Leases, fencing tokens, FIFO tickets and records in one Redis (``backend.url = redis://...``)."""

    def __init__(self, client: aioredis.Redis, *, key_prefix: str = "sessiongate") -> None:
        self.client = client
        self.keys = _Keys(key_prefix)
        self.records = RedisRecords(self)
        self._acquire = _load_script(client, "acquire")
        self._renew = _load_script(client, "renew")
        self._release = _load_script(client, "release")
        self._break = _load_script(client, "break")
        self._queue = _load_script(client, "queue")
        self._ticket_ttl_ms: dict[str, int] = {}  # this process's waiting tickets → heartbeat TTL

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisStorage:
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.backend.url,
            max_connections=settings.backend.max_connections,
            timeout=POOL_WAIT_S,
            client_name="sessiongate",
            decode_responses=True,
            **CONNECTION_OPTIONS,
        )
        return cls(aioredis.Redis.from_pool(pool), key_prefix=settings.backend.key_prefix)

    async def _run(self, script: Any, *, keys: list[str], args: list[Any]) -> Any:
        try:  # not a context manager: this is the hot path of every lease
            return await script(keys=keys, args=args)
        except OUTAGE_ERRORS as exc:
            raise unavailable(exc) from exc

    # leases

    async def try_acquire(self, kind: LeaseKind, session_id: str, *, stale_ms: int) -> RedisLease | None:
        return (await self.try_acquire_or_holder(kind, session_id, stale_ms=stale_ms))[0]

    async def try_acquire_or_holder(
        self, kind: LeaseKind, session_id: str, *, stale_ms: int
    ) -> tuple[RedisLease | None, Holder | None]:
        taken = await self._try_take(kind, session_id, stale_ms=stale_ms, replacing="")
        if isinstance(taken, RedisLease):
            return taken, None
        _, holder = _parse_lease_value(taken)
        if holder.state(stale_ms) is not HolderState.DEAD_PID:  # a silent holder elsewhere expires by TTL
            return None, holder
        taken = await self._try_take(kind, session_id, stale_ms=stale_ms, replacing=taken, reclaimed=HolderState.DEAD_PID)
        if isinstance(taken, RedisLease):
            return taken, None
        return None, _parse_lease_value(taken)[1]  # another claimant reclaimed it first

    async def _try_take(self, kind: LeaseKind, session_id: str, *, stale_ms: int, replacing: str,
                        reclaimed: HolderState | None = None) -> RedisLease | str:
        """The lease, or the value of the lease someone else holds (acquire.lua returns it, saving a GET)."""
        token = secrets.token_hex(16)
        holder = Holder.for_this_process(session_id, kind)
        outcome = await self._run(
            self._acquire,
            keys=[self.keys.lease(kind, session_id), self.keys.fence(session_id)],
            args=[token, holder_head(holder), stale_ms, replacing, "1" if kind is LeaseKind.LANE else "0"],
        )
        if isinstance(outcome, str):
            return outcome
        return RedisLease(self, self.keys.lease(kind, session_id), token, replace(holder, fence=int(outcome)),
                          stale_ms, reclaimed=reclaimed)

    async def current_fence(self, session_id: str) -> int:
        value = await self._get(self.keys.fence(session_id))
        return int(value) if value is not None else 0

    async def holder(self, kind: LeaseKind, session_id: str) -> Holder | None:
        value = await self._get(self.keys.lease(kind, session_id))
        return _parse_lease_value(value)[1] if value is not None else None

    async def holders(self) -> list[Holder]:
        found: list[Holder] = []
        with outage_as_backend_unavailable():
            async for key in self.client.scan_iter(match=self.keys.lease_pattern(), count=500):
                value = await self._get(key)
                if value is not None:  # expired since the scan saw it
                    found.append(_parse_lease_value(value)[1])
        return found

    async def break_lease(self, holder: Holder, *, stale_ms: int) -> bool:
        key = self.keys.lease(holder.kind, holder.session_id)
        seen = await self._get(key)
        if seen is None or _parse_lease_value(seen)[1] != holder:
            return False
        if holder.state(stale_ms) is HolderState.LIVE:
            return False
        return bool(await self._run(self._break, keys=[key], args=[seen]))

    # queue

    async def enqueue(self, session_id: str, *, cap: int, stale_ms: int) -> Ticket | None:
        ticket = Ticket(session_id, secrets.token_hex(8))
        if await self._queue_call(ticket, cap=cap, stale_ms=stale_ms) < 0:
            return None
        self._ticket_ttl_ms[ticket.id] = stale_ms
        return ticket

    async def queue_position(self, ticket: Ticket, *, stale_ms: int) -> int:
        """0 at the head. A ticket that was dropped as dead (its waiter was silent
        past ``stale_ms``) rejoins at the tail: it is alive again, since it asks."""
        return await self._queue_call(ticket, cap=2**31, stale_ms=stale_ms)  # never refused: no cap applies

    async def _queue_call(self, ticket: Ticket, *, cap: int, stale_ms: int) -> int:
        return int(await self._run(
            self._queue,
            keys=[self.keys.queue(ticket.session_id)],
            args=[ticket.id, self.keys.ticket_prefix(ticket.session_id), cap, stale_ms],
        ))

    async def queue_length(self, session_id: str, *, stale_ms: int) -> int:
        """Read-only: tickets whose heartbeat key lives (dead ones are dropped by the next waiter's walk)."""
        prefix = self.keys.ticket_prefix(session_id)
        with outage_as_backend_unavailable():
            ticket_ids = cast("list[str]", await self.client.zrange(self.keys.queue(session_id), 0, -1))
            if not ticket_ids:
                return 0
            return int(await self.client.exists(*(prefix + ticket_id for ticket_id in ticket_ids)))

    async def leave_queue(self, ticket: Ticket) -> None:
        self._ticket_ttl_ms.pop(ticket.id, None)
        with lapse_on_outage(f"queue ticket {ticket.id}"):  # a ticket without heartbeat is skipped
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.zrem(self.keys.queue(ticket.session_id), ticket.id)
                pipe.delete(self.keys.ticket_prefix(ticket.session_id) + ticket.id)
                await pipe.execute()

    async def renew_ticket(self, ticket: Ticket) -> None:
        ttl_ms = self._ticket_ttl_ms.get(ticket.id)
        if ttl_ms is None:  # already left the queue
            return
        with outage_as_backend_unavailable():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(self.keys.ticket_prefix(ticket.session_id) + ticket.id, "1", px=ttl_ms)
                pipe.pexpire(self.keys.queue(ticket.session_id), ttl_ms)
                await pipe.execute()

    # plumbing

    async def _get(self, key: str) -> str | None:
        with outage_as_backend_unavailable():
            return cast("str | None", await self.client.get(key))  # str: the client decodes responses

    async def ping(self) -> None:
        with outage_as_backend_unavailable():
            await self.client.ping()

    async def aclose(self) -> None:
        await self.client.aclose()


class RedisRecords(RecordStorage):
    """Idempotency and dedupe records: JSON strings with a time to live (``SET [NX] PX``)."""

    def __init__(self, storage: RedisStorage) -> None:
        self._storage = storage

    async def add(self, key: str, value: dict[str, Any], *, ttl_ms: int) -> bool:
        with outage_as_backend_unavailable():
            return bool(await self._client.set(self._key(key), json.dumps(value), nx=True, px=ttl_ms))

    async def get(self, key: str) -> dict[str, Any] | None:
        raw = await self._storage._get(self._key(key))
        return json.loads(raw) if raw is not None else None

    async def put(self, key: str, value: dict[str, Any], *, ttl_ms: int) -> None:
        with outage_as_backend_unavailable():
            await self._client.set(self._key(key), json.dumps(value), px=ttl_ms)

    async def delete(self, key: str) -> None:
        with outage_as_backend_unavailable():
            await self._client.delete(self._key(key))

    @property
    def _client(self) -> aioredis.Redis:
        return self._storage.client

    def _key(self, key: str) -> str:
        return self._storage.keys.record(key)
