"""The OpenAI-compatible routes: ``POST /v1/chat/completions`` runs one turn, ``GET /v1/models`` lists providers.

A chat completion is the messages API's turn in another wire format: the
middleware stack has checked the token, and SessionGate has parsed the body
(:func:`~sessiongate.gateway._body.gated_body_parser`), checked rate limits
and the Idempotency-Key and granted the session's lane exactly as for
``POST /v1/sessions/{id}/messages``; the route hands the lane to a live turn
(:mod:`sessiongate.gateway.live`) as that route does, so the turn can be
watched and cancelled at ``/v1/sessions/{id}/turns/current`` and outlives a
client that goes away. ``stream: true`` sends its deltas as they come.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from sessiongate import Admission, SessionBusy, SessionGateError, admission_of, take_lane

from .._openai import ChatRequest, chat_completion, completion_chunks, completion_id, model_list, openai_usage
from ..live import LiveTurn
from ..paths import CHAT_COMPLETIONS, MODELS
from ..turns import user_record
from .sessions import EVENT_STREAM, EVENT_STREAM_HEADERS, gateway_of

__all__ = ["chat_completions", "deltas_telling_the_gate", "models", "routes"]

CHAT_CHANNEL = "openai"  # the transcript's ``channel`` of messages that came in through this route


async def chat_completions(request: Request) -> Response:
    admission = admission_of(request.scope)
    if admission is None or not isinstance(admission.body, ChatRequest):
        # only if the app was assembled without SessionGate (and its body hook) in front of this route
        raise SessionGateError("no session lane was granted to this request")
    gateway = gateway_of(request)
    grant = take_lane(request.scope)  # the turn task releases it when the turn ends
    if grant is None:  # lane.mode = collect admitted it to wait; this route does not collect
        raise SessionBusy(f"session {admission.session_id!r} has a turn in progress",
                          retry_after_ms=gateway.backend.lanes.estimate_retry_after_ms(admission.session_id),
                          session_id=admission.session_id)
    chat = admission.body
    user = user_record(chat.text, channel=CHAT_CHANNEL, idempotency_key=admission.idempotency_key)
    turn = gateway.live.start(gateway.turns, grant, admission.session_id, [user], first_provider=chat.model)
    if not chat.stream:
        return JSONResponse(chat_completion((await turn.result()).reply))
    # the reply record (its id, its provider) exists only once the turn ends: the chunks name the turn and
    # the provider tried first (failover to the next one can happen only before the first delta)
    async def stored_usage() -> dict[str, int] | None:
        return openai_usage((await turn.result()).reply)

    chunks = completion_chunks(
        deltas_telling_the_gate(turn, admission), completion=completion_id(turn.turn_id),
        model=gateway.turns.providers.order(chat.model)[0].id,
        created=int(time.time()), usage=stored_usage if chat.include_usage else None,
    )
    return StreamingResponse(chunks, media_type=EVENT_STREAM, headers=EVENT_STREAM_HEADERS)


async def deltas_telling_the_gate(turn: LiveTurn, admission: Admission) -> AsyncIterator[str]:
    """The turn's deltas; a failure's status goes to the gate first, so a retryable one (e.g.
    ``all-providers-failed``) is not kept as the Idempotency-Key's answer of this 200 stream."""
    try:
        async for piece in turn.deltas():
            yield piece
    except SessionGateError as error:
        admission.ended_with = error.default_status
        raise


async def models(request: Request) -> JSONResponse:
    providers = gateway_of(request).settings.providers
    return JSONResponse(model_list([(provider.id, provider.type) for provider in providers]))


def routes() -> list[BaseRoute]:
    return [Route(CHAT_COMPLETIONS, chat_completions, methods=["POST"]), Route(MODELS, models, methods=["GET"])]
