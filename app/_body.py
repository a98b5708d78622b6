"""Request bodies: a size limit for every request, and the message API's validation before the gate.

Both run in front of :class:`sessiongate.SessionGate`, in the contract's order
(auth, body limit and validation, rate limits, Idempotency-Key, lane): a
request that is too large or malformed is refused with 413 / 400
problem+json before it can spend a rate-limit slot, an idempotency record or
the session's lane. The validated message is left in the request's state
for the route (:func:`message_of`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sessiongate import (
    InvalidRequest,
    PayloadTooLarge,
    SessionGateError,
    UnsupportedMediaType,
    validate_session_id,
)
from sessiongate._gate import read_body, replaying
from sessiongate._problem import send_problem

MESSAGE_STATE_KEY = "sessiongate.message"
# Matches any id, valid or not (even one with "/"), so a bad one reads as invalid-session-id, not 404.
_MESSAGES_PATH = re.compile(r"/v1/sessions/(?P<session_id>.*)/messages", re.DOTALL)
MAX_TEXT_CHARS = 32_000
MAX_SENDER_CHARS = 256
MESSAGE_FIELDS = frozenset({"text", "sender"})


@dataclass(frozen=True)
class MessageIn:
    """A validated ``POST /v1/sessions/{id}/messages`` body."""

    text: str
    sender: str | None = None


def messages_path_session_id(scope: Scope) -> str | None:
    """The (unvalidated) session id of a ``/v1/sessions/{id}/messages`` path, else ``None``."""
    match = _MESSAGES_PATH.fullmatch(scope["path"])
    return match["session_id"] if match else None


def message_of(scope: Scope) -> MessageIn:
    """The message :class:`MessageValidation` parsed for this request."""
    return scope["state"][MESSAGE_STATE_KEY]


def declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                raise InvalidRequest("Content-Length is not a number") from None
    return None


def require_json(scope: Scope) -> None:
    """Raise :class:`UnsupportedMediaType` unless the body is declared ``application/json``.

    A JSON route that took any body would accept a browser's ``text/plain``
    "simple" request, which no preflight guards.
    """
    for name, value in scope["headers"]:
        if name == b"content-type":
            if value.split(b";", 1)[0].strip().lower() == b"application/json":
                return
            break
    raise UnsupportedMediaType("the body must be sent as Content-Type: application/json")


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` (413), by Content-Length up front and by counting as read.

    A streamed body that grows past the limit makes ``receive`` raise
    :class:`PayloadTooLarge` in whoever reads it; the app's exception
    handlers answer it.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            declared = declared_length(scope)
        except InvalidRequest as error:
            await send_problem(send, error)
            return
        if declared is not None and declared > self.max_bytes:
            await send_problem(send, self.too_large())
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self.too_large()
            return message

        await self.app(scope, counted_receive, send)

    def too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge.over_limit(self.max_bytes)


def json_object(body: bytes, *, example: str = "") -> dict[str, Any]:
    """``body`` as a JSON object; InvalidRequest for bad UTF-8, bad JSON, nesting too deep or another type."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise InvalidRequest("the body is not valid JSON (UTF-8)") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"the body must be a JSON object{example}")
    return data


def parse_message(body: bytes) -> MessageIn:
    """Validate a message body: a JSON object with a non-blank ``text`` and an optional ``sender``."""
    data = json_object(body, example=' like {"text": "hello"}')
    unknown = sorted(set(data) - MESSAGE_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field(s) {unknown}: a message has only 'text' and optional 'sender'")
    text = _string_field(data, "text", max_chars=MAX_TEXT_CHARS, required=True)
    if not text.strip():
        raise InvalidRequest("'text' must not be blank")
    return MessageIn(text=text, sender=_string_field(data, "sender", max_chars=MAX_SENDER_CHARS, required=False))


def _string_field(data: dict[str, object], name: str, *, max_chars: int, required: bool) -> str | None:
    if name not in data:
        if required:
            raise InvalidRequest(f"'{name}' is required")
        return None
    value = data[name]
    if not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a string")
    if not 1 <= len(value) <= max_chars:
        raise InvalidRequest(f"'{name}' must be 1-{max_chars} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"'{name}' is not valid Unicode (lone surrogate)") from None
    return value


class MessageValidation:
    """ASGI middleware for ``/v1/sessions/{id}/messages``: a valid session id, and for POST a valid body.

    Everything else passes through. The parsed body is stored in the scope's
    state and replayed to the app (and to SessionGate's Idempotency-Key check).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_id = messages_path_session_id(scope) if scope["type"] == "http" else None
        if raw_id is None:
            await self.app(scope, receive, send)
            return
        try:
            validate_session_id(raw_id)
            if scope["method"] == "POST":
                require_json(scope)
                body = await read_body(receive)
                if body is None:
                    return  # the client went away: nobody to answer
                scope.setdefault("state", {})[MESSAGE_STATE_KEY] = parse_message(body)
                receive = replaying(body, receive)
        except SessionGateError as error:
            await send_problem(send, error)
            return
        await self.app(scope, receive, send)
