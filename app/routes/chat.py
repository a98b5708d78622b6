"""The OpenAI-compatible routes: ``POST /v1/chat/completions`` runs one turn, ``GET /v1/models`` lists providers.

A chat completion is the messages API's turn in another wire format: the
middleware stack has checked the token, the body
(:class:`~sessiongate.gateway._body.ChatValidation`), rate limits, the
Idempotency-Key and the session's lane exactly as for
``POST /v1/sessions/{id}/messages``, and the turn runs through the same
:class:`~sessiongate.gateway.turns.TurnRunner`.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from sessiongate import SessionGateError, lane_of
from sessiongate._idempotency import idempotency_key

from .._openai import (
    CHAT_COMPLETIONS_PATH,
    MODELS_PATH,
    chat_completion,
    chat_request_of,
    completion_chunks,
    completion_id,
    created_at,
    model_list,
    one_piece,
    openai_usage,
)
from ..turns import user_record
from .sessions import gateway_of

CHAT_CHANNEL = "openai"  # the transcript's ``channel`` of messages that came in through this route


async def chat_completions(request: Request) -> Response:
    grant = lane_of(request.scope)
    chat = chat_request_of(request.scope)
    if grant is None or chat is None:  # only if the app was assembled without the validation and the gate
        raise SessionGateError("no session lane was granted to this request")
    user = user_record(chat.text, channel=CHAT_CHANNEL, idempotency_key=idempotency_key(request.scope))
    result = await gateway_of(request).turns.run_turn(grant, chat.session_id, user, first_provider=chat.model)
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
    return [Route(CHAT_COMPLETIONS_PATH, chat_completions, methods=["POST"]),
            Route(MODELS_PATH, models, methods=["GET"])]
