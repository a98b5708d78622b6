"""Transcripts in Redis: one stream per session, appended by a fenced Lua script.

Why a stream: entries are immutable and ordered by an id Redis issues and
persists (it never goes backwards, even after a restart), the tail and any page
are one ``XREVRANGE`` (a radix-tree seek, O(log n) however long the chat), and
the listpack encoding keeps a million short records compact. A hash beside it
maps ``"field:value"`` (:data:`~.base.INDEXED_FIELDS`) to a stream id, so
``find`` (the Idempotency-Key recovery, a page's ``before``) is two O(1)/O(log n)
lookups, not a scan. No key has a time to live: transcripts are kept.

Appends go through ``append.lua``, which checks the caller's fence against the
session's newest fence (the counter the Redis lease storage issues lane grants
from, in the same Redis) and writes every record of the turn or none. There is
no window between the check and the write, so a writer frozen past ``staleMs``
cannot land a late append (see ``docs/redis.md``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from .._backend import Backend
from .._errors import FencedOut, StorageFailed
from .._metrics import FENCING_REFUSALS
from ..storage.redis import OUTAGE_ERRORS, outage_as_backend_unavailable, unavailable
from .base import Durability, LockedTranscript, Page, Record, TranscriptStore, completed, encode, indexed_values

__all__ = ["RedisLockedTranscript", "RedisTranscriptStore", "TranscriptKeys", "judge_persistence"]

logger = logging.getLogger("sessiongate.transcripts.redis")

_APPEND = (resources.files(__package__) / "append.lua").read_text(encoding="utf-8")
_APPEND_SHA = hashlib.sha1(_APPEND.encode()).hexdigest()
WRITTEN, REPEATED = 0, -1  # append.lua's answers besides a newer fence


class TranscriptKeys:
    """Key names under ``backend.keyPrefix``, hash-tagged by session like the lease keys (one cluster slot)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def stream(self, session_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:transcript"

    def index(self, session_id: str) -> str:
        return f"{self.prefix}:{{{session_id}}}:transcript:index"

    def stream_pattern(self) -> str:
        """SCAN pattern of every transcript stream (glob characters in the prefix escaped)."""
        return re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + ":{*}:transcript"

    def session_of(self, stream_key: str) -> str:
        return stream_key[len(self.prefix) + 2 : -len("}:transcript")]


class RedisTranscriptStore(TranscriptStore):
    """Transcripts in the backend's Redis (``transcript.url = redis://...``, the same server as ``backend.url``)."""

    def __init__(self, backend: Backend, client: aioredis.Redis, *, key_prefix: str, location: str) -> None:
        self._backend = backend
        self._client = client
        self.keys = TranscriptKeys(key_prefix)
        self.location = location
        self._fence_key = backend.storage.keys.fence  # type: ignore[attr-defined]  # a RedisStorage's

    @asynccontextmanager
    async def locked(self, session_id: str) -> AsyncIterator[RedisLockedTranscript]:
        """The write lock (a Redis lease) around several steps, as the file store does.

        Appends need no lock here (the script is atomic and checks the fence), but
        a read-then-append section keeps the same meaning on both stores.
        """
        async with self._backend.write_lock(session_id):
            yield RedisLockedTranscript(self, session_id)

    async def read(self, session_id: str) -> list[Record]:
        async with self.locked(session_id) as transcript:
            return await transcript.read()

    async def read_unlocked(self, session_id: str) -> list[Record]:
        with outage_as_backend_unavailable():
            entries = await self._client.xrange(self.keys.stream(session_id))
        return _records(entries)

    async def tail(self, session_id: str, limit: int, *, through: str | None = None) -> list[Record]:
        """The newest ``limit`` records up to and including record id ``through``; ``ValueError`` if unknown."""
        newest = "+"
        if through is not None:
            found = await self._stream_id(session_id, "id", through)
            if found is None:
                raise ValueError(f"record {through!r} is not in the transcript of {session_id!r}")
            newest = found
        if limit <= 0:
            return []
        with outage_as_backend_unavailable():
            entries: Any = await self._client.xrevrange(self.keys.stream(session_id), newest, "-", count=limit)
        return _records(entries[::-1])

    async def page(self, session_id: str, *, limit: int, before: str | None = None) -> Page | None:
        newest = "+"
        if before is not None:
            found = await self._stream_id(session_id, "id", before)
            if found is None:
                return None
            newest = f"({found}"  # exclusive
        with outage_as_backend_unavailable():
            entries: Any = await self._client.xrevrange(self.keys.stream(session_id), newest, "-", count=limit + 1)
        return Page(_records(entries[:limit][::-1]), more=len(entries) > limit)

    async def find(self, session_id: str, field: str, value: str) -> Record | None:
        stream_id = await self._stream_id(session_id, field, value)
        if stream_id is None:
            return None
        with outage_as_backend_unavailable():
            entries = await self._client.xrange(self.keys.stream(session_id), stream_id, stream_id)
        return _records(entries)[0] if entries else None

    async def append(self, session_id: str, records: list[Record], *, fence: int | None = None) -> list[Record]:
        """One ``append.lua`` call: the fence checked and every record written, in Redis, or nothing."""
        stored = [completed(record, fence) for record in records]
        if stored:
            newest = await self._write(session_id, stored, fence)
            if newest not in (WRITTEN, REPEATED):  # a repeat is this very append, sent again
                FENCING_REFUSALS.inc()
                raise FencedOut(session_id, fence=fence or 0, current_fence=newest)
        return stored

    async def restore(self, session_id: str, records: list[Record]) -> bool:
        return bool(records) and await self._write(session_id, records, None) == WRITTEN

    async def _write(self, session_id: str, records: list[Record], fence: int | None) -> int:
        """Run ``append.lua``: :data:`WRITTEN`, :data:`REPEATED` (first id already stored) or the newer fence."""
        args: list[Any] = [
            self.keys.stream(session_id), self.keys.index(session_id), self._fence_key(session_id),
            "" if fence is None else str(fence),
        ]
        for record in records:
            entries = [f"{field}:{value}" for field, value in indexed_values(record)]
            args += [encode(record), len(entries), *entries]
        try:  # EVALSHA straight away (this is every turn's write); the script is loaded on first use
            try:
                return await self._client.evalsha(_APPEND_SHA, 3, *args)  # type: ignore[no-any-return]
            except NoScriptError:  # a fresh or restarted Redis
                await self._client.script_load(_APPEND)
                return await self._client.evalsha(_APPEND_SHA, 3, *args)  # type: ignore[no-any-return]
        except OUTAGE_ERRORS as exc:
            raise unavailable(exc) from exc
        except ResponseError as exc:  # e.g. OOM: Redis refused the script before it wrote anything
            logger.error("append to %s refused by Redis: %s", self.keys.stream(session_id), exc)
            raise StorageFailed(
                f"the transcript of session {session_id!r} could not be written (Redis: {exc})", session_id=session_id
            ) from exc

    async def session_ids(self) -> list[str]:
        found: set[str] = set()
        with outage_as_backend_unavailable():
            async for key in self._client.scan_iter(match=self.keys.stream_pattern(), count=1000, _type="stream"):
                found.add(self.keys.session_of(key))
        return sorted(found)

    async def count(self, session_id: str) -> int:
        with outage_as_backend_unavailable():
            return int(await self._client.xlen(self.keys.stream(session_id)))

    def check_writable(self) -> None:
        """Nothing to report: a Redis that cannot take writes is ``backend-unavailable``, which /readyz checks."""

    async def durability(self) -> Durability:
        """From the server's own settings (``CONFIG GET``, else ``INFO persistence`` where CONFIG is disabled)."""
        with outage_as_backend_unavailable():
            try:
                config = await self._client.config_get("append*")
            except ResponseError:  # CONFIG renamed away (managed Redis): AOF on or off is all INFO tells
                info = await self._client.info("persistence")
                config = {"appendonly": "yes" if info.get("aof_enabled") else "no", "appendfsync": "unknown"}
        return judge_persistence(str(config.get("appendonly") or "no"), str(config.get("appendfsync") or "unknown"))

    async def _stream_id(self, session_id: str, field: str, value: str) -> str | None:
        with outage_as_backend_unavailable():
            found = await self._client.hget(self.keys.index(session_id), f"{field}:{value}")
        return None if found is None else str(found)


class RedisLockedTranscript(LockedTranscript):
    """One session's Redis transcript while its write lock is held (from :meth:`RedisTranscriptStore.locked`)."""

    def __init__(self, store: RedisTranscriptStore, session_id: str) -> None:
        self.session_id = session_id
        self._store = store

    async def read(self) -> list[Record]:
        return await self._store.read_unlocked(self.session_id)

    async def tail(self, limit: int, *, through: str | None = None) -> list[Record]:
        return await self._store.tail(self.session_id, limit, through=through)

    async def find(self, field: str, value: str) -> Record | None:
        return await self._store.find(self.session_id, field, value)

    async def append(self, records: list[Record], *, fence: int | None = None) -> list[Record]:
        return await self._store.append(self.session_id, records, fence=fence)


def judge_persistence(appendonly: str, appendfsync: str) -> Durability:
    """What a Redis server's AOF settings mean for acknowledged appends (see docs/redis.md, Durability)."""
    settings = f"appendonly {appendonly}, appendfsync {appendfsync}"
    if appendonly != "yes":
        return Durability(False, f"{settings}: no AOF, a Redis crash loses every append since the last RDB snapshot")
    if appendfsync == "always":
        return Durability(True, f"{settings}: each append is on disk before Redis acknowledges it")
    if appendfsync == "everysec":
        return Durability(False, f"{settings}: a crash of the Redis host can lose the last second of appends")
    return Durability(False, f"{settings}: the OS decides when appends reach the disk; set appendfsync always")


def _records(entries: Any) -> list[Record]:
    """Records from stream entries ``[(id, {"r": json}), ...]`` (redis-py types them loosely)."""
    return [json.loads(fields["r"]) for _, fields in entries]
