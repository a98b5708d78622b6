"""``create_app(settings)``: the gateway's routes, middleware stack and lifespan in one place.

Middleware, outer to inner (each refuses what it can before the next costs more):

0. uvicorn's ``ProxyHeadersMiddleware``, only for ``server.trustedProxies``: the client
   address behind them (``serve`` turns uvicorn's own, which trusts 127.0.0.1, off).
1. CORS, only for ``server.corsOrigins`` (default none): those pages may read the retry hints
   (``Retry-After``, ``retry-after-ms``, ``x-should-retry``), ``RateLimit*``, ``Idempotent-Replayed``.
   Then :class:`~sessiongate.gateway._origin.CrossSiteGuard`: a cross-site browser request that
   could change state is refused (403).
2. :class:`~sessiongate.gateway._logging.RequestLog`: request id, one structured line per request.
3. :class:`~sessiongate.gateway._openai.OpenAIErrors`: errors of the OpenAI-compatible
   routes are written in OpenAI's shape (same statuses and headers).
4. :class:`ErrorBoundary`: nothing escapes as a traceback; a bug is a logged
   500 ``internal-error`` problem (inside CORS and the log, so error answers
   carry CORS headers and are logged with their status and request id).
5. :class:`~sessiongate.gateway._auth.BearerAuth`: ``auth.tokens`` for ``/v1/sessions/*``
   and the OpenAI-compatible routes (401).
6. :class:`~sessiongate.gateway._body.BodyLimit`: ``server.maxBodyBytes`` for every request (413).
7. :class:`sessiongate.SessionGate`: for ``POST /v1/sessions/{id}/messages`` and
   ``POST /v1/chat/completions``, the session id and body (400, parsed once by the
   gate's body hook), rate limits, Idempotency-Key, the session's lane. The gateway's running
   turns (:class:`~sessiongate.gateway.live.LiveTurns`) tell it which turn a busy
   session runs, and let ``lane.mode = interrupt`` cancel it.

Routes raise typed errors; the exception handlers answer them in the route's
error format (problem+json unless OpenAI's), 404 and 405 included.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from http import HTTPStatus

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from sessiongate import (
    EXPOSED_HEADERS,
    SessionGate,
    SessionGateError,
    client_address,
    error_format_of,
    open_backend,
    problem_response,
    problem_status,
    send_problem,
)

from . import channels
from ._auth import BearerAuth, bearer_token
from ._body import BodyLimit, gated_body_parser, gated_session_key
from ._context import Gateway
from ._logging import RequestLog, configure_logging
from ._loop_lag import sampling_loop_lag
from ._openai import OpenAIErrors
from ._origin import CrossSiteGuard
from .live import LiveTurns
from .routes import chat, health, metrics, openapi, sessions, webchat
from .settings import GatewaySettings

__all__ = [
    "SETTINGS_ENV",
    "ErrorBoundary",
    "ExceptionHandler",
    "HttpProblem",
    "app_from_environment",
    "cors",
    "create_app",
    "exception_handlers",
    "sender_key",
    "trusted_proxy_headers",
]

SETTINGS_ENV = "_SESSIONGATE_SERVE_SETTINGS"  # no SESSIONGATE_ prefix: it is not a config key
log = logging.getLogger("sessiongate.server")
ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]


class HttpProblem(SessionGateError):
    """A router answer (404 not found, 405 method not allowed) as a problem."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.default_status = status  # type: ignore[misc]  # the router's status, per instance
        self.problem_type = HTTPStatus(status).phrase.lower().replace(" ", "-")  # type: ignore[misc]
        self.title = HTTPStatus(status).phrase  # type: ignore[misc]


class ErrorBoundary:
    """ASGI middleware: typed errors become their problem; anything else a logged 500 ``internal-error``."""

    def __init__(self, app: ASGIApp, *, settings: GatewaySettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except ClientDisconnect:
            return  # nobody left to answer
        except Exception as exc:
            error = exc if isinstance(exc, SessionGateError) else None
            if error is None:
                log.exception("unhandled error in %s %s", scope["method"], scope["path"])
                error = SessionGateError(f"unhandled {type(exc).__name__} (traceback above)")
            if started:
                log.warning("error after the response started, connection dropped: %s", exc)
                return
            await send_problem(send, error, problem_status(error, self.settings), error_format_of(scope))


def sender_key(settings: GatewaySettings) -> Callable[[Scope], str | None]:
    """For ``rateLimits.perSender``: who the request provably comes from, never a name its body claims.

    With ``auth.tokens`` the bearer token (checked by :class:`BearerAuth`
    before the gate) names the sender, as a digest so no token reaches the
    rate-limit storage; without, anyone may send any token, so the sender is
    the client address (from ``X-Forwarded-For`` only behind ``server.trustedProxies``).
    """
    tokens_checked = bool(settings.auth.tokens)

    def key(scope: Scope) -> str | None:
        token = bearer_token(scope) if tokens_checked else None
        if token is not None:
            return "token:" + hashlib.sha256(token).hexdigest()[:32]
        address = client_address(scope)
        return None if address is None else "ip:" + address

    return key


def exception_handlers(settings: GatewaySettings) -> dict[type[Exception], ExceptionHandler]:
    async def typed_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, SessionGateError)  # a 5xx detail is logged, not sent (sessiongate._problem)
        return problem_response(error, problem_status(error, settings), error_format_of(request.scope))

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        response = problem_response(HttpProblem(error.status_code, error.detail),
                                    error_format=error_format_of(request.scope))
        response.headers.update(error.headers or {})
        return response

    return {SessionGateError: typed_error, HTTPException: http_error}


def trusted_proxy_headers(proxies: list[str]) -> list[Middleware]:
    """The client address (and scheme) from ``X-Forwarded-For`` / ``-Proto``, only when the peer is a trusted proxy."""
    return [Middleware(ProxyHeadersMiddleware, trusted_hosts=proxies)] if proxies else []


def cors(origins: list[str]) -> list[Middleware]:
    """CORS for the configured origins only; none by default (the webchat page is same-origin)."""
    if not origins:
        return []
    return [Middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-Id", "X-Session-Id"],
        expose_headers=[*EXPOSED_HEADERS, "X-Request-Id"],
    )]


def create_app(settings: GatewaySettings, *, transport: httpx.AsyncBaseTransport | None = None) -> Starlette:
    """The gateway for ``settings``; ``transport`` (tests) carries every outbound httpx call."""
    backend = open_backend(settings, longest_turn_ms=settings.longest_turn_ms)
    live = LiveTurns(backend)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gateway = Gateway.open(settings, backend, transport=transport, live=live)
        app.state.gateway = gateway
        try:
            gateway.channels.start()  # resumes what a previous run left: spooled, unreplied, undelivered
            async with sampling_loop_lag():
                yield
        finally:
            await gateway.channels.aclose()  # unfinished work stays in the transcripts for the next start
            await gateway.aclose()
            await backend.aclose()
            metrics.forget_this_process()

    return Starlette(
        routes=[*sessions.routes(), *chat.routes(), *health.routes(), *metrics.routes(), *openapi.routes(), *webchat.routes(),
                *channels.routes()],
        middleware=[
            *trusted_proxy_headers(settings.server.trusted_proxies),
            *cors(settings.server.cors_origins),
            Middleware(RequestLog),
            Middleware(OpenAIErrors),
            Middleware(ErrorBoundary, settings=settings),
            Middleware(CrossSiteGuard, allowed_origins=settings.server.cors_origins),
            Middleware(BearerAuth, tokens=settings.auth.tokens),
            Middleware(BodyLimit, max_bytes=settings.server.max_body_bytes),
            Middleware(
                SessionGate, settings=settings, backend=backend,
                session_key=gated_session_key, sender_key=sender_key(settings), body_parser=gated_body_parser, turns=live,
                max_body_bytes=settings.server.max_body_bytes,
            ),
        ],
        exception_handlers=exception_handlers(settings),
        lifespan=lifespan,
    )


def app_from_environment() -> Starlette:
    """uvicorn's factory (``sessiongate.gateway._server:app_from_environment``): the settings ``serve`` resolved, per worker."""
    settings = GatewaySettings.model_validate_json(os.environ[SETTINGS_ENV])
    configure_logging(settings.server.log_format)
    return create_app(settings)
