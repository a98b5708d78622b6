"""The OpenAI-compatible routes: ``POST /v1/chat/completions`` runs one turn, ``GET /v1/models`` lists providers.

A chat completion is the messages API's turn in another wire format: the
middleware stack has checked the token, and SessionGate has parsed the body
(:func:`~sessiongate.gateway._body.gated_body_parser`), checked rate limits
and the Idempotency-Key and granted the session's lane exactly as for
``POST /v1/sessions/{id}/messages``; the turn runs through the same
:class:`~sessiongate.gateway.turns.TurnRunner`.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from sessiongate import SessionGateError, admission_of

from .._openai import (
    ChatRequest,
    chat_completion,
    completion_chunks,
    completion_id,
    created_at,
    model_list,
    one_piece,
    openai_usage,
)
from ..paths import CHAT_COMPLETIONS, MODELS
from ..turns import user_record
from .sessions import gateway_of

__all__ = ["chat_completions", "models", "routes"]

CHAT_CHANNEL = "openai"  # the transcript's ``channel`` of messages that came in through this route


async def chat_completions(request: Request) -> Response:
    admission = admission_of(request.scope)
    if admission is None or not isinstance(admission.body, ChatRequest):
        # only if the app was assembled without SessionGate (and its body hook) in front of this route
        raise SessionGateError("no session lane was granted to this request")
    chat = admission.body
    user = user_record(chat.text, channel=CHAT_CHANNEL, idempotency_key=admission.idempotency_key)
    result = await gateway_of(request).turns.run_turn(
        admission.grant, admission.session_id, user, first_provider=chat.model
    )
    if not chat.stream:
        return JSONResponse(chat_completion(result.reply))
    reply = result.reply
    chunks = completion_chunks(
        one_piece(reply["text"]), completion=completion_id(reply), model=result.provider,
        created=created_at(reply), usage=openai_usage(reply) if chat.include_usage else None,
    )
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-store"})


async def models(request: Request) -> JSONResponse:
    providers = gateway_of(request).settings.providers
    return JSONResponse(model_list([(provider.id, provider.type) for provider in providers]))


def routes() -> list[BaseRoute]:
    return [Route(CHAT_COMPLETIONS, chat_completions, methods=["POST"]), Route(MODELS, models, methods=["GET"])]
