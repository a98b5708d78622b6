"""A local fake of an OpenAI-compatible chat completions API, served by a real uvicorn on 127.0.0.1.

Tests tell it how to behave (answer, answer after a delay, fail with a
status, hang, send garbage) and read what it saw: the number of calls and the
request bodies. It replies ``"<name>: <last user message>"`` so a test can
tell which provider answered, with ``usage``: one prompt token per message
sent, two completion tokens.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support import UvicornThread

Behaviour = Literal["ok", "status", "hang", "garbage"]
HANG_S = 30.0


@dataclass
class FakeOpenAI:
    """``with FakeOpenAI("a") as fake:`` serves at ``fake.url`` (use it as a provider's ``baseUrl``)."""

    name: str = "fake"
    behaviour: Behaviour = "ok"
    status: int = 500
    delay_s: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0  # most calls seen at the same time
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: UvicornThread | None = None

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.requests)

    @property
    def url(self) -> str:
        assert self._server is not None, "start the fake first"
        return self._server.url

    def provider(self, *, timeout_ms: int = 5_000, **extra: Any) -> dict[str, Any]:
        """A ``providers`` config entry pointing at this fake."""
        return {"id": self.name, "type": "openai", "baseUrl": self.url, "model": "fake-model",
                "timeoutMs": timeout_ms, **extra}

    async def _chat_completions(self, request: Request) -> Response:
        body = await request.json()
        with self._lock:
            self.requests.append(body)
            self.headers.append(dict(request.headers))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(HANG_S if self.behaviour == "hang" else self.delay_s)
        finally:
            with self._lock:
                self.in_flight -= 1
        if self.behaviour == "status":
            return JSONResponse({"error": {"message": "fake failure"}}, status_code=self.status)
        if self.behaviour == "garbage":
            return Response("<html>not json</html>", media_type="text/html")
        last_user = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        return JSONResponse({
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"{self.name}: {last_user}"}}],
            "usage": {"prompt_tokens": len(body["messages"]), "completion_tokens": 2, "total_tokens": len(body["messages"]) + 2},
        })

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self._chat_completions, methods=["POST"])])

    def __enter__(self) -> FakeOpenAI:
        self._server = UvicornThread(self.app(), timeout_graceful_shutdown=1).__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.__exit__(*exc_info)
