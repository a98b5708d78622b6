"""A local fake of an OpenAI-compatible chat completions API, served by a real uvicorn on 127.0.0.1.

Tests tell it how to behave (answer, answer after a delay, fail with a
status, hang, send garbage, break off a stream after its first piece) and read
what it saw: the number of calls, the request bodies, and how many streams the
client closed before their end (``aborted``). It replies ``"<name>: <last user
message>"`` so a test can tell which provider answered, with ``usage``: one
prompt token per message sent, two completion tokens; with ``"stream": true``
it sends that reply word by word as ``chat.completion.chunk`` server-sent
events, ``piece_delay_s`` apart.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support import UvicornThread

Behaviour = Literal["ok", "status", "hang", "garbage", "break"]  # break: a stream ends after its first piece
HANG_S = 30.0


@dataclass
class FakeOpenAI:
    """``with FakeOpenAI("a") as fake:`` serves at ``fake.url`` (use it as a provider's ``baseUrl``)."""

    name: str = "fake"
    behaviour: Behaviour = "ok"
    status: int = 500
    delay_s: float = 0.0
    piece_delay_s: float = 0.0
    aborted: int = 0  # streams the client closed before their last piece
    completed: int = 0  # streams sent to their end
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
        if body.get("stream"):
            usage = self._usage(body) if (body.get("stream_options") or {}).get("include_usage") else None
            return StreamingResponse(self._chunks(f"{self.name}: {last_user}", usage), media_type="text/event-stream")
        return JSONResponse({
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"{self.name}: {last_user}"}}],
            "usage": self._usage(body),
        })

    @staticmethod
    def _usage(body: dict[str, Any]) -> dict[str, int]:
        return {"prompt_tokens": len(body["messages"]), "completion_tokens": 2, "total_tokens": len(body["messages"]) + 2}

    async def _chunks(self, reply: str, usage: dict[str, int] | None = None) -> AsyncIterator[bytes]:
        pieces = re.findall(r"\s*\S+\s*", reply)
        finished = False
        try:
            for number, piece in enumerate(pieces):
                if number and self.piece_delay_s:
                    await asyncio.sleep(self.piece_delay_s)
                chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                if self.behaviour == "break":
                    raise ConnectionResetError("the fake breaks off after the first piece")
            if usage is not None:  # as OpenAI sends it: a last chunk with no choices
                yield f"data: {json.dumps({'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            with self._lock:
                if finished:
                    self.completed += 1
                else:
                    self.aborted += 1

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self._chat_completions, methods=["POST"])])

    def __enter__(self) -> FakeOpenAI:
        self._server = UvicornThread(self.app(), timeout_graceful_shutdown=1).__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.__exit__(*exc_info)
