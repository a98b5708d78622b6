"""The ``sessiongate`` command line: a thin argparse front over ``app/commands/<name>.py``.

Each command module exposes ``add_parser(subparsers)`` (which registers its
flags) and ``run(args) -> int`` (the exit status). Adding a command is adding
its name to :data:`COMMANDS`. ``serve`` is the default, so ``sessiongate
--port 9000`` serves.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from sessiongate import __version__

__all__ = ["COMMANDS", "DEFAULT_COMMAND", "build_parser", "main", "with_default_command"]

COMMANDS: tuple[str, ...] = ("serve", "send", "cancel", "locks", "doctor", "transcripts")
DEFAULT_COMMAND = "serve"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command, or just ``only``: importing ``serve`` (uvicorn, the app) costs
    a quarter of a second that ``send`` need not pay."""
    parser = argparse.ArgumentParser(
        prog="sessiongate",
        description="AI chat gateway with fast session locks, lanes and contention answers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS if only is None else (only,):
        module = importlib.import_module(f"sessiongate.gateway.commands.{name}")
        command_parser = module.add_parser(subparsers)
        command_parser.set_defaults(run=module.run)
    return parser


def with_default_command(argv: Sequence[str]) -> list[str]:
    """Prefix ``serve`` unless the arguments name a command or ask for the top-level help."""
    argv = list(argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        return [DEFAULT_COMMAND, *argv]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    argv = with_default_command(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv[0] if argv[0] in COMMANDS else None).parse_args(argv)
    return int(args.run(args))
