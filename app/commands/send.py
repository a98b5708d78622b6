"""``sessiongate send SESSION TEXT``: one message from the shell, retried like a good client.

Prints the reply on stdout; each retry is announced on stderr. Exit codes:
0 replied, 1 the gateway failed the turn (5xx that is not retried, e.g.
``all-providers-failed``), 2 bad usage or a 4xx answer (not retried),
3 gave up retrying (busy past the budget) or the gateway is unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from ..client import DEFAULT_URL, GaveUp, ProblemError, RetryNotice, RetryPolicy, SessionGateClient

EXIT_OK, EXIT_SERVER_ERROR, EXIT_CLIENT_ERROR, EXIT_GAVE_UP = 0, 1, 2, 3


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "send", help="send one message to a session and print the reply",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("session", metavar="SESSION", help="session id")
    parser.add_argument("text", metavar="TEXT", help="message text")
    parser.add_argument("--url", default=os.environ.get("SESSIONGATE_URL", DEFAULT_URL),
                        help=f"gateway base URL (default $SESSIONGATE_URL or {DEFAULT_URL})")
    parser.add_argument("--token", default=os.environ.get("SESSIONGATE_TOKEN"),
                        help="bearer token (default $SESSIONGATE_TOKEN)")
    parser.add_argument("--sender", help="sender name recorded with the message")
    parser.add_argument("--idempotency-key", help="reuse a key to make a repeated send safe")
    parser.add_argument("--max-attempts", type=_positive(int), default=RetryPolicy.max_attempts,
                        help="most attempts before giving up (default %(default)s)")
    parser.add_argument("--budget", type=_positive(float), default=RetryPolicy.total_s,
                        help="most seconds spent retrying (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the whole JSON answer")
    return parser


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
    policy = RetryPolicy(max_attempts=args.max_attempts, total_s=args.budget)
    with SessionGateClient(args.url, args.token, policy=policy, on_retry=_announce) as client:
        try:
            answer = client.send(args.session, args.text, sender=args.sender,
                                 idempotency_key=args.idempotency_key)
        except ProblemError as error:
            print(f"error: {error.status} {error.title}: {error.detail}", file=sys.stderr)
            return EXIT_CLIENT_ERROR if error.status < 500 else EXIT_SERVER_ERROR
        except GaveUp as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_GAVE_UP
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(answer["reply"]["text"])
    return EXIT_OK
