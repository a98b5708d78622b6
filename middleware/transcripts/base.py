"""What every transcript store does: append fenced turns, read the tail, a page or one record.

A transcript is a session's append-only list of records (dicts with ``id``,
``at``, ``role``, ``text`` ...). Stores differ in where the list lives (a JSONL
file per session, a Redis stream per session) and in where the fence is
checked, never in what callers see: the gateway holds a :class:`TranscriptStore`
and does not know which one it has.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "Durability",
    "INDEXED_FIELDS",
    "LockedTranscript",
    "Page",
    "Record",
    "TranscriptStore",
    "completed",
    "encode",
    "indexed_values",
    "new_record_id",
    "utc_now",
]

Record = dict[str, Any]

#: The fields a store can look a record up by (:meth:`TranscriptStore.find`).
INDEXED_FIELDS = ("id", "idempotencyKey", "replyTo", "externalId")


@dataclass(frozen=True)
class Page:
    """Consecutive records in transcript order; ``more`` when older records remain before them."""

    records: list[Record]
    more: bool


@dataclass(frozen=True)
class Durability:
    """``durable``: an acknowledged append survives power loss; ``detail`` says why or what risks it."""

    durable: bool
    detail: str


class LockedTranscript(ABC):
    """One session's transcript inside :meth:`TranscriptStore.locked` (reads, then maybe an append)."""

    session_id: str

    @abstractmethod
    async def read(self) -> list[Record]:
        """Every record, in order."""

    @abstractmethod
    async def tail(self, limit: int, *, through: str | None = None) -> list[Record]:
        """The newest ``limit`` records (up to and including record id ``through``).

        Raises ``ValueError`` when ``through`` names no record.
        """

    @abstractmethod
    async def find(self, field: str, value: str) -> Record | None:
        """The first record whose ``field`` (one of :data:`INDEXED_FIELDS`) is ``value``."""

    @abstractmethod
    async def append(self, records: list[Record], *, fence: int | None = None) -> list[Record]:
        """Append ``records`` all or nothing; fills ``id``/``at``, records ``fence``; returns what was stored.

        Raises :class:`~sessiongate.FencedOut` when ``fence`` is older than the
        session's newest fencing token (the turn lost its lane).
        """


class TranscriptStore(ABC):
    """Every session's transcript; :func:`sessiongate.open_transcripts` picks one by ``transcript.url``."""

    #: Where the transcripts live, for messages (a directory or a Redis URL without secrets).
    location: str

    @abstractmethod
    def locked(self, session_id: str) -> AbstractAsyncContextManager[LockedTranscript]:
        """Hold the session's write lock for several steps (read, then append) as one critical section."""

    @abstractmethod
    async def read(self, session_id: str) -> list[Record]:
        """Every record, in order, under the write lock."""

    @abstractmethod
    async def read_unlocked(self, session_id: str) -> list[Record]:
        """A lock-free snapshot of every record."""

    @abstractmethod
    async def page(self, session_id: str, *, limit: int, before: str | None = None) -> Page | None:
        """Lock-free: the newest ``limit`` records, or those just before record id ``before``.

        ``None`` when ``before`` names no record of this session.
        """

    @abstractmethod
    async def find(self, session_id: str, field: str, value: str) -> Record | None:
        """Lock-free: the first record whose ``field`` (one of :data:`INDEXED_FIELDS`) is ``value``."""

    @abstractmethod
    async def append(self, session_id: str, records: list[Record], *, fence: int | None = None) -> list[Record]:
        """Append ``records`` atomically (see :meth:`LockedTranscript.append`)."""

    @abstractmethod
    async def restore(self, session_id: str, records: list[Record]) -> bool:
        """Write ``records`` exactly as given (ids, times, fences kept; no fence check), all or nothing.

        For moving transcripts between stores (``sessiongate transcripts import``):
        ``False``, and nothing written, when the first record's id is already stored,
        so importing the same batches again adds nothing.
        """

    @abstractmethod
    async def session_ids(self) -> list[str]:
        """Every session that has a transcript, sorted."""

    @abstractmethod
    async def count(self, session_id: str) -> int:
        """How many records the session's transcript holds (0 when it has none)."""

    @abstractmethod
    def check_writable(self) -> None:
        """Raise :class:`~sessiongate.StorageFailed` while appends fail (for readiness probes)."""

    @abstractmethod
    async def durability(self) -> Durability:
        """Whether an acknowledged append survives a crash of the machine, as configured now."""



def indexed_values(record: Record) -> list[tuple[str, str]]:
    """The ``(field, value)`` pairs a store indexes ``record`` under (values as strings)."""
    return [(field, str(record[field])) for field in INDEXED_FIELDS if record.get(field) is not None]


def new_record_id() -> str:
    """32 random hex digits (128 bits, like a UUID4's hex, without building a UUID object)."""
    return os.urandom(16).hex()


def utc_now() -> str:
    """RFC 3339 UTC timestamp with milliseconds, e.g. ``2026-01-31T12:00:00.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def completed(record: Record, fence: int | None) -> Record:
    """The record as stored: an ``id`` and ``at`` if it had none, and the writer's ``fence``."""
    done = dict(record)
    done.setdefault("id", new_record_id())
    done.setdefault("at", utc_now())
    done["fence"] = fence
    return done


def encode(record: Record) -> str:
    """One record's wire and file form: compact JSON, non-ASCII kept (one line of a JSONL file)."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))
