"""The ``--config`` / ``--data-dir`` options of the operator commands, and the settings they load.

``locks`` and ``doctor`` must look at exactly what ``serve`` runs with, so they
resolve settings the same way (CLI > environment > file > default) from the
same two flags.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..settings import GatewaySettings

__all__ = ["EXIT_OK", "EXIT_PROBLEMS", "EXIT_UNREACHABLE", "EXIT_USAGE", "load_settings", "settings_options"]

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def settings_options() -> argparse.ArgumentParser:
    """A parent parser with ``--config`` and ``--data-dir`` (use as ``parents=[...]``)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--config", metavar="PATH", help="JSON config file (default: $SESSIONGATE_CONFIG)")
    parent.add_argument("--data-dir", metavar="DIR", help="where transcripts and lock files live (default ./data)")
    return parent


def load_settings(args: argparse.Namespace, **sections: dict[str, Any]) -> GatewaySettings:
    """Settings as ``serve`` resolves them; raises ``ConfigError`` naming the key.

    ``sections`` are further command-line overrides (``server={"port": 1}``); empty ones are left out.
    """
    overrides: dict[str, Any] = {name: values for name, values in sections.items() if values}
    if args.data_dir is not None:
        overrides["dataDir"] = args.data_dir
    return GatewaySettings.load(args.config, overrides=overrides)
