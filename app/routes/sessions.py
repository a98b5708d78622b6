"""The messages API: ``POST`` runs one turn, ``GET`` reads the transcript.

By the time ``SessionMessages.post`` runs, the middleware stack has checked the
token and SessionGate has parsed the body (:mod:`sessiongate.gateway._body`),
checked rate limits and the Idempotency-Key and granted the session's lane:
the route only runs the turn under the lane it was given, with what the gate read.
"""

from __future__ import annotations

from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from sessiongate import SessionGateError, admission_of, validate_session_id

from .._body import MessageIn
from .._context import Gateway
from .._logging import SESSION_ID
from ..paths import MESSAGES_ROUTE
from ..turns import user_record

__all__ = ["SessionMessages", "gateway_of", "routes"]


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


class SessionMessages(HTTPEndpoint):
    """``/v1/sessions/{sessionId}/messages`` (one endpoint, so a 405 lists both methods in ``Allow``)."""

    async def post(self, request: Request) -> JSONResponse:
        admission = admission_of(request.scope)
        if admission is None or not isinstance(admission.body, MessageIn):
            # only if the app was assembled without SessionGate (and its body hook) in front of this route
            raise SessionGateError("no session lane was granted to this request")
        message = admission.body
        user = user_record(
            message.text, sender=message.sender, channel="api", idempotency_key=admission.idempotency_key
        )
        result = await gateway_of(request).turns.run_turn(admission.grant, admission.session_id, user)
        return JSONResponse({
            "sessionId": admission.session_id,
            "messageId": result.user["id"],
            "reply": {"id": result.reply["id"], "text": result.reply["text"], "provider": result.provider},
        })

    async def get(self, request: Request) -> JSONResponse:
        session_id = validate_session_id(request.path_params["sessionId"])
        SESSION_ID.set(session_id)
        messages = await gateway_of(request).store.read_unlocked(session_id)
        return JSONResponse({"sessionId": session_id, "messages": messages})


def routes() -> list[BaseRoute]:
    return [Route(MESSAGES_ROUTE, SessionMessages)]
