"""The gateway's URL paths, each written once: routes, the gate's key, the OpenAPI document and the client use these."""

from __future__ import annotations

import re
from urllib.parse import quote

from starlette.convertors import Convertor, register_url_convertor

__all__ = ["CHAT_COMPLETIONS", "MESSAGES", "MESSAGES_ROUTE", "MODELS", "messages_path", "messages_session_id"]

#: ``POST`` runs a turn, ``GET`` pages through the transcript.
MESSAGES = "/v1/sessions/{sessionId}/messages"
#: OpenAI Chat Completions: ``POST`` runs a turn of the session named by ``X-Session-Id`` or ``user``.
CHAT_COMPLETIONS = "/v1/chat/completions"
#: OpenAI's model list: the configured providers.
MODELS = "/v1/models"

_PREFIX, _SUFFIX = MESSAGES.split("{sessionId}")
# Matches any id, valid or not (even one with "/"), so a bad one reads as invalid-session-id, not 404.
_MESSAGES_PATTERN = re.compile(f"{re.escape(_PREFIX)}(?P<session_id>.*){re.escape(_SUFFIX)}", re.DOTALL)


class _AnyId(Convertor[str]):
    """A path segment of any characters, "/" and newlines too: a bad id must reach validation (400), not 404."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anyid", _AnyId())
#: :data:`MESSAGES` as a Starlette route path.
MESSAGES_ROUTE = MESSAGES.replace("{sessionId}", "{sessionId:anyid}")


def messages_path(session_id: str) -> str:
    """The messages path of a session, percent-encoded as a client sends it."""
    return f"{_PREFIX}{quote(session_id, safe=':@')}{_SUFFIX}"


def messages_session_id(path: str) -> str | None:
    """The (unvalidated) session id of a messages path, else ``None``."""
    match = _MESSAGES_PATTERN.fullmatch(path)
    return match["session_id"] if match else None
