"""The OpenAI Chat Completions wire format: requests in, completions, chunks and errors out.

So the official OpenAI SDKs and the chat UIs built on them are clients of the
gateway. Only the format lives here; the turn is the messages API's turn
(a live turn, :mod:`~sessiongate.gateway.live`, behind the same SessionGate).
Two things differ from what an OpenAI server does, on purpose:

- the history is the session's transcript, not the request's ``messages``:
  only the last ``user`` message is read (the new turn); earlier and
  ``system`` messages are ignored, so a client resending the whole
  conversation cannot rewrite or duplicate it;
- ``model`` names the provider to try first; a name that is no provider's id
  (``gpt-4o`` typed into a UI) keeps the configured order, and a completion's
  ``model`` says which provider replied (a stream's chunks, sent before the
  reply is stored: the provider tried first).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from sessiongate import ErrorFormat, InvalidRequest, SessionGateError, use_error_format, validate_session_id

from .paths import CHAT_COMPLETIONS, MODELS
from .turns import Record

__all__ = [
    "OPENAI_ERRORS",
    "OPENAI_PATHS",
    "ChatRequest",
    "OpenAIErrors",
    "chat_completion",
    "chat_session_id",
    "completion_chunks",
    "completion_id",
    "model_list",
    "openai_error_json",
    "parse_chat_request",
]

OPENAI_PATHS = frozenset({CHAT_COMPLETIONS, MODELS})
SESSION_HEADER = b"x-session-id"
# OpenAI's error "type" for a status; anything else is an invalid request.
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                409: "conflict_error", 429: "rate_limit_error"}


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated ``POST /v1/chat/completions`` body: what the gateway uses of it."""

    session_id: str
    text: str
    model: str | None
    stream: bool
    include_usage: bool = False  # stream_options.include_usage: a last chunk carries the turn's usage


def chat_session_id(scope: Scope, parsed_body: Mapping[str, Any]) -> str | None:
    """The session of a chat completion: the ``X-Session-Id`` header, else the body's ``user`` (unvalidated)."""
    for name, value in scope["headers"]:
        if name == SESSION_HEADER:
            return value.decode("latin-1")
    user = parsed_body.get("user")
    return user if isinstance(user, str) else None


def parse_chat_request(scope: Scope, data: Mapping[str, Any], *, max_text_chars: int) -> ChatRequest:
    """Validate the fields the gateway uses (others, e.g. ``temperature``, are accepted and ignored)."""
    session_id = chat_session_id(scope, data)
    if session_id is None:
        raise InvalidRequest("name the session: an X-Session-Id header, or the 'user' field")
    validate_session_id(session_id)
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("'model' must be a string")
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object")
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise InvalidRequest("'stream_options.include_usage' must be true or false")
    return ChatRequest(
        session_id=session_id,
        text=last_user_text(data.get("messages"), max_text_chars=max_text_chars),
        model=model,
        stream=bool(stream),
        include_usage=include_usage,
    )


def last_user_text(messages: object, *, max_text_chars: int) -> str:
    """The text of the last ``user`` message: a string, or the ``text`` parts of a content array."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest("'messages' must be an array of message objects")
    user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    if user is None:
        raise InvalidRequest("'messages' has no 'user' message: the last one is the new turn")
    content = user.get("content")
    if isinstance(content, list):
        if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                   for part in content):
            raise InvalidRequest("only text content parts are supported")
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise InvalidRequest("the last user message's 'content' must be a string or text parts")
    if not content.strip() or len(content) > max_text_chars:
        raise InvalidRequest(f"the last user message must be 1-{max_text_chars} characters, not blank")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest("the last user message is not valid Unicode (lone surrogate)") from None
    return content


# ---------------------------------------------------------------- answers


def openai_usage(reply: Record) -> dict[str, int] | None:
    """The reply's stored token usage in OpenAI's names (``None`` if the provider gave none)."""
    usage = reply.get("usage")
    if usage is None:
        return None
    return {"prompt_tokens": usage["promptTokens"], "completion_tokens": usage["completionTokens"],
            "total_tokens": usage["totalTokens"]}


def completion_id(answer_id: str) -> str:
    """A completion's ``id``: ``chatcmpl-`` and the stored reply's id (a stream's: its turn's id)."""
    return f"chatcmpl-{answer_id}"


def created_at(reply: Record) -> int:
    """``created`` (Unix seconds): when the reply was stored, so a replayed answer reads the same."""
    return int(datetime.fromisoformat(reply["at"].replace("Z", "+00:00")).timestamp())


def chat_completion(reply: Record) -> dict[str, Any]:
    """A ``chat.completion`` object for a stored reply record."""
    completion: dict[str, Any] = {
        "id": completion_id(reply["id"]),
        "object": "chat.completion",
        "created": created_at(reply),
        "model": reply["provider"],
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": reply["text"], "refusal": None}}],
    }
    usage = openai_usage(reply)
    if usage is not None:
        completion["usage"] = usage
    return completion


def _event(data: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"


async def completion_chunks(
    pieces: AsyncIterator[str],
    *,
    completion: str,
    model: str,
    created: int,
    usage: Callable[[], Awaitable[dict[str, int] | None]] | None = None,
) -> AsyncIterator[bytes]:
    """``chat.completion.chunk`` server-sent events for the reply's ``pieces``, ending in ``[DONE]``.

    The role comes first, then one chunk per piece as it arrives, then the
    ``finish_reason``; with ``usage`` (``stream_options.include_usage``) a last
    chunk with no choices carries the stored reply's token usage, as OpenAI
    sends it, when the provider reported one. If ``pieces`` fails
    with a typed error (``turn-cancelled``, ...), the error goes out as an
    ``{"error": ...}`` event (which the OpenAI SDK raises) and no ``[DONE]``
    follows.
    """
    def chunk(choices: list[dict[str, Any]]) -> bytes:
        return _event({"id": completion, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": choices})

    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    try:
        async for piece in pieces:
            yield chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
    except SessionGateError as error:
        yield b"data: " + openai_error_json(error, error.default_status) + b"\n\n"
        return
    yield chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
    if usage is not None and (counts := await usage()) is not None:
        yield _event({"id": completion, "object": "chat.completion.chunk", "created": created, "model": model,
                      "choices": [], "usage": counts})
    yield DONE_EVENT


def model_list(providers: list[tuple[str, str]]) -> dict[str, Any]:
    """``GET /v1/models``: each configured provider (id, type) as a model, in failover order."""
    return {"object": "list", "data": [{"id": provider_id, "object": "model", "created": 0, "owned_by": kind}
                                       for provider_id, kind in providers]}


# ---------------------------------------------------------------- errors


def openai_error_json(error: SessionGateError, status: int) -> bytes:
    """OpenAI's error shape; ``code`` is the contract's problem name (``session-busy``, ...)."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return json.dumps({"error": {"message": error.detail, "type": kind, "code": error.problem_type,
                                 "param": None}}, separators=(",", ":")).encode()


OPENAI_ERRORS = ErrorFormat("application/json", openai_error_json)


class OpenAIErrors:
    """ASGI middleware: errors of the OpenAI-compatible routes are answered in OpenAI's shape.

    Sits in front of every middleware that may refuse a request, so the
    choice is made once per request, before anyone renders an error.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in OPENAI_PATHS:
            use_error_format(scope, OPENAI_ERRORS)
        await self.app(scope, receive, send)
