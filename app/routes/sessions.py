"""The messages API: ``POST`` runs one turn, ``GET`` reads the transcript a page at a time; the running turn
is watched and cancelled.

By the time ``SessionMessages.post`` runs, the middleware stack has checked the
token and SessionGate has parsed the body (:mod:`sessiongate.gateway._body`),
checked rate limits and the Idempotency-Key and granted the session's lane:
the route hands the lane to a turn task (:mod:`sessiongate.gateway.live`) and
follows it, as one JSON answer or, with ``Accept: text/event-stream``, as
server-sent events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlencode

from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from sessiongate import Admission, InvalidRequest, SessionGateError, admission_of, take_lane, validate_session_id

from .._body import MessageIn
from .._context import Gateway
from .._logging import SESSION_ID
from ..live import LiveTurn, TurnEvent
from ..paths import CURRENT_TURN_ROUTE, MESSAGES_ROUTE, messages_path
from ..turns import Record, user_record

__all__ = [
    "DEFAULT_PAGE_LIMIT", "EVENT_STREAM", "EVENT_STREAM_HEADERS", "MAX_PAGE_LIMIT", "CurrentTurn", "SessionMessages",
    "gateway_of", "page_limit", "routes",
]

DEFAULT_PAGE_LIMIT = 100
MAX_PAGE_LIMIT = 1_000

EVENT_STREAM = "text/event-stream"
JSON = "application/json"
EVENT_STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}  # no cache or proxy holds events back


class NoTurnRunning(SessionGateError):
    problem_type = "not-found"
    default_status = 404
    title = "Not Found"


def wants_event_stream(request: Request) -> bool:
    """Whether ``Accept`` asks for the event stream at least as much as for JSON (``q=0`` refuses it)."""
    weights = accept_weights(request.headers.get("accept", ""))
    return weights.get(EVENT_STREAM, 0.0) > 0.0 and weights[EVENT_STREAM] >= weights.get(JSON, 0.0)


def accept_weights(accept: str) -> dict[str, float]:
    """``Accept``'s media ranges (case-insensitive) and their ``q`` (RFC 9110 12.5.1; a malformed ``q`` counts as 1)."""
    weights: dict[str, float] = {}
    for media_range in accept.split(","):
        media_type, *parameters = (part.strip() for part in media_range.split(";"))
        weight = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 1.0
                weight = weight if 0.0 <= weight <= 1.0 else 1.0
        weights[media_type.lower()] = max(weight, weights.get(media_type.lower(), 0.0))
    return weights


def event_stream(events: AsyncIterator[TurnEvent], admission: Admission | None = None) -> StreamingResponse:
    """A turn's events as ``text/event-stream``; a client that leaves stops only its own reading.

    An ``error`` event tells the gate (``admission``) the answer's real status, so a retryable failure is not
    kept as the Idempotency-Key's answer.
    """

    async def encoded() -> AsyncIterator[bytes]:
        async for event in events:
            if event.name == "error" and admission is not None:
                admission.ended_with = event.data["status"]
            yield event.encode()

    return StreamingResponse(encoded(), media_type=EVENT_STREAM, headers=EVENT_STREAM_HEADERS)


def reply_json(session_id: str, message_id: str, reply: Record) -> JSONResponse:
    return JSONResponse({
        "sessionId": session_id,
        "messageId": message_id,
        "reply": {"id": reply["id"], "text": reply["text"], "provider": reply.get("provider")},
    })


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


class SessionMessages(HTTPEndpoint):
    """``/v1/sessions/{sessionId}/messages`` (one endpoint, so a 405 lists both methods in ``Allow``)."""

    async def post(self, request: Request) -> Response:
        admission = admission_of(request.scope)
        collect = gateway_of(request).settings.lane.mode == "collect"
        if admission is None or not isinstance(admission.body, MessageIn) or (admission.grant is None and not collect):
            # only if the app was assembled without SessionGate (and its body hook) in front of this route
            # (in collect mode the gate admits a message for a busy session without a lane)
            raise SessionGateError("no session lane was granted to this request")
        message = admission.body
        user = user_record(
            message.text, sender=message.sender, channel="api", idempotency_key=admission.idempotency_key
        )
        session_id = admission.session_id
        grant = take_lane(request.scope)  # the turn task releases it when the turn ends
        gateway = gateway_of(request)
        if grant is not None and not collect:
            return await answer(request, gateway.live.start(gateway.turns, grant, session_id, [user]), user)
        if grant is not None:
            return await answer(request, await gateway.inbox.start_turn(grant, session_id, user), user)
        outcome = await gateway.inbox.wait(session_id, user)  # the gate found the session busy
        if isinstance(outcome, LiveTurn):
            return await answer(request, outcome, user)
        if wants_event_stream(request):
            return event_stream(finished_turn_events(outcome))
        return reply_json(session_id, user["id"], outcome)

    async def get(self, request: Request) -> JSONResponse:
        """One page, newest first: ``?limit=`` records before ``?before=<messageId>``, in transcript order."""
        session_id = validate_session_id(request.path_params["sessionId"])
        SESSION_ID.set(session_id)
        limit = page_limit(request.query_params.get("limit"))
        before = request.query_params.get("before") or None
        page = await gateway_of(request).store.page(session_id, limit=limit, before=before)
        if page is None:
            shown = f"{before[:64]}…" if before and len(before) > 64 else before  # never a long input echoed whole
            raise InvalidRequest(f"before={shown!r} is not a message of session {session_id!r}")
        headers = {}
        if page.more:
            older = urlencode({"limit": limit, "before": page.records[0]["id"]})
            headers["Link"] = f'<{messages_path(session_id)}?{older}>; rel="next"'
        return JSONResponse({"sessionId": session_id, "messages": page.records}, headers=headers)


def page_limit(raw: str | None) -> int:
    """``?limit=``: an integer from 1 to ``MAX_PAGE_LIMIT``; absent means ``DEFAULT_PAGE_LIMIT``.

    Only ASCII digits, and few of them: ``int()`` refuses a string of thousands of digits (a 500, not a 400).
    """
    if raw is None:
        return DEFAULT_PAGE_LIMIT
    digits = raw.isascii() and raw.isdecimal() and len(raw) <= len(str(MAX_PAGE_LIMIT))
    if not digits or not 1 <= int(raw) <= MAX_PAGE_LIMIT:
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_PAGE_LIMIT}, got {raw!r}")
    return int(raw)


async def answer(request: Request, turn: LiveTurn, user: Record) -> Response:
    """The turn as an event stream, or (awaited) as one JSON answer to ``user``; errors raise their problem."""
    if wants_event_stream(request):
        return event_stream(turn.follow(), admission_of(request.scope))
    result = await turn.result()
    message_id = result.user["id"] if len(turn.users) == 1 else user["id"]  # one: maybe an earlier attempt's
    return reply_json(turn.session_id, message_id, result.reply)


async def finished_turn_events(reply: Record) -> AsyncIterator[TurnEvent]:
    """A reply another turn gave (``collect``), as a whole turn's events."""
    for seq, (name, data) in enumerate([
        ("turn", {"turnId": reply.get("turnId"), "messageId": reply["replyTo"]}),
        ("delta", {"text": reply["text"]}),
        ("done", {"id": reply["id"], "text": reply["text"], "provider": reply.get("provider")}),
    ]):
        yield TurnEvent(seq, name, data)


class CurrentTurn(HTTPEndpoint):
    """``/v1/sessions/{sessionId}/turns/current``: ``GET`` follows the running turn, ``DELETE`` cancels it."""

    async def get(self, request: Request) -> Response:
        session_id = validate_session_id(request.path_params["sessionId"])
        SESSION_ID.set(session_id)
        events = await gateway_of(request).live.watch(session_id)
        if events is None:
            raise NoTurnRunning(f"no turn runs for session {session_id!r}", session_id=session_id)
        return event_stream(events)

    async def delete(self, request: Request) -> Response:
        session_id = validate_session_id(request.path_params["sessionId"])
        SESSION_ID.set(session_id)
        if not await gateway_of(request).live.cancel(session_id):
            raise NoTurnRunning(f"no turn runs for session {session_id!r}", session_id=session_id)
        return Response(status_code=204)


def routes() -> list[BaseRoute]:
    return [Route(MESSAGES_ROUTE, SessionMessages), Route(CURRENT_TURN_ROUTE, CurrentTurn)]
