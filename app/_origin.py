"""Browsers on other sites: no CORS by default, and no cross-site request may change state.

A gateway without ``auth.tokens`` trusts whoever can reach it, and binding to
127.0.0.1 does not keep out a page open in the operator's own browser: a form
or a ``text/plain`` ``fetch`` is a CORS "simple" request, sent without a
preflight. So:

- CORS headers are sent only for ``server.corsOrigins`` (default none: the
  webchat page is same-origin and needs none), so no other page can read an
  answer;
- a state-changing request (any method but GET, HEAD, OPTIONS) that a browser
  marks as coming from another site is refused with 403 before anything runs,
  unless its ``Origin`` is in ``server.corsOrigins``. The browser's mark is
  ``Sec-Fetch-Site`` (anything but ``same-origin`` or ``none``), else an
  ``Origin`` whose host differs from the request's ``Host``. Requests without
  either header (curl, SDKs, webhooks from Telegram and Slack) are not
  browser requests and pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from sessiongate import SessionGateError, send_problem

__all__ = ["CrossSiteGuard", "CrossSiteRefused", "SAFE_METHODS"]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SAME_ORIGIN_FETCH = (b"same-origin", b"none")  # "none": typed in the address bar, a bookmark


class CrossSiteRefused(SessionGateError):
    """A browser request from another site to a state-changing route (403)."""

    problem_type: ClassVar[str] = "forbidden"
    default_status: ClassVar[int] = 403
    title: ClassVar[str] = "Forbidden"


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def is_cross_site(scope: Scope) -> bool:
    """Whether a browser says this request comes from a page of another origin."""
    fetch_site = _header(scope, b"sec-fetch-site")
    if fetch_site is not None:
        return fetch_site.lower() not in _SAME_ORIGIN_FETCH
    origin = _header(scope, b"origin")
    if origin is None:
        return False  # not a browser's cross-origin request
    host = _header(scope, b"host")
    return origin == b"null" or host is None or urlsplit(origin.decode("latin-1")).netloc.encode("latin-1") != host


class CrossSiteGuard:
    """ASGI middleware: ``403 forbidden`` for a cross-site browser request that could change state."""

    def __init__(self, app: ASGIApp, *, allowed_origins: Sequence[str]) -> None:
        self.app = app
        self.allowed = frozenset(origin.rstrip("/").encode("latin-1") for origin in allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS and is_cross_site(scope):
            origin = _header(scope, b"origin")
            if origin is None or origin not in self.allowed:
                await send_problem(send, CrossSiteRefused(
                    "a browser request from another site may not change anything here "
                    "(allow its origin in server.corsOrigins)"
                ))
                return
        await self.app(scope, receive, send)
