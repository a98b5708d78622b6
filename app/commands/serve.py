"""``sessiongate serve``: resolve and validate the settings, then run the gateway under uvicorn.

The settings are resolved once, here (CLI > environment > file > default), so a
bad config stops the command before anything listens. ``--workers N`` needs an
import string rather than an app object, so the resolved settings reach every
worker as JSON in :data:`app._server.SETTINGS_ENV`. With more than one worker
the Prometheus client must write per-process files that ``/metrics`` adds up:
``PROMETHEUS_MULTIPROC_DIR`` is pointed at a fresh folder under the data dir
before the workers (fresh interpreters) import anything.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import uvicorn

from sessiongate import ConfigError

from .._auth import open_api_warning
from .._http import MAX_HEAD_BYTES, BoundedHttpToolsProtocol
from .._logging import configure_logging
from .._server import SETTINGS_ENV
from ..routes.metrics import MULTIPROC_ENV
from ..settings import GatewaySettings
from ._settings import EXIT_USAGE, load_settings, settings_options

__all__ = ["HEAD_TIMEOUT_S", "add_parser", "ensure_data_dir", "multiprocess_metrics_dir", "run"]

HEAD_TIMEOUT_S = 5  # longest wait for a request's head, and for the next request on a kept-alive connection


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="run the gateway (the default command)",
        description="Run the gateway: webchat API, channels, /healthz, /metrics, /openapi.json.",
        parents=[settings_options()],
    )
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (default 8787)")
    parser.add_argument("--workers", type=int, metavar="N", help="uvicorn worker processes (default 1)")
    return parser


def run(args: argparse.Namespace) -> int:
    server = {key: value for key, value in (("host", args.host), ("port", args.port), ("workers", args.workers))
              if value is not None}
    try:
        settings = load_settings(args, server=server)
        ensure_data_dir(settings)
    except ConfigError as exc:
        print(f"sessiongate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.server.log_format)
    if (warning := open_api_warning(settings)) is not None:
        logging.getLogger("sessiongate.serve").warning(warning)
    os.environ[SETTINGS_ENV] = settings.model_dump_json(by_alias=True)
    metrics_dir = multiprocess_metrics_dir(settings) if settings.server.workers > 1 else None
    try:
        uvicorn.run(
            "sessiongate.gateway._server:app_from_environment",
            factory=True,
            host=settings.server.host,
            port=settings.server.port,
            workers=settings.server.workers,
            log_config=None,  # app._logging formats every line, in every worker
            access_log=False,  # app._logging.RequestLog writes one line per request
            timeout_graceful_shutdown=5,
            http=BoundedHttpToolsProtocol,  # httptools with a bounded request head (size, count, time)
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
            timeout_keep_alive=HEAD_TIMEOUT_S,
            proxy_headers=False,  # it would trust X-Forwarded-For from 127.0.0.1; the app trusts server.trustedProxies
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def ensure_data_dir(settings: GatewaySettings) -> None:
    """Create ``<dataDir>/sessions`` now, so an unusable data dir is a config error, not a failed startup."""
    try:
        settings.sessions_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError("dataDir", f"cannot create {settings.sessions_dir}: {exc.strerror}") from None


def multiprocess_metrics_dir(settings: GatewaySettings) -> Path:
    """A fresh, empty folder for prometheus-client's per-worker files, exported to the workers."""
    path = Path(settings.data_dir).resolve() / "metrics" / f"{os.getpid()}-{time.time_ns()}"
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path
