"""Optional bearer tokens for the ``/v1/sessions`` API and the OpenAI-compatible routes (``auth.tokens``).

The first check of the contract's order, so an unauthenticated request costs
no body read, rate-limit slot or lane. Tokens are compared with
:func:`hmac.compare_digest`, against every configured token, so the time
taken says nothing about how much of a token was right. With no tokens
configured the API is open. An OpenAI SDK sends its ``api_key`` as the
bearer token, so a configured token is the SDK's key. Webhooks authenticate themselves (secrets,
signatures), and the webchat page and probes stay public.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from sessiongate import Unauthorized, error_format_of, problem_response

from ._openai import OPENAI_PATHS
from .settings import GatewaySettings

__all__ = ["PROTECTED_PREFIX", "BearerAuth", "bearer_token", "is_loopback", "is_protected", "open_api_warning"]

PROTECTED_PREFIX = "/v1/sessions"


def bearer_token(scope: Scope) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header, if any."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (``server.host``) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def open_api_warning(settings: GatewaySettings) -> str | None:
    """What an open sessions API exposes when channels are on beyond loopback (for ``serve`` and ``doctor``)."""
    channels = [name for name in ("telegram", "slack") if getattr(settings.channels, name) is not None]
    if not channels or settings.auth.tokens or is_loopback(settings.server.host):
        return None
    return (
        f"channels ({', '.join(channels)}) are on and {PROTECTED_PREFIX} has no auth.tokens while listening on "
        f"{settings.server.host}: anyone who can reach it reads and writes their transcripts "
        f"({channels[0]}:<chat>); set auth.tokens"
    )


def is_protected(path: str) -> bool:
    return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/") or path in OPENAI_PATHS


class BearerAuth:
    """ASGI middleware: ``401 unauthorized`` for the protected routes without one of ``tokens``."""

    def __init__(self, app: ASGIApp, *, tokens: Sequence[str]) -> None:
        self.app = app
        self.tokens = [token.encode() for token in tokens]

    def authorized(self, scope: Scope) -> bool:
        presented = bearer_token(scope)
        if presented is None:
            return False
        matches = [hmac.compare_digest(presented, token) for token in self.tokens]  # no early exit
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.tokens or not is_protected(scope["path"]) or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        response = problem_response(Unauthorized("a valid 'Authorization: Bearer <token>' header is required"),
                                    error_format=error_format_of(scope))
        response.headers["WWW-Authenticate"] = 'Bearer realm="sessiongate"'
        await response(scope, receive, send)
