"""``sessiongate cancel SESSION``: stop the session's running turn.

The turn's message stays in the transcript with the partial reply marked
``interrupted``; whoever waits for the turn gets ``turn-cancelled``. Exit
codes: 0 cancelled, 2 no turn was running (or another 4xx answer), 1 a 5xx
answer, 3 the gateway is unreachable.
"""

from __future__ import annotations

import argparse
import sys

import httpx

from sessiongate.gateway.client import ProblemError, SessionGateClient

from .send import EXIT_CLIENT_ERROR, EXIT_GAVE_UP, EXIT_OK, add_gateway_arguments, print_problem

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "cancel", help="cancel a session's running turn",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("session", metavar="SESSION", help="session id")
    add_gateway_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    with SessionGateClient(args.url, args.token) as client:
        try:
            cancelled = client.cancel(args.session)
        except ProblemError as error:
            return print_problem(error.status, error.title, error.detail)
        except httpx.TransportError as error:
            print(f"error: gateway unreachable: {error}", file=sys.stderr)
            return EXIT_GAVE_UP
    if not cancelled:
        print(f"no turn is running for session {args.session!r}", file=sys.stderr)
        return EXIT_CLIENT_ERROR
    print(f"cancelled the running turn of session {args.session!r}")
    return EXIT_OK
