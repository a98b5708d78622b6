"""``sessiongate transcripts export|import``: move transcripts between stores, back them up.

``export`` writes every record of the configured store (``transcript.url``: the
JSONL files of the data dir, or Redis) to standard output or ``--output``, one
JSON line per record: ``{"sessionId": ..., "record": {...}}``, sessions sorted,
each session's records in transcript order. ``import`` reads such lines and
writes the records, exactly as they were (ids, times, fences), into the
configured store, in batches that each land whole or not at all; a batch whose
first record is already there is skipped, so an import can be run again after
an interruption. Moving a deployment: ``export`` with the old config,
``import`` with the new one, while no gateway writes.

Exit codes: 0 done, 2 bad config, usage or input line, 3 backend unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from sessiongate import (
    BackendUnavailable,
    ConfigError,
    InvalidSessionId,
    TranscriptStore,
    open_backend,
    open_transcripts,
    validate_session_id,
)

from ._settings import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, load_settings, settings_options

__all__ = ["add_parser", "run"]

#: Records per restore call: one all-or-nothing write, and the unit an interrupted import resumes by.
IMPORT_BATCH = 500


class BadLine(ValueError):
    """An import line that is not ``{"sessionId": <valid id>, "record": {"id": ..., ...}}``."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "transcripts", help="export or import transcripts as JSON lines (file store <-> Redis)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="transcripts_action", metavar="ACTION", required=True)
    export = actions.add_parser("export", parents=[settings_options()], help="every record as JSON lines")
    export.add_argument("--session", action="append", metavar="ID", help="only this session (repeatable)")
    export.add_argument("--output", "-o", metavar="PATH", help="write here instead of standard output")
    restore = actions.add_parser("import", parents=[settings_options()], help="JSON lines into the configured store")
    restore.add_argument("--input", "-i", metavar="PATH", help="read here instead of standard input")
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args)
        for session_id in getattr(args, "session", None) or []:
            validate_session_id(session_id)
    except (ConfigError, InvalidSessionId) as exc:
        print(f"sessiongate transcripts: {exc}", file=sys.stderr)
        return EXIT_USAGE
    action = _export if args.transcripts_action == "export" else _import

    async def with_store() -> int:
        backend = open_backend(settings)
        try:
            return await action(args, open_transcripts(backend, settings))
        except BackendUnavailable as exc:
            print(f"sessiongate transcripts: {settings.transcript.url} unreachable: {exc.detail}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except BadLine as exc:
            print(f"sessiongate transcripts: {exc}", file=sys.stderr)
            return EXIT_USAGE
        finally:
            await backend.aclose()

    return asyncio.run(with_store())


@contextmanager
def _opened(path: str | None, mode: str, default: IO[str]) -> Iterator[IO[str]]:
    if path is None:
        yield default
        return
    with open(path, mode, encoding="utf-8") as stream:
        yield stream


async def _export(args: argparse.Namespace, store: TranscriptStore) -> int:
    session_ids = args.session or await store.session_ids()
    records = 0
    with _opened(args.output, "w", sys.stdout) as out:
        for session_id in session_ids:
            for record in await store.read_unlocked(session_id):
                out.write(json.dumps({"sessionId": session_id, "record": record}, ensure_ascii=False) + "\n")
                records += 1
    print(f"exported {records} records of {len(session_ids)} sessions from {store.location}", file=sys.stderr)
    return EXIT_OK


async def _import(args: argparse.Namespace, store: TranscriptStore) -> int:
    written = skipped = 0
    with _opened(args.input, "r", sys.stdin) as lines:
        for session_id, batch in _batches(lines):
            if await store.restore(session_id, batch):
                written += len(batch)
            else:
                skipped += len(batch)
    print(f"imported {written} records into {store.location}; {skipped} already there", file=sys.stderr)
    return EXIT_OK


def _batches(lines: IO[str]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Consecutive records of one session, at most :data:`IMPORT_BATCH` at a time, in file order."""
    session: str | None = None
    batch: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        session_id, record = _parsed(line, number)
        if batch and (session_id != session or len(batch) == IMPORT_BATCH):
            yield session, batch  # type: ignore[misc]
            batch = []
        session = session_id
        batch.append(record)
    if batch:
        yield session, batch  # type: ignore[misc]


def _parsed(line: str, number: int) -> tuple[str, dict[str, Any]]:
    try:
        entry = json.loads(line)
        session_id, record = entry["sessionId"], entry["record"]
        validate_session_id(session_id)
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise ValueError("the record has no string id")
    except (ValueError, KeyError, TypeError, InvalidSessionId) as exc:
        raise BadLine(f"line {number} is not a transcript export line: {exc}") from None
    return session_id, record
