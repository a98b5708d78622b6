"""``/openapi.json``: an OpenAPI 3.1 description of every endpoint, body and problem answer.

Written out rather than generated: the contract (statuses, problem types,
headers) is the point of this API, and a hand-kept document states it
exactly. ``tests/test_gateway_api.py`` checks that every route is described and
that real answers match their schemas; schemathesis can fuzz from it.
"""

from __future__ import annotations

import functools
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from sessiongate import MAX_IDEMPOTENCY_KEY_LENGTH, PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_BASE, SESSION_ID_PATTERN

from .._body import MAX_SENDER_CHARS, MAX_TEXT_CHARS
from ..paths import CHAT_COMPLETIONS, CURRENT_TURN, MESSAGES, MODELS
from .sessions import DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT

__all__ = ["PROBLEM_TYPES", "openapi", "openapi_document", "routes"]

PROBLEM_TYPES = {
    "session-busy": "the session's lane or write lock was not had within its wait (409, or contention.status); "
                    "names the running turn (turnId, Link rel=monitor)",
    "turn-cancelled": "the turn was cancelled (DELETE .../turns/current) or interrupted by a newer message "
                      "(lane.mode=interrupt); the message is stored, not retryable (409)",
    "queue-full": "lane.mode=queue and the session's queue is at lane.queueCap (429)",
    "rate-limited": "a rateLimits quota is spent (429, with RateLimit and RateLimit-Policy)",
    "idempotency-in-flight": "the same Idempotency-Key is still being processed (409)",
    "idempotency-key-reused": "the same Idempotency-Key came with a different body (422)",
    "invalid-request": "malformed JSON, missing or wrong fields (400)",
    "invalid-session-id": "the session id is not 1-128 characters of [A-Za-z0-9._:@-] (400)",
    "payload-too-large": "the body is over server.maxBodyBytes (413)",
    "unsupported-media-type": "a JSON route called with another Content-Type (415)",
    "forbidden": "a browser request from another site to a state-changing route (403; see server.corsOrigins)",
    "unauthorized": "bad or missing bearer token, webhook secret or signature (401)",
    "all-providers-failed": "every provider failed with a provider error; detail lists each (502)",
    "backend-unavailable": "the lock backend cannot be reached (503)",
    "storage-failed": "the transcript could not be written (disk full); nothing of the turn was kept (507)",
    "channel-not-configured": "a webhook for a channel that is not in the config (404)",
    "not-found": "no such route (404)",
    "method-not-allowed": "the route exists, the method does not (405)",
    "internal-error": "an unexpected error, logged with the request id; never details (500)",
}

_RETRY_AFTER = {
    "description": "seconds to wait before retrying (integer, at least 1)",
    "schema": {"type": "integer", "minimum": 1},
}
_RETRY_HEADERS = {
    "Retry-After": _RETRY_AFTER,
    "retry-after-ms": {"description": "the finer estimate, in milliseconds (read by the OpenAI and Anthropic SDKs)",
                       "schema": {"type": "integer", "minimum": 1}},
    "x-should-retry": {"description": "true on retryable answers, false on every other error",
                       "schema": {"type": "string", "enum": ["true", "false"]}},
}
_RATELIMIT_HEADERS = {
    **_RETRY_HEADERS,
    "RateLimit": {"description": "remaining quota (draft-ietf-httpapi-ratelimit-headers)",
                  "schema": {"type": "string"}},
    "RateLimit-Policy": {"description": "the quota policy", "schema": {"type": "string"}},
}


def _problem(description: str, *, retryable: bool = False, headers: dict[str, Any] | None = None,
             media_type: str = PROBLEM_CONTENT_TYPE, schema: str = "Problem") -> dict[str, Any]:
    """An error answer: problem+json, or (``media_type``, ``schema``) on a route with another error format."""
    response: dict[str, Any] = {
        "description": description,
        "content": {media_type: {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }
    if retryable or headers:
        response["headers"] = headers or _RETRY_HEADERS
    return response


def _json(schema_name: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}},
    }


def _content(media_type: str, json_type: str) -> dict[str, Any]:
    return {"description": media_type, "content": {media_type: {"schema": {"type": json_type}}}}


def _public_get(summary: str, operation_id: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"summary": summary, "operationId": operation_id, "security": [], "responses": responses}}


_SESSION_ID_PARAM = {
    "name": "sessionId",
    "in": "path",
    "required": True,
    "description": "1-128 characters of [A-Za-z0-9._:@-], not '.' or '..'",
    "schema": {"$ref": "#/components/schemas/SessionId"},
}
_SESSION_API_ERRORS = {
    "400": _problem("invalid-request / invalid-session-id"),
    "401": _problem("unauthorized (only when auth.tokens is set)"),
    "404": _problem("not-found"),
    "405": _problem("method-not-allowed"),
    "413": _problem("payload-too-large"),
    "500": _problem("internal-error"),
}


_TURN_EVENTS = {
    "schema": {"type": "string"},
    "description": "server-sent events: turn {turnId, messageId}, then delta {text}..., then done "
                   "{id, text, provider} or error (a Problem)",
}


def _turn_errors(media_type: str = PROBLEM_CONTENT_TYPE, schema: str = "Problem") -> dict[str, Any]:
    """The error answers of a route that runs a turn (checks in the contract's order, then the turn)."""
    def error(description: str, *, retryable: bool = False, headers: dict[str, Any] | None = None) -> dict[str, Any]:
        return _problem(description, retryable=retryable, headers=headers, media_type=media_type, schema=schema)

    return {
        "400": error("invalid-request / invalid-session-id"),
        "401": error("unauthorized (only when auth.tokens is set)"),
        "403": error("forbidden: a cross-site browser request"),
        "405": error("method-not-allowed"),
        "409": error("session-busy / idempotency-in-flight (retryable) / turn-cancelled", retryable=True),
        "413": error("payload-too-large"),
        "415": error("unsupported-media-type"),
        "422": error("idempotency-key-reused"),
        "429": error("rate-limited / queue-full (or session-busy with contention.status=429)",
                     headers=_RATELIMIT_HEADERS),
        "500": error("internal-error"),
        "502": error("all-providers-failed"),
        "503": error("backend-unavailable", retryable=True),
        "507": error("storage-failed"),
    }


_OPENAI_ERROR_MEDIA = ("application/json", "OpenAIError")
_IDEMPOTENCY_KEY_PARAM = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "repeat-safe retries: a repeat gets the stored answer",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_LENGTH},
}
_CHAT_COMPLETIONS = {
    "post": {
        "summary": "OpenAI Chat Completions: the last user message is one turn of the session",
        "description": "The session is the X-Session-Id header, else the 'user' field. Only the last 'user' "
                       "message is read; the history sent to the model is the session's transcript. 'model' "
                       "names the provider tried first (an unknown name keeps the configured order). Errors "
                       "are OpenAI's {\"error\": {message, type, code}} with code = the problem name.",
        "operationId": "createChatCompletion",
        "parameters": [
            {"name": "X-Session-Id", "in": "header", "required": False,
             "description": "the session (else the body's 'user')", "schema": {"$ref": "#/components/schemas/SessionId"}},
            _IDEMPOTENCY_KEY_PARAM,
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}},
        },
        "responses": {
            "200": {"description": "a chat.completion, or with stream=true chat.completion.chunk events and [DONE]",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **_turn_errors(*_OPENAI_ERROR_MEDIA),
        },
    }
}
_MODELS = {"get": {
    "summary": "The configured providers, as OpenAI models (in failover order)",
    "operationId": "listModels",
    "responses": {"200": _json("ModelList", "the providers"),
                  "401": _turn_errors(*_OPENAI_ERROR_MEDIA)["401"]},
}}


def _webhook(summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "operationId": summary.split()[0].lower() + "Webhook",
            "security": [],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            "responses": {
                "200": {"description": "accepted (durably) or acknowledged as a repeat",
                        "content": {"application/json": {"schema": {}}}},
                "400": _problem("invalid-request"),
                "401": _problem("unauthorized: bad secret token or signature"),
                "404": _problem("channel-not-configured"),
                "413": _problem("payload-too-large"),
                "429": _problem("session-busy: the same update is being accepted right now", retryable=True),
                "500": _problem("internal-error"),
                "503": _problem("backend-unavailable", retryable=True),
            },
        }
    }


@functools.cache  # built once: nothing in it changes while the process runs
def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sessiongate",
            "version": "0.1.0",
            "description": (
                "AI chat gateway with fast session contention answers. Errors are application/problem+json "
                f"(RFC 9457) whose type is {PROBLEM_TYPE_BASE}<name>. Checks run in this order: auth, body "
                "limit and validation, rate limits, Idempotency-Key, session lane."
            ),
        },
        "paths": {
            MESSAGES: {
                "parameters": [_SESSION_ID_PARAM],
                "post": {
                    "summary": "Send a message and get the reply (one turn)",
                    "operationId": "postMessage",
                    "parameters": [_IDEMPOTENCY_KEY_PARAM],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/MessageIn"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "the reply; user message and reply are in the transcript. With "
                                           "Accept: text/event-stream, the turn's events instead",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/TurnReply"}},
                                "text/event-stream": _TURN_EVENTS,
                            },
                        },
                        **_SESSION_API_ERRORS,
                        **_turn_errors(),
                    },
                },
                "get": {
                    "summary": "Read the transcript a page at a time, newest page first (lock-free)",
                    "operationId": "getMessages",
                    "parameters": [
                        {
                            "name": "limit", "in": "query", "required": False,
                            "description": "most messages in the page",
                            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_LIMIT,
                                       "default": DEFAULT_PAGE_LIMIT},
                        },
                        {
                            "name": "before", "in": "query", "required": False,
                            "description": "a messageId: the page holds the messages just before it",
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {
                        "200": {
                            **_json("Transcript", "the newest `limit` messages (before `before`), in transcript order"),
                            "headers": {"Link": {
                                "description": 'rel="next": the page of older messages, while there are any',
                                "schema": {"type": "string"},
                            }},
                        },
                        **_SESSION_API_ERRORS,
                    },
                },
            },
            CURRENT_TURN: {
                "parameters": [_SESSION_ID_PARAM],
                "get": {
                    "summary": "Follow the running turn: its events from the first",
                    "operationId": "watchTurn",
                    "responses": {"200": {"description": "the turn's events", "content": {
                        "text/event-stream": _TURN_EVENTS}}, **_SESSION_API_ERRORS},
                },
                "delete": {
                    "summary": "Cancel the running turn (its message and partial reply are stored)",
                    "operationId": "cancelTurn",
                    "responses": {"204": {"description": "cancelled"}, **_SESSION_API_ERRORS},
                },
            },
            CHAT_COMPLETIONS: _CHAT_COMPLETIONS,
            MODELS: _MODELS,
            "/v1/webhooks/telegram": _webhook("Telegram update (X-Telegram-Bot-Api-Secret-Token checked)"),
            "/v1/webhooks/slack": _webhook("Slack Events API request (signature and timestamp checked)"),
            "/healthz": _public_get("Liveness: the process serves", "healthz", {"200": _json("Status", "up")}),
            "/readyz": _public_get("Readiness: the lock backend answers and transcript appends succeed", "readyz", {
                "200": _json("Status", "ready"), "503": _problem("backend-unavailable", retryable=True),
                "507": _problem("storage-failed")}),
            "/metrics": _public_get("Prometheus metrics", "metrics", {"200": _content("text/plain", "string")}),
            "/openapi.json": _public_get("This document", "openapi", {"200": _content("application/json", "object")}),
            "/": _public_get("The webchat page", "webchat", {"200": _content("text/html", "string")}),
        },
        "security": [{}, {"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "one of auth.tokens, when configured"}},
            "schemas": _schemas(),
        },
    }


def _schemas() -> dict[str, Any]:
    message = {
        "type": "object",
        "required": ["id", "role", "text", "at"],
        "properties": {
            "id": {"type": "string"},
            "role": {"type": "string", "enum": ["user", "assistant"]},
            "text": {"type": "string"},
            "at": {"type": "string", "format": "date-time"},
            "fence": {"type": ["integer", "null"]},
            "sender": {"type": "string"},
            "channel": {"type": "string"},
            "replyTo": {"type": "string"},
            "provider": {"type": "string"},
            "externalId": {"type": "string"},
            "interrupted": {"type": "boolean", "description": "a cancelled turn's partial reply"},
        },
    }
    return {
        "SessionId": {"type": "string", "pattern": f"^{SESSION_ID_PATTERN.pattern}$", "not": {"enum": [".", ".."]}},
        "MessageIn": {
            "type": "object",
            "required": ["text"],
            "additionalProperties": False,
            "properties": {
                "text": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS, "pattern": "\\S"},
                "sender": {"type": "string", "minLength": 1, "maxLength": MAX_SENDER_CHARS},
            },
        },
        "TurnReply": {
            "type": "object",
            "required": ["sessionId", "messageId", "reply"],
            "properties": {
                "sessionId": {"$ref": "#/components/schemas/SessionId"},
                "messageId": {"type": "string", "description": "id of the user message in the transcript"},
                "reply": {
                    "type": "object",
                    "required": ["id", "text", "provider"],
                    "properties": {
                        "id": {"type": "string"},
                        "text": {"type": "string"},
                        "provider": {"type": "string", "description": "id of the provider that answered"},
                    },
                },
            },
        },
        "Message": message,
        "Transcript": {
            "type": "object",
            "required": ["sessionId", "messages"],
            "properties": {
                "sessionId": {"$ref": "#/components/schemas/SessionId"},
                "messages": {"type": "array", "items": {"$ref": "#/components/schemas/Message"}},
            },
        },
        "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
        **_openai_schemas(),
        "Problem": {
            "type": "object",
            "required": ["type", "title", "status", "detail"],
            "description": "RFC 9457. type is " + PROBLEM_TYPE_BASE + "<name>: "
                           + "; ".join(f"{name}: {when}" for name, when in PROBLEM_TYPES.items()),
            "properties": {
                "type": {"type": "string", "enum": [PROBLEM_TYPE_BASE + name for name in PROBLEM_TYPES]},
                "title": {"type": "string"},
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "detail": {"type": "string"},
                "sessionId": {"type": "string"},
                "retryAfterMs": {"type": "integer", "minimum": 1},
                "turnId": {"type": "string", "description": "session-busy: the running turn"},
            },
        },
    }


def _openai_schemas() -> dict[str, Any]:
    """What the gateway reads of and writes in the OpenAI wire format (other request fields are accepted and ignored)."""
    nullable = {"string": {"type": ["string", "null"]}, "boolean": {"type": ["boolean", "null"]}}
    return {
        "ChatCompletionRequest": {
            "type": "object",
            "required": ["messages"],
            "properties": {
                "messages": {"type": "array", "items": {"type": "object"},
                             "description": "the last message with role 'user' (text content) is the new turn"},
                "model": nullable["string"],
                "user": nullable["string"],
                "stream": nullable["boolean"],
                "stream_options": {"type": ["object", "null"]},
            },
        },
        "ChatCompletion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "chat.completion"},
                "created": {"type": "integer"},
                "model": {"type": "string", "description": "id of the provider that answered"},
                "choices": {"type": "array", "items": {"type": "object"}},
                "usage": {"type": "object",
                          "description": "only when the provider reported token usage (the echo provider reports none)"},
            },
        },
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
                "type": "object", "required": ["id", "object", "created", "owned_by"],
                "properties": {"id": {"type": "string"}, "object": {"const": "model"},
                               "created": {"type": "integer"}, "owned_by": {"type": "string"}}}}},
        },
        "OpenAIError": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {
                "type": "object",
                "required": ["message", "type", "code"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "code": {"type": "string", "enum": list(PROBLEM_TYPES)},
                               "param": {"type": "null"}},
            }},
        },
    }


async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(openapi_document())


def routes() -> list[BaseRoute]:
    return [Route("/openapi.json", openapi, methods=["GET"])]
