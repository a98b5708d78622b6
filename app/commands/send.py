"""``sessiongate send SESSION TEXT``: one message from the shell, retried like a good client.

Prints the reply on stdout; each retry is announced on stderr. To a terminal
the reply is streamed as the model writes it (``--no-stream``: wait for the
whole answer; ``--stream`` streams into a pipe too). ``send --attach SESSION``
follows the session's running turn (whoever sent it) from its first word.
Exit codes: 0 replied, 1 the gateway failed the turn (5xx that is not retried,
e.g. ``all-providers-failed``), 2 bad usage or a 4xx answer (not retried,
e.g. ``turn-cancelled``, or no turn to attach to), 3 gave up retrying (busy
past the budget) or the gateway is unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator

from ..client import (
    DEFAULT_URL,
    GaveUp,
    ProblemError,
    RetryNotice,
    RetryPolicy,
    ServerEvent,
    SessionGateClient,
)

__all__ = ["add_gateway_arguments", "add_parser", "print_problem", "print_stream", "run"]

EXIT_OK, EXIT_SERVER_ERROR, EXIT_CLIENT_ERROR, EXIT_GAVE_UP = 0, 1, 2, 3


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "send", help="send one message to a session and print the reply",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("session", metavar="SESSION", help="session id")
    parser.add_argument("text", metavar="TEXT", nargs="?", help="message text (not with --attach)")
    parser.add_argument("--attach", action="store_true", help="follow the session's running turn instead")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                        help="print the reply as it is written (default: when stdout is a terminal)")
    add_gateway_arguments(parser)
    parser.add_argument("--sender", help="sender name recorded with the message")
    parser.add_argument("--idempotency-key", help="reuse a key to make a repeated send safe")
    parser.add_argument("--max-attempts", type=_positive(int), default=RetryPolicy.max_attempts,
                        help="most attempts before giving up (default %(default)s)")
    parser.add_argument("--budget", type=_positive(float), default=RetryPolicy.total_s,
                        help="most seconds spent retrying (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the whole JSON answer")
    return parser


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    """``--url`` and ``--token`` (every command that talks to a running gateway)."""
    parser.add_argument("--url", default=os.environ.get("SESSIONGATE_URL", DEFAULT_URL),
                        help=f"gateway base URL (default $SESSIONGATE_URL or {DEFAULT_URL})")
    parser.add_argument("--token", default=os.environ.get("SESSIONGATE_TOKEN"),
                        help="bearer token (default $SESSIONGATE_TOKEN)")


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An argparse ``type`` that accepts only numbers above zero."""

    def parse(raw: str) -> float:
        value = kind(raw)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {raw}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _announce(notice: RetryNotice) -> None:
    error = notice.error
    why = f"busy ({error.type})" if isinstance(error, ProblemError) else f"unreachable ({error})"
    print(f"{why}, retrying in {notice.wait_s:.1f} s", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    if args.attach == (args.text is not None):
        print("error: give TEXT, or --attach without TEXT", file=sys.stderr)
        return EXIT_CLIENT_ERROR
    policy = RetryPolicy(max_attempts=args.max_attempts, total_s=args.budget)
    streaming = args.attach or (sys.stdout.isatty() if args.stream is None else args.stream)
    with SessionGateClient(args.url, args.token, policy=policy, on_retry=_announce) as client:
        try:
            if args.attach:
                return print_stream(client.attach(args.session))
            if streaming:
                return print_stream(client.stream(args.session, args.text, sender=args.sender,
                                                  idempotency_key=args.idempotency_key))
            answer = client.send(args.session, args.text, sender=args.sender,
                                 idempotency_key=args.idempotency_key)
        except ProblemError as error:
            return print_problem(error.status, error.title, error.detail)
        except GaveUp as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_GAVE_UP
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(answer["reply"]["text"])
    return EXIT_OK


def print_stream(events: Iterator[ServerEvent]) -> int:
    """Each ``delta`` as it comes, then a newline; an ``error`` event is reported like an error answer."""
    for event in events:
        if event.name == "delta":
            sys.stdout.write(event.data["text"])
            sys.stdout.flush()
        elif event.name == "error":
            print()
            problem = event.data
            return print_problem(int(problem.get("status", 500)), problem.get("title", "Error"),
                                 problem.get("detail", ""))
    print()
    return EXIT_OK


def print_problem(status: int, title: str, detail: str) -> int:
    print(f"error: {status} {title}: {detail}", file=sys.stderr)
    return EXIT_CLIENT_ERROR if status < 500 else EXIT_SERVER_ERROR
