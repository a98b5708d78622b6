"""The channels' own files in the data dir: the inbound spool and the per-session delivery cursors.

Why it exists: two facts of the channel worker must survive a crash and be
seen by every gateway sharing the transcripts, yet belong in no transcript:
messages accepted while their transcript was busy, and how far each
session's replies have been delivered. Both are small JSON files replaced
atomically and fsynced (:func:`write_durably`), beside the transcripts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sessiongate import existing_file

from .base import Inbound

__all__ = ["DeliveryCursors", "Spool", "write_durably"]

logger = logging.getLogger("sessiongate.channels")


class Spool:
    """Inbound messages accepted while their transcript was busy: one fsynced JSON file each.

    Used by Slack, which must be acknowledged within 3 s and must never get a
    409/429. It lives in the data dir beside the transcripts, so every
    gateway sharing the transcripts drains it (on its next start at the latest).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def put(self, inbound: Inbound) -> None:
        write_durably(self.directory / f"{time.time_ns():020d}-{uuid.uuid4().hex}.json", asdict(inbound))

    def entries(self) -> list[tuple[Path, Inbound]]:
        """Spooled messages, oldest first (unreadable files are left for an operator)."""
        if not self.directory.is_dir():
            return []
        entries = []
        for path in sorted(self.directory.glob("[0-9]*.json")):
            try:
                entries.append((path, Inbound(**json.loads(path.read_text(encoding="utf-8")))))
            except (OSError, ValueError, TypeError) as exc:
                logger.error("unreadable spool file %s: %s", path, exc)
        return entries

    def remove(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class DeliveryCursors:
    """Per session, the newest reply handed to the platform (or given up on): one small JSON file each.

    Kept beside the transcripts rather than in the TTL records, so it never
    expires and is exactly as shared (and as durable) as the transcripts it
    points into. Written only under the session's lane.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def get(self, session_id: str) -> str | None:
        try:
            return json.loads(self._path(session_id).read_text(encoding="utf-8"))["replyId"]
        except FileNotFoundError:
            return None

    def put(self, session_id: str, state: dict[str, Any]) -> None:
        write_durably(self._path(session_id), state)

    def _path(self, session_id: str) -> Path:
        return existing_file(self.directory, session_id, ".json")


def write_durably(path: Path, value: dict[str, Any]) -> None:
    """Replace ``path`` with ``value`` as JSON, atomically and fsynced (file and directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(value, handle)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)
    directory_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
