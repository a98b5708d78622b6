"""A fake Telegram Bot API on 127.0.0.1: records every ``sendMessage`` and can answer 429 on demand.

Served by ``tests.support.UvicornThread``; the gateway under test points
``channels.telegram.apiBase`` at it, so nothing leaves the machine. It answers
like the real Bot API: ``{"ok": true, "result": ...}``, and for a throttled
call HTTP 429 with ``{"ok": false, "error_code": 429, "parameters": {"retry_after": N}}``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.support import wait_until


@dataclass(frozen=True)
class Call:
    """One request the fake received."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float  # time.monotonic() on arrival
    throttled: bool


@dataclass
class RecordingApi:
    """Call log and 429 switch shared by the fake chat APIs (thread-safe: the server runs in a thread)."""

    calls: list[Call] = field(default_factory=list)
    _throttle_next: int = 0
    _pass_first: int = 0
    _retry_after_s: int = 1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def throttle_next(self, count: int, *, retry_after_s: int = 1, after: int = 0) -> None:
        """Answer ``count`` calls with 429 and ``retry_after_s``: the next ones once ``after`` calls have passed."""
        with self._lock:
            self._throttle_next = count
            self._pass_first = after
            self._retry_after_s = retry_after_s

    async def record(self, request: Request) -> tuple[Call, int | None]:
        """Log the call; the second item is the retry-after to answer with when throttled."""
        body = await request.json()
        with self._lock:
            throttled = self._throttle_next > 0 and self._pass_first == 0
            self._pass_first -= self._pass_first > 0
            self._throttle_next -= throttled
            call = Call(request.url.path, dict(request.headers), body, time.monotonic(), throttled)
            self.calls.append(call)
        return call, (self._retry_after_s if throttled else None)

    def delivered(self) -> list[Call]:
        """Calls that were answered with success."""
        with self._lock:
            return [call for call in self.calls if not call.throttled]

    def texts(self, **match: Any) -> list[str]:
        """Texts of the delivered calls whose body has the ``match`` fields (``chat_id=5``, ``channel="C1"``)."""
        return [
            call.body["text"] for call in self.delivered()
            if all(call.body.get(name) == value for name, value in match.items())
        ]

    def wait_for_texts(self, count: int, *, timeout: float = 15, **match: Any) -> list[str]:
        """:meth:`texts` once there are ``count``, after a short pause that lets a duplicate show up."""
        wait_until(lambda: len(self.texts(**match)) >= count, timeout=timeout, what=f"{count} replies to {match}")
        time.sleep(0.5)
        return self.texts(**match)


class FakeTelegramApi(RecordingApi):
    """``POST /bot<token>/sendMessage``; ``texts()`` lists what was delivered."""

    def __init__(self) -> None:
        super().__init__()
        self.app = Starlette(routes=[Route("/bot{token}/sendMessage", self._send_message, methods=["POST"])])

    async def _send_message(self, request: Request) -> JSONResponse:
        call, retry_after = await self.record(request)
        if retry_after is not None:
            return JSONResponse(
                {
                    "ok": False,
                    "error_code": 429,
                    "description": f"Too Many Requests: retry after {retry_after}",
                    "parameters": {"retry_after": retry_after},
                },
                status_code=429,
            )
        message_id = len(self.calls)
        return JSONResponse(
            {"ok": True, "result": {"message_id": message_id, "chat": {"id": call.body.get("chat_id")},
                                    "text": call.body.get("text")}}
        )


SECRET = "s3cret-Token_1"
BOT_TOKEN = "123456:fake-bot-token"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


def update(update_id: int, chat_id: int, text: str) -> dict[str, Any]:
    return {
        "update_id": update_id,
        "message": {
            "message_id": update_id,
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": "private"},
            "from": {"id": chat_id, "is_bot": False, "first_name": "Test"},
            "text": text,
        },
    }


async def deliver_like_telegram(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> httpx.Response:
    """POST the update until a 2xx, waiting Retry-After after a 429, as Telegram does (bounded)."""
    for _ in range(20):
        response = await client.post(f"{url}/v1/webhooks/telegram", json=body)
        if response.status_code != 429:
            return response
        await anyio.sleep(int(response.headers["retry-after"]))
    raise AssertionError("update never accepted")
