"""A fake Slack Web API on 127.0.0.1: records every ``chat.postMessage`` and can answer 429 on demand.

Served by ``tests.support.UvicornThread``; the gateway under test points
``channels.slack.apiBase`` at it. Like Slack, a throttled call gets HTTP 429
with a ``Retry-After`` header, a call without the right bearer token
``{"ok": false, "error": "invalid_auth"}``.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.fakes.telegram_api import RecordingApi

BOT_TOKEN = "xoxb-fake-bot-token"


class FakeSlackApi(RecordingApi):
    """``POST /chat.postMessage``; ``texts()`` lists what was delivered."""

    def __init__(self, bot_token: str) -> None:
        super().__init__()
        self.bot_token = bot_token
        self.app = Starlette(routes=[Route("/chat.postMessage", self._post_message, methods=["POST"])])

    async def _post_message(self, request: Request) -> JSONResponse:
        call, retry_after = await self.record(request)
        if retry_after is not None:
            return JSONResponse({"ok": False, "error": "ratelimited"}, status_code=429,
                                headers={"Retry-After": str(retry_after)})
        if call.headers.get("authorization") != f"Bearer {self.bot_token}":
            return JSONResponse({"ok": False, "error": "invalid_auth"})
        return JSONResponse({"ok": True, "channel": call.body.get("channel"), "ts": f"{call.at:.6f}"})
