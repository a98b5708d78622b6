"""Transcript stores: the interface (:mod:`.base`), the JSONL files and Redis streams behind it.

:func:`open_transcripts` picks one by ``transcript.url`` scheme, in this one
place, as ``open_backend`` picks the lease storage by ``backend.url``; the Redis
store is imported only when configured (no redis import for file use).
"""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from .._backend import Backend
from .._config import Settings
from ..storage import scheme_of
from .base import INDEXED_FIELDS, Durability, LockedTranscript, Page, Record, TranscriptStore, new_record_id, utc_now

__all__ = [
    "INDEXED_FIELDS",
    "Durability",
    "LockedTranscript",
    "Page",
    "Record",
    "TranscriptStore",
    "new_record_id",
    "open_transcripts",
    "utc_now",
]


def open_transcripts(backend: Backend, settings: Settings) -> TranscriptStore:
    """The store named by ``transcript.url``; a Redis store shares ``backend``'s Redis client and fences."""
    if scheme_of(settings.transcript.url) == "file":
        from .._store import FileTranscriptStore

        return FileTranscriptStore(backend, settings)
    redis_store = importlib.import_module(f"{__name__}.redis")
    parts = urlsplit(settings.transcript.url)
    location = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"  # no password
    store: TranscriptStore = redis_store.RedisTranscriptStore(
        backend, backend.storage.client, key_prefix=settings.backend.key_prefix, location=location  # type: ignore[attr-defined]
    )
    return store
