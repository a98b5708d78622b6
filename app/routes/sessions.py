"""The messages API: ``POST`` runs one turn, ``GET`` reads the transcript a page at a time.

By the time ``SessionMessages.post`` runs, the middleware stack has checked the
token and SessionGate has parsed the body (:mod:`sessiongate.gateway._body`),
checked rate limits and the Idempotency-Key and granted the session's lane:
the route only runs the turn under the lane it was given, with what the gate read.
"""

from __future__ import annotations

from urllib.parse import urlencode

from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from sessiongate import InvalidRequest, SessionGateError, admission_of, validate_session_id

from .._body import MessageIn
from .._context import Gateway
from .._logging import SESSION_ID
from ..paths import MESSAGES_ROUTE, messages_path
from ..turns import user_record

__all__ = ["DEFAULT_PAGE_LIMIT", "MAX_PAGE_LIMIT", "SessionMessages", "gateway_of", "page_limit", "routes"]


DEFAULT_PAGE_LIMIT = 100
MAX_PAGE_LIMIT = 1_000


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
        """One page, newest first: ``?limit=`` records before ``?before=<messageId>``, in transcript order."""
        session_id = validate_session_id(request.path_params["sessionId"])
        SESSION_ID.set(session_id)
        limit = page_limit(request.query_params.get("limit"))
        before = request.query_params.get("before") or None
        page = await gateway_of(request).store.page(session_id, limit=limit, before=before)
        if page is None:
            raise InvalidRequest(f"before={before!r} is not a message of session {session_id!r}")
        headers = {}
        if page.more:
            older = urlencode({"limit": limit, "before": page.records[0]["id"]})
            headers["Link"] = f'<{messages_path(session_id)}?{older}>; rel="next"'
        return JSONResponse({"sessionId": session_id, "messages": page.records}, headers=headers)


def page_limit(raw: str | None) -> int:
    """``?limit=``: an integer from 1 to ``MAX_PAGE_LIMIT``; absent means ``DEFAULT_PAGE_LIMIT``."""
    if raw is None:
        return DEFAULT_PAGE_LIMIT
    if not raw.isdecimal() or not 1 <= int(raw) <= MAX_PAGE_LIMIT:
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_PAGE_LIMIT}, got {raw!r}")
    return int(raw)


def routes() -> list[BaseRoute]:
    return [Route(MESSAGES_ROUTE, SessionMessages)]
