"""Local fake servers for third-party APIs (never mocks of our own code), and the real gateway served beside them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sessiongate.gateway._server import create_app
from sessiongate.gateway.settings import GatewaySettings
from tests.support import UvicornThread
from tests.workers import settings_for


def gateway_settings(data_dir: Path, config: dict[str, Any] | None = None) -> GatewaySettings:
    """Settings from ``config`` (camelCase, as in a config file) alone: the environment is not read."""
    return settings_for(data_dir, **(config or {}))


def serve_gateway(data_dir: Path, config: dict[str, Any] | None = None) -> UvicornThread:
    """The real gateway app for ``config`` in a uvicorn thread (enter it to start)."""
    return UvicornThread(create_app(gateway_settings(data_dir, config)), timeout_graceful_shutdown=2)
