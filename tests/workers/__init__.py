"""Shared by the lock tests: settings per storage, sibling backends, and worker processes.

Worker processes run ``python -m tests.workers.locker <role> ...`` from the
repository root, so cross-process tests use real, separate interpreters.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sessiongate import Settings
from sessiongate._backend import Backend, open_backend
from sessiongate.gateway.settings import GatewaySettings
from tests.support import REPO_ROOT, clean_env


def settings_for(data_dir: Path, url: str = "file://", **overrides: Any) -> GatewaySettings:
    """GatewaySettings for a test; ``overrides`` are camelCase sections (``lane={"mode": "queue"}``)."""
    return GatewaySettings.load(env={}, overrides={"dataDir": str(data_dir), "backend": {"url": url}, **overrides})


def sibling_backends(settings: GatewaySettings, count: int = 2) -> list[Backend]:
    """Backends that share one storage as separate processes would (memory: one storage object)."""
    first = open_backend(settings)
    if settings.backend.url.startswith("memory"):
        return [first] + [Backend(first.storage, settings) for _ in range(count - 1)]
    return [first] + [open_backend(settings) for _ in range(count - 1)]


def spawn(role: str, settings: Settings, *args: object) -> subprocess.Popen[bytes]:
    """Start a worker process running ``role`` (see ``tests/workers/locker.py``), with the session layer's settings."""
    config = json.dumps(settings.model_dump(mode="json", by_alias=True, include=set(Settings.model_fields)))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.workers.locker", role, config, *map(str, args)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def publish(path: Path | str, text: str) -> None:
    """Write a report file all at once (temp file, then rename): a poller never reads it half-written."""
    partial = f"{path}.partial"
    Path(partial).write_text(text)
    os.replace(partial, path)


def wait_for_report(path: Path | str, worker: subprocess.Popen[bytes], *, timeout: float = 30) -> None:
    """Wait for ``worker``'s report at ``path``; if the worker exits first, fail at once with its stderr."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if worker.poll() is not None:
            _, stderr = worker.communicate()
            raise AssertionError(f"worker exited {worker.returncode} before writing {path}:\n{stderr.decode()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not written within {timeout} s")
        time.sleep(0.02)


HOLDER_STALE_MS = 1000

HOLDER_SCRIPT = """
import asyncio, sys
from sessiongate import Settings
from sessiongate.storage import LeaseKind, open_storage

async def main(data_dir, kind, session_id, stale_ms):
    storage = open_storage(Settings.load(overrides={"dataDir": data_dir}))  # backend.url from the env
    lease = await storage.try_acquire(LeaseKind(kind), session_id, stale_ms=stale_ms)
    print("held" if lease else "refused", flush=True)
    while lease is not None:
        await asyncio.sleep(0.1)
        if not await lease.renew():
            print("lost", flush=True)
            return

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


class HolderProcess:
    """A process holding one lease of one session, renewing it every 100 ms."""

    def __init__(
        self, data_dir: Path, kind: str, session_id: str, *, backend_url: str = "file://", stale_ms: int = HOLDER_STALE_MS
    ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER_SCRIPT, str(data_dir), kind, session_id, str(stale_ms)],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, env=clean_env({"SESSIONGATE_BACKEND__URL": backend_url}),
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "held"

    def next_line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no cleanup of any kind
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)
