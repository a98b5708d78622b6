"""Structured logs: one line per request, with its request id and session id, as text or JSON lines.

The request id (a well-formed incoming ``X-Request-Id``, else a new one) and the
session id live in context variables, so every line logged while a request is
handled (turn runner, providers, gate) carries them without passing them
around. ``server.logFormat`` picks ``text`` or ``json`` (one object per line).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sessiongate import REQUEST_ID

__all__ = [
    "SESSION_ID",
    "JsonLinesFormatter",
    "OneLineFormatter",
    "RequestLog",
    "configure_logging",
    "escape_controls",
]

SESSION_ID: ContextVar[str | None] = ContextVar("session_id", default=None)

_WELL_FORMED_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# C0 and C1 controls, DEL and the Unicode line/paragraph separators: anything that could start a forged line.
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [req=%(request_id)s session=%(session_id)s] %(message)s"

log = logging.getLogger("sessiongate.access")


class _ContextFilter(logging.Filter):
    """Copies the request and session ids of the current context onto every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.session_id = SESSION_ID.get()
        return True


def escape_controls(text: str) -> str:
    """``text`` with every control character written as its Python escape (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return _CONTROL_CHARACTERS.sub(lambda match: repr(match.group())[1:-1], text)


class OneLineFormatter(logging.Formatter):
    """The text format, one line per record whatever a field holds (a path's ``%0A`` cannot forge a line).

    Only a traceback, added after the escaped line, spans several lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, ids, the record's ``fields`` and any traceback."""

    converter = time.gmtime  # type: ignore[assignment]  # typeshed sees only the no-argument overload

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "requestId": getattr(record, "request_id", None),
            "sessionId": getattr(record, "session_id", None),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)



def configure_logging(log_format: str, *, level: int = logging.INFO) -> None:
    """Send every logger (ours and uvicorn's) to stderr in ``log_format`` (``text`` or ``json``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonLinesFormatter() if log_format == "json" else OneLineFormatter(_TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):  # uvicorn.access stays off: RequestLog logs requests
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # httpx logs every request URL at INFO, and a Telegram Bot API URL carries the bot token
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _WELL_FORMED_REQUEST_ID.fullmatch(text) else None
    return None


class RequestLog:
    """ASGI middleware: sets the ids for the request's context, echoes ``X-Request-Id``, logs one line at the end."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        request_token = REQUEST_ID.set(request_id)
        session_token = SESSION_ID.set(None)  # set by whoever learns the session (the gate's session key, a route)
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            duration_ms = round((time.perf_counter() - started) * 1000, 2)
            log.info(
                "%s %s %s %.1fms", scope["method"], scope["path"], status, duration_ms,
                extra={"fields": {"method": scope["method"], "path": scope["path"],
                                  "status": status, "durationMs": duration_ms}},
            )
            REQUEST_ID.reset(request_token)
            SESSION_ID.reset(session_token)
