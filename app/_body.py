"""Request bodies: a size limit for every request, and the bodies of the turn routes, parsed once by the gate.

The size limit runs in front of everything (413 before anything is read).
The body of a message (``POST /v1/sessions/{id}/messages``) or a chat
completion (``POST /v1/chat/completions``) is parsed by
:class:`sessiongate.SessionGate` through its ``body_parser`` hook
(:func:`gated_body_parser`), in the contract's order (auth, body limit and
validation, rate limits, Idempotency-Key, lane): a malformed request is
refused with 400 before it can spend a rate-limit slot, an idempotency
record or the session's lane, and the route finds the parsed body in the
gate's :class:`~sessiongate.Admission`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sessiongate import (
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    error_format_of,
    parsed_body,
    send_problem,
    validate_session_id,
)

from ._logging import SESSION_ID
from ._openai import ChatRequest, parse_chat_request
from .paths import CHAT_COMPLETIONS, messages_session_id

__all__ = [
    "BodyLimit",
    "MessageIn",
    "gated_body_parser",
    "gated_session_key",
    "json_object",
    "parse_message",
    "require_json",
]

MAX_TEXT_CHARS = 32_000
MAX_SENDER_CHARS = 256
MESSAGE_FIELDS = frozenset({"text", "sender"})


@dataclass(frozen=True, slots=True)
class MessageIn:
    """A validated ``POST /v1/sessions/{id}/messages`` body, with the session it was posted to."""

    session_id: str
    text: str
    sender: str | None = None


def gated_body_parser(scope: Scope) -> Callable[[bytes], MessageIn | ChatRequest] | None:
    """SessionGate's ``body_parser``: the parser of a turn route's body (a message or a chat completion), else ``None``.

    The path is matched here, once per request; a message's id is judged
    before the body, so a bad id reads as ``invalid-session-id`` whatever the
    body. A chat completion names its session in a header or the body.
    """
    if scope["method"] != "POST":
        return None
    if scope["path"] == CHAT_COMPLETIONS:
        require_json(scope)
        return lambda body: parse_chat_request(
            scope, json_object(body, example=' like {"model": "echo", "messages": [...]}'), max_text_chars=MAX_TEXT_CHARS
        )
    session_id = messages_session_id(scope["path"])
    if session_id is None:
        return None
    validate_session_id(session_id)
    require_json(scope)
    return lambda body: parse_message(session_id, body)


def gated_session_key(scope: Scope) -> str | None:
    """SessionGate's ``session_key``: the session the parsed body was posted to (``None``: not gated)."""
    body = parsed_body(scope)
    if not isinstance(body, (MessageIn, ChatRequest)):
        return None
    SESSION_ID.set(body.session_id)  # for every log line of this request, the access line included
    return body.session_id


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
            await send_problem(send, error, error_format=error_format_of(scope))
            return
        if declared is not None and declared > self.max_bytes:
            await send_problem(send, self.too_large(), error_format=error_format_of(scope))
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


def parse_message(session_id: str, body: bytes) -> MessageIn:
    """Validate a message body: a JSON object with a non-blank ``text`` and an optional ``sender``."""
    data = json_object(body, example=' like {"text": "hello"}')
    unknown = sorted(set(data) - MESSAGE_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field(s) {unknown}: a message has only 'text' and optional 'sender'")
    text = _string_field(data, "text", max_chars=MAX_TEXT_CHARS, required=True)
    if text is None or not text.strip():
        raise InvalidRequest("'text' must not be blank")
    sender = _string_field(data, "sender", max_chars=MAX_SENDER_CHARS, required=False)
    return MessageIn(session_id=session_id, text=text, sender=sender)


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
