"""``sessiongate doctor``: check what the gateway needs before (or while) it runs.

One line per check, ``ok`` / ``warn`` / ``fail``: the config is valid, the data
dir exists and is writable, the lock backend answers, no lock has a dead or
stale holder, every transcript parses, each provider's API key variable is set,
and the sessions API is not left open to the network while channels are on.
It changes nothing, except writing and removing a probe file in the data dir;
a missing data dir is a failure (run it where the gateway runs, or pass
``--data-dir``), not created.

Exit codes: 0 no check failed (warnings allowed), 1 a check failed,
2 the config is invalid (the line names the key) or bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sessiongate import (
    CONFIG_PATH_ENV,
    Backend,
    BackendUnavailable,
    ConfigError,
    FileTranscriptStore,
    HolderState,
    TranscriptStore,
    open_backend,
    open_transcripts,
)

from .._auth import open_api_warning
from ..settings import GatewaySettings
from ._settings import EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, load_settings, settings_options
from .locks import holder_views, transcript_info

__all__ = ["PING_TIMEOUT_S", "Check", "Level", "add_parser", "run"]

PING_TIMEOUT_S = 5.0


class Level(str, enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    level: Level
    name: str
    message: str

    def line(self) -> str:
        return f"{self.level.value:<5} {self.name}: {self.message}"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        "doctor", parents=[settings_options()], help="check config, data dir, backend, locks and transcripts",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args)
    except ConfigError as exc:
        print(Check(Level.FAIL, "config", str(exc).removeprefix("config error: ")).line())
        return EXIT_USAGE
    failed = False
    for check in asyncio.run(_checks(settings, args.config or os.environ.get(CONFIG_PATH_ENV))):
        print(check.line(), flush=True)
        failed |= check.level is Level.FAIL
    return EXIT_PROBLEMS if failed else EXIT_OK


async def _checks(settings: GatewaySettings, config_path: str | None) -> list[Check]:
    source = f"file {config_path}" if config_path else "defaults"
    checks = [Check(Level.OK, "config", f"valid ({source} + environment)"), _data_dir(settings)]
    data_dir_usable = checks[-1].level is not Level.FAIL
    if not data_dir_usable and settings.backend.url.startswith("file://"):
        return checks  # the file backend lives in the data dir: nothing more to look at
    backend = open_backend(settings)
    try:
        reachable = await _backend_reachable(settings, backend)
        checks.append(reachable)
        if reachable.level is not Level.FAIL:
            checks.append(await _lock_states(settings, backend))
        on_disk = settings.transcript.url.startswith("file://")
        if data_dir_usable if on_disk else reachable.level is not Level.FAIL:  # a file store would create the folder
            store = open_transcripts(backend, settings)
            checks.append(await _transcripts(store))
            checks.append(await _durability(store))
    finally:
        await backend.aclose()
    checks.extend(_providers(settings))
    checks.append(_api_exposure(settings))
    return checks


def _api_exposure(settings: GatewaySettings) -> Check:
    warning = open_api_warning(settings)
    if warning is not None:
        return Check(Level.WARN, "auth", warning)
    open_to = "open (no auth.tokens)" if not settings.auth.tokens else f"{len(settings.auth.tokens)} token(s)"
    return Check(Level.OK, "auth", f"sessions API {open_to} on {settings.server.host}")


def _data_dir(settings: GatewaySettings) -> Check:
    data_dir = Path(settings.data_dir).resolve()
    if not data_dir.is_dir():
        return Check(Level.FAIL, "data dir", f"{data_dir} does not exist: nothing has run here "
                                             "(run doctor where the gateway runs, or pass --data-dir)")
    try:
        with tempfile.NamedTemporaryFile(dir=data_dir, prefix=".doctor-") as probe:
            probe.write(b"probe")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        return Check(Level.FAIL, "data dir", f"{data_dir} is not writable: {exc.strerror}")
    return Check(Level.OK, "data dir", f"{data_dir} writable")


async def _backend_reachable(settings: GatewaySettings, backend: Backend) -> Check:
    started = time.monotonic()
    try:
        await asyncio.wait_for(backend.ping(), PING_TIMEOUT_S)
    except (BackendUnavailable, TimeoutError, OSError) as exc:
        reason = getattr(exc, "detail", None) or str(exc) or f"no answer within {PING_TIMEOUT_S:.0f} s"
        return Check(Level.FAIL, "backend", f"{settings.backend.url} unreachable: {reason}")
    return Check(Level.OK, "backend", f"{settings.backend.url} reachable ({(time.monotonic() - started) * 1000:.0f} ms)")


async def _lock_states(settings: GatewaySettings, backend: Backend) -> Check:
    views = await holder_views(backend.storage, settings)
    counts = Counter(view.state for view in views)
    summary = ", ".join(f"{counts[state]} {state.value}" for state in HolderState if counts[state]) or "none held"
    if any(view.removable for view in views):
        return Check(Level.WARN, "locks", f"{summary}; run `sessiongate locks clean` (or let the next writer reclaim them)")
    return Check(Level.OK, "locks", summary)


async def _durability(store: TranscriptStore) -> Check:
    """Whether an acknowledged turn survives a crash (for Redis: the server's own AOF settings)."""
    durability = await store.durability()
    return Check(Level.OK if durability.durable else Level.WARN, "durability", durability.detail)


async def _transcripts(store: TranscriptStore) -> Check:
    session_ids = await store.session_ids()
    if not isinstance(store, FileTranscriptStore):
        records = sum([await store.count(session_id) for session_id in session_ids])
        return Check(Level.OK, "transcripts", f"{len(session_ids)} sessions, {records} records in {store.location}")
    infos = [await transcript_info(store, session_id) for session_id in session_ids]
    records = sum(info["records"] for info in infos)
    broken = [info["path"] for info in infos if info["badLines"]]
    torn = [info["path"] for info in infos if info["tornTail"]]
    counted = f"{len(infos)} sessions, {records} records"
    if broken:
        return Check(Level.FAIL, "transcripts", f"{counted}; lines that are not JSON in {_some(broken)}")
    if torn:
        return Check(Level.WARN, "transcripts", f"{counted}; torn last line (repaired on next write) in {_some(torn)}")
    return Check(Level.OK, "transcripts", f"{counted}, all parse")


def _some(paths: list[str], shown: int = 3) -> str:
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more


def _providers(settings: GatewaySettings) -> Iterator[Check]:
    for provider in settings.providers:
        if provider.api_key_env and not os.environ.get(provider.api_key_env):
            yield Check(Level.WARN, "provider", f"{provider.id} ({provider.type}): ${provider.api_key_env} is not set")
        else:
            yield Check(Level.OK, "provider", f"{provider.id} ({provider.type}) configured")
