"""Shared by the lock tests: settings per storage, sibling backends, and worker processes.

Worker processes run ``python -m tests.workers.locker <role> ...`` from the
repository root, so cross-process tests use real, separate interpreters.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from middleware._backend import Backend, open_backend
from middleware._config import Settings
from tests.support import REPO_ROOT

# The storages every strategy test runs against; a new storage is one more entry here.

def settings_for(data_dir: Path, url: str = "file://", **overrides: Any) -> Settings:
    """Settings for a test; ``overrides`` are camelCase sections (``lane={"mode": "queue"}``)."""
    return Settings.load(env={}, overrides={"dataDir": str(data_dir), "backend": {"url": url}, **overrides})

def sibling_backends(settings: Settings, count: int = 2) -> list[Backend]:
    """Backends that share one storage as separate processes would (memory: one storage object)."""
    first = open_backend(settings)
    if settings.backend.url.startswith("memory"):
        return [first] + [Backend(first.storage, settings) for _ in range(count - 1)]
    return [first] + [open_backend(settings) for _ in range(count - 1)]

def spawn(role: str, settings: Settings, *args: object) -> subprocess.Popen[bytes]:
    """Start a worker process running ``role`` (see ``tests/workers/locker.py``)."""
    config = json.dumps(settings.model_dump(mode="json", by_alias=True))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.workers.locker", role, config, *map(str, args)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
