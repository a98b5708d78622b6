"""``sessiongate locks list|inspect SESSION|clean [--dry-run]``: see and clear session lock holders.

Every lock (a session's lane or its transcript write lock) records who holds it:
pid, host, process start time, when it was granted, its last heartbeat and its
fencing token. From that each holder is ``live``, ``dead-pid`` (same host, the
process is gone or its pid reused) or ``stale`` (no heartbeat for
``sessionWriteLock.staleMs``). ``clean`` removes only dead-pid and stale
holders, through the storage's ``break_lease``, which re-checks the holder
under the storage's own guard: a holder that came back to life, or a lock a
live gateway took over meanwhile, is left alone.

Exit codes: 0 ok (``list``/``inspect``: no dead or stale holder; ``clean``:
done), 1 dead or stale holders present (``list``/``inspect``), 2 bad config or
usage, or no data dir where the file backend keeps its locks (nothing has run
there: "no locks held" would be about nothing), 3 lock backend unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sessiongate import (
    Backend,
    BackendUnavailable,
    ConfigError,
    FileTranscriptStore,
    Holder,
    HolderState,
    InvalidSessionId,
    LeaseKind,
    LeaseStorage,
    Settings,
    TranscriptStore,
    open_backend,
    open_transcripts,
    validate_session_id,
)

from ._settings import EXIT_OK, EXIT_PROBLEMS, EXIT_UNREACHABLE, EXIT_USAGE, load_settings, settings_options

__all__ = [
    "COLUMNS",
    "HolderView",
    "add_parser",
    "duration",
    "holder_views",
    "run",
    "table",
    "transcript_info",
]


@dataclass(frozen=True)
class HolderView:
    """A holder with what an operator wants to know about it now."""

    holder: Holder
    state: HolderState
    age_s: float
    silent_s: float

    @classmethod
    def of(cls, holder: Holder, stale_ms: int, now: float) -> HolderView:
        return cls(holder, holder.state(stale_ms, now=now), now - holder.since, now - holder.heartbeat_at)

    @property
    def removable(self) -> bool:
        return self.state is not HolderState.LIVE

    def to_json(self) -> dict[str, Any]:
        return {
            **self.holder.to_json(),
            "state": self.state.value,
            "ageS": round(self.age_s, 3),
            "heartbeatAgeS": round(self.silent_s, 3),
        }

    def row(self) -> list[str]:
        h = self.holder
        return [h.session_id, h.kind.value, self.state.value, str(h.pid), h.host,
                duration(self.age_s), f"{duration(self.silent_s)} ago", str(h.fence)]


COLUMNS = ["SESSION", "KIND", "STATE", "PID", "HOST", "AGE", "HEARTBEAT", "FENCE"]


def duration(seconds: float) -> str:
    """``0.4s``, ``12s``, ``5m02s``, ``3h07m``: short and sortable by eye."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [COLUMNS, *rows])


async def transcript_info(store: TranscriptStore, session_id: str) -> dict[str, Any]:
    """Where a transcript lives and its size; a file's shape too, read without a lock and without repairing it."""
    if not isinstance(store, FileTranscriptStore):
        return {"location": store.location, "records": await store.count(session_id)}
    path = store.path_for(session_id)
    info: dict[str, Any] = {"path": str(path), "exists": path.exists()}
    if not info["exists"]:
        return info
    records = bad_lines = 0
    torn_tail = False
    with path.open("rb") as lines:
        for line in lines:
            if not line.endswith(b"\n"):
                torn_tail = True  # only the last line can lack its newline
            elif line.strip():
                try:
                    json.loads(line)
                    records += 1
                except ValueError:
                    bad_lines += 1
    return {**info, "bytes": path.stat().st_size, "records": records, "badLines": bad_lines, "tornTail": torn_tail}


async def holder_views(storage: LeaseStorage, settings: Settings) -> list[HolderView]:
    """Every recorded holder, sorted by session then kind."""
    now = time.time()
    stale_ms = settings.session_write_lock.stale_ms
    views = [HolderView.of(holder, stale_ms, now) for holder in await storage.holders()]
    return sorted(views, key=lambda v: (v.holder.session_id, v.holder.kind.value))


Action = Callable[[argparse.Namespace, Settings, Backend], Awaitable[int]]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "locks", help="list, inspect and clean session lock holders",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="locks_action", metavar="ACTION", required=True)
    common = settings_options()
    listing = actions.add_parser("list", parents=[common], help="every lock holder and its state")
    listing.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    inspect = actions.add_parser("inspect", parents=[common], help="one session: holders, fence, transcript")
    inspect.add_argument("session", metavar="SESSION")
    inspect.add_argument("--json", action="store_true", help="one JSON object instead of text")
    clean = actions.add_parser("clean", parents=[common], help="remove dead-pid and stale holders")
    clean.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    return parser


def run(args: argparse.Namespace) -> int:
    action = {"list": _list, "inspect": _inspect, "clean": _clean}[args.locks_action]
    try:
        settings = load_settings(args)
        if getattr(args, "session", None) is not None:
            validate_session_id(args.session)
    except (ConfigError, InvalidSessionId) as exc:
        print(f"sessiongate locks: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if settings.backend.url.startswith("file://") and not settings.file_storage_root.is_dir():
        # opening the backend would create an empty one here, and "no locks held" would be about nothing
        print(f"sessiongate locks: no data dir at {settings.file_storage_root.resolve()}: nothing has run here "
              "(run where the gateway runs, or pass --data-dir)", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(_with_backend(action, args, settings))


async def _with_backend(action: Action, args: argparse.Namespace, settings: Settings) -> int:
    backend = open_backend(settings)
    try:
        return await action(args, settings, backend)
    except BackendUnavailable as exc:
        print(f"sessiongate locks: lock backend {settings.backend.url} unreachable: {exc.detail}", file=sys.stderr)
        return EXIT_UNREACHABLE
    finally:
        await backend.aclose()


def _status(views: list[HolderView]) -> int:
    return EXIT_PROBLEMS if any(view.removable for view in views) else EXIT_OK


async def _list(args: argparse.Namespace, settings: Settings, backend: Backend) -> int:
    views = await holder_views(backend.storage, settings)
    if args.json:
        print(json.dumps([view.to_json() for view in views], indent=2))
    elif views:
        print(table([view.row() for view in views]))
    else:
        print("no locks held")
    return _status(views)


async def _inspect(args: argparse.Namespace, settings: Settings, backend: Backend) -> int:
    session_id, storage = args.session, backend.storage
    now = time.time()
    stale_ms = settings.session_write_lock.stale_ms
    views = {}
    for kind in LeaseKind:
        holder = await storage.holder(kind, session_id)
        views[kind] = None if holder is None else HolderView.of(holder, stale_ms, now)
    report = {
        "sessionId": session_id,
        "fence": await storage.current_fence(session_id),
        "queued": await storage.queue_length(session_id, stale_ms=stale_ms),
        "holders": {kind.value: view and view.to_json() for kind, view in views.items()},
        "transcript": await transcript_info(open_transcripts(backend, settings), session_id),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"session     {session_id}")
        print(f"fence       {report['fence']} (newest fencing token issued)")
        print(f"queue       {report['queued']} waiting (lane.mode = queue)")
        for kind, view in views.items():
            print(f"{kind.value + ' lock':<11} " + ("free" if view is None else _holder_line(view)))
        print("transcript  " + _transcript_line(report["transcript"]))
    return _status([view for view in views.values() if view is not None])


def _holder_line(view: HolderView) -> str:
    h = view.holder
    return (f"{view.state.value}: pid {h.pid} on {h.host}, held {duration(view.age_s)}, "
            f"last heartbeat {duration(view.silent_s)} ago, fence {h.fence}")


def _transcript_line(info: dict[str, Any]) -> str:
    if "path" not in info:  # not a file: Redis
        return f"{info['location']} ({info['records']} records)"
    if not info["exists"]:
        return f"{info['path']} (none yet)"
    bad = f", {info['badLines']} lines not JSON" if info["badLines"] else ""
    torn = ", torn last line (repaired on next write)" if info["tornTail"] else ""
    return f"{info['path']} ({info['bytes']} bytes, {info['records']} records{bad}{torn})"


async def _clean(args: argparse.Namespace, settings: Settings, backend: Backend) -> int:
    storage, stale_ms = backend.storage, settings.session_write_lock.stale_ms
    doomed = [view for view in await holder_views(storage, settings) if view.removable]
    for view in doomed:
        h = view.holder
        what = f"{h.kind.value} lock of {h.session_id} ({view.state.value}, pid {h.pid} on {h.host})"
        if args.dry_run:
            print(f"would remove {what}")
        elif await storage.break_lease(h, stale_ms=stale_ms):
            print(f"removed {what}")
        else:
            print(f"kept {what}: it is live again or was taken over meanwhile")
    if not doomed:
        print("nothing to clean: no dead-pid or stale holders")
    return EXIT_OK
