"""SessionGate end to end: a plain Starlette app behind the gate, served by a real uvicorn, driven by httpx."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from sessiongate import SessionGate, Settings, admission_of, lane_of
from tests.support import NO_RATE_LIMITS, UvicornThread, assert_problem, free_port, wait_for
from tests.workers import settings_for


def session_of(scope: Scope) -> str | None:
    """``/s/<session>/...`` names a session; anything else passes through."""
    match = re.fullmatch(r"/s/([^/]*)/\w+", scope["path"])
    return match.group(1) if match else None


class Endpoints:
    """A small chat-like app that records every run of its endpoints."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.lifespan: list[str] = []
        self.streamed_chunks = 0
        self.hang_state = "not started"

    async def turn(self, request: Request) -> JSONResponse:
        call = {"session": request.path_params["session"], "body": await request.body(), "start": time.monotonic()}
        self.calls.append(call)
        await asyncio.sleep(int(request.query_params.get("ms", "0")) / 1000)
        call["end"] = time.monotonic()
        grant = lane_of(request.scope)
        admission = admission_of(request.scope)
        assert grant is admission.grant and admission.session_id == request.path_params["session"]
        payload = {"call": len(self.calls), "fence": grant.fence, "session": grant.session_id}
        return JSONResponse(payload, status_code=int(request.query_params.get("status", "200")))

    async def stream(self, request: Request) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for number in range(int(request.query_params.get("chunks", "3"))):
                self.streamed_chunks += 1
                yield f"chunk {number}\n".encode()
                await asyncio.sleep(0.05)

        return StreamingResponse(chunks(), media_type="text/plain")

    async def hang(self, request: Request) -> PlainTextResponse:
        """Watches for its client to leave, then goes on working a while (a model call finishing)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.hang_state = "client left"
        await asyncio.sleep(1.5)
        self.hang_state = "finished"
        return PlainTextResponse("nobody reads this")

    async def boom(self, request: Request) -> None:
        raise RuntimeError("the endpoint failed")

    async def health(self, request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def echo(self, websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    @contextlib.asynccontextmanager
    async def lifespan_of(self, app: Starlette) -> AsyncIterator[None]:
        self.lifespan.append("startup")
        yield
        self.lifespan.append("shutdown")

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/s/{session}/turn", self.turn, methods=["POST"]),
                Route("/s/{session}/stream", self.stream),
                Route("/s/{session}/boom", self.boom, methods=["POST"]),
                Route("/s/{session}/hang", self.hang, methods=["POST"]),
                WebSocketRoute("/s/{session}/ws", self.echo),
                Route("/healthz", self.health),
            ],
            lifespan=self.lifespan_of,
        )


def raising_before_response(app: Any) -> Any:
    """``/s/<id>/raw``: an ASGI app that raises before sending anything (no Starlette error page)."""

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/raw"):
            raise RuntimeError("raised before the response started")
        await app(scope, receive, send)

    return dispatch


def make_settings(tmp_path: Path, backend: str = "memory://", **overrides: Any) -> Settings:
    return settings_for(tmp_path / "data", backend, **({"rateLimits": NO_RATE_LIMITS} | overrides))


@contextlib.contextmanager
def serve(settings: Settings, **gate_options: Any) -> Iterator[tuple[UvicornThread, Endpoints, SessionGate]]:
    endpoints = Endpoints()
    gate = SessionGate(
        raising_before_response(endpoints.app()), settings=settings, session_key=session_of, **gate_options
    )
    with UvicornThread(gate) as server:
        yield server, endpoints, gate


async def eventually_admitted(client: httpx.AsyncClient, session: str, *, timeout: float = 5.0) -> httpx.Response:
    """POST a turn until the session's lane admits it (each refusal is a fast 409)."""
    deadline = time.monotonic() + timeout
    while True:
        response = await client.post(f"/s/{session}/turn")
        if response.status_code != 409 or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.02)


def assert_retryable(response: httpx.Response) -> None:
    body = response.json()
    assert int(response.headers["retry-after"]) >= 1
    assert int(response.headers["retry-after"]) * 1000 >= body["retryAfterMs"] >= 1
    assert response.headers["cache-control"] == "no-store"


def answers_counted(problem_type: str) -> float:
    return REGISTRY.get_sample_value("sessiongate_contention_answers_total", {"type": problem_type}) or 0.0


@pytest.mark.anyio
async def test_second_message_on_a_busy_session_gets_a_fast_409(tmp_path: Path, storage_url: str) -> None:
    counted_before = answers_counted("session-busy")
    with serve(make_settings(tmp_path, storage_url)) as (server, endpoints, _):
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            first = asyncio.create_task(client.post("/s/s1/turn?ms=1500"))
            await wait_for(lambda: len(endpoints.calls) == 1, 5.0, what="first turn started")
            busy = await client.post("/s/s1/turn", json={"text": "second"})
            assert not first.done(), "the busy answer came while the first turn was still running"
            assert_problem(busy, 409, "session-busy", session_id="s1")
            assert_retryable(busy)
            assert (await first).status_code == 200
    assert len(endpoints.calls) == 1
    assert answers_counted("session-busy") == counted_before + 1


@pytest.mark.anyio
@pytest.mark.parametrize("rate_limits", [NO_RATE_LIMITS, {"perSession": "9/minute", "perSender": None}])
async def test_unreachable_redis_is_503_backend_unavailable(tmp_path: Path, rate_limits: dict) -> None:
    settings = make_settings(tmp_path, f"redis://127.0.0.1:{free_port()}/0", rateLimits=rate_limits)
    with serve(settings) as (server, endpoints, _):
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            answer = await client.post("/s/s1/turn")
    assert_problem(answer, 503, "backend-unavailable")
    assert_retryable(answer)
    assert endpoints.calls == []


@pytest.mark.anyio
async def test_contention_status_429_variant(tmp_path: Path) -> None:
    with serve(make_settings(tmp_path, contention={"status": 429})) as (server, endpoints, _):
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            first = asyncio.create_task(client.post("/s/s1/turn?ms=800"))
            await wait_for(lambda: len(endpoints.calls) == 1, 5.0)
            busy = await client.post("/s/s1/turn")
            assert_problem(busy, 429, "session-busy", session_id="s1")
            assert_retryable(busy)
            await first


@pytest.mark.anyio
async def test_distinct_sessions_run_in_parallel(tmp_path: Path) -> None:
    with serve(make_settings(tmp_path)) as (server, endpoints, _):
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            answers = await asyncio.gather(*(client.post(f"/s/s{n}/turn?ms=600") for n in range(3)))
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    latest_start = max(call["start"] for call in endpoints.calls)
    earliest_end = min(call["end"] for call in endpoints.calls)
    assert latest_start < earliest_end, "every turn started before any finished"


@pytest.mark.anyio
async def test_queue_mode_serves_in_arrival_order_and_refuses_past_the_cap(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, lane={"mode": "queue", "queueCap": 2, "queueWaitMs": 10_000})
    with serve(settings) as (server, endpoints, _):
        async with httpx.AsyncClient(base_url=server.url, timeout=15) as client:
            running = asyncio.create_task(client.post("/s/s1/turn?ms=600", content=b"first"))
            await wait_for(lambda: len(endpoints.calls) == 1, 5.0)
            waiting = []
            for text in (b"second", b"third"):
                waiting.append(asyncio.create_task(client.post("/s/s1/turn?ms=50", content=text)))
                await asyncio.sleep(0.15)  # arrival order is the order of these sends
            full = await client.post("/s/s1/turn", content=b"fourth")
            assert_problem(full, 429, "queue-full", session_id="s1")
            assert_retryable(full)
            answers = [await running, *[await task for task in waiting]]
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert [call["body"] for call in endpoints.calls] == [b"first", b"second", b"third"]


@pytest.mark.anyio
async def test_rate_limit_answers_429_with_ratelimit_fields(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, rateLimits={"perSession": "2/minute", "perSender": None})
    with serve(settings) as (server, endpoints, _):
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            assert [(await client.post("/s/s1/turn")).status_code for _ in range(2)] == [200, 200]
            limited = await client.post("/s/s1/turn")
            assert (await client.post("/s/s2/turn")).status_code == 200
    body = assert_problem(limited, 429, "rate-limited", session_id="s1")
    assert_retryable(limited)
    assert limited.headers["ratelimit-policy"] == '"perSession";q=2;w=60'
    assert re.fullmatch(r'"perSession";r=0;t=\d+', limited.headers["ratelimit"])
    assert (body["limit"], body["remaining"], body["windowSeconds"]) == (2, 0, 60)
    assert len(endpoints.calls) == 3


@pytest.mark.anyio
async def test_per_sender_limit_uses_the_sender_key(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, rateLimits={"perSession": None, "perSender": "1/minute"})

    def sender_of(scope: Scope) -> str | None:
        return dict(scope["headers"]).get(b"x-sender", b"").decode() or None

    with serve(settings, sender_key=sender_of) as (server, _, _):
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            assert (await client.post("/s/a/turn", headers={"x-sender": "alice"})).status_code == 200
            limited = await client.post("/s/b/turn", headers={"x-sender": "alice"})
            assert (await client.post("/s/b/turn", headers={"x-sender": "bob"})).status_code == 200
    assert_problem(limited, 429, "rate-limited")
    assert limited.headers["ratelimit-policy"].startswith('"perSender";q=1')


@pytest.mark.anyio
async def test_idempotency_key_replays_the_stored_answer(tmp_path: Path) -> None:
    with serve(make_settings(tmp_path, "file://")) as (server, endpoints, _):
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            headers = {"Idempotency-Key": "k-1"}
            first = await client.post("/s/s1/turn", json={"text": "hi"}, headers=headers)
            repeat = await client.post("/s/s1/turn", json={"text": "hi"}, headers=headers)
    assert first.status_code == repeat.status_code == 200
    assert repeat.json() == first.json() and repeat.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert [call["body"] for call in endpoints.calls] == [b'{"text":"hi"}'], "the body reached the app once"


@pytest.mark.anyio
async def test_idempotency_key_in_flight_and_reused(tmp_path: Path) -> None:
    with serve(make_settings(tmp_path)) as (server, endpoints, _):
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            headers = {"Idempotency-Key": "k-1"}
            first = asyncio.create_task(client.post("/s/s1/turn?ms=800", content=b"a", headers=headers))
            await wait_for(lambda: len(endpoints.calls) == 1, 5.0)
            in_flight = await client.post("/s/s1/turn", content=b"a", headers=headers)
            reused = await client.post("/s/s1/turn", content=b"b", headers=headers)
            assert (await first).status_code == 200
            reused_after = await client.post("/s/s1/turn", content=b"b", headers=headers)
    assert_problem(in_flight, 409, "idempotency-in-flight", session_id="s1")
    assert_retryable(in_flight)
    assert_problem(reused, 422, "idempotency-key-reused", session_id="s1")
    assert_problem(reused_after, 422, "idempotency-key-reused", session_id="s1")
    assert len(endpoints.calls) == 1


@pytest.mark.anyio
async def test_retryable_answers_are_not_stored_under_the_key(tmp_path: Path) -> None:
    no_reuse = httpx.Limits(max_keepalive_connections=0)  # uvicorn drops a connection whose app raised
    with serve(make_settings(tmp_path)) as (server, endpoints, _):
        async with httpx.AsyncClient(base_url=server.url, timeout=10, limits=no_reuse) as client:
            headers = {"Idempotency-Key": "k-1"}
            failed = await client.post("/s/s1/turn?status=503", content=b"a", headers=headers)
            retried = await client.post("/s/s1/turn", content=b"a", headers=headers)
            replayed = await client.post("/s/s1/turn", content=b"a", headers=headers)
    assert (failed.status_code, retried.status_code, replayed.status_code) == (503, 200, 200)
    assert replayed.headers["idempotent-replayed"] == "true"
    assert len(endpoints.calls) == 2


@pytest.mark.anyio
async def test_a_buffered_body_is_bounded_by_max_body_bytes(tmp_path: Path) -> None:
    with serve(make_settings(tmp_path), max_body_bytes=64) as (server, endpoints, _):
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            too_large = await client.post("/s/s1/turn", content=b"x" * 100, headers={"Idempotency-Key": "k"})
            bad_key = await client.post("/s/s1/turn", content=b"x", headers={"Idempotency-Key": ""})
            assert (await client.post("/s/s1/turn", content=b"x" * 100)).status_code == 200  # no key: not read
    assert_problem(too_large, 413, "payload-too-large")
    assert_problem(bad_key, 400, "invalid-request")
    assert [call["body"] for call in endpoints.calls] == [b"x" * 100]


@pytest.mark.anyio
async def test_lane_is_released_after_normal_and_streaming_responses(tmp_path: Path) -> None:
    with serve(make_settings(tmp_path)) as (server, endpoints, _):
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            for _ in range(3):
                assert (await client.post("/s/s1/turn")).status_code == 200
            streamed = await client.get("/s/s1/stream")
            assert streamed.text == "chunk 0\nchunk 1\nchunk 2\n"
            assert (await client.post("/s/s1/turn")).status_code == 200


@pytest.mark.anyio
async def test_lane_is_held_while_a_response_streams(tmp_path: Path) -> None:
    with serve(make_settings(tmp_path)) as (server, endpoints, _):
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            async with client.stream("GET", "/s/s1/stream?chunks=10") as streaming:
                chunks = streaming.aiter_raw()
                await anext(chunks)
                assert_problem(await client.post("/s/s1/turn"), 409, "session-busy")
                async for _ in chunks:
                    pass
            assert (await client.post("/s/s1/turn")).status_code == 200


@pytest.mark.anyio
async def test_lane_is_released_when_the_client_disconnects_mid_response(tmp_path: Path) -> None:
    with serve(make_settings(tmp_path)) as (server, endpoints, _):
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as leaving:
                async with leaving.stream("GET", "/s/s1/stream?chunks=200") as streaming:
                    await anext(streaming.aiter_raw())
            admitted = await eventually_admitted(client, "s1")
    assert admitted.status_code == 200
    assert endpoints.streamed_chunks < 200, "the stream stopped when its client left"


@pytest.mark.anyio
async def test_lane_is_released_when_receive_reports_the_disconnect(tmp_path: Path) -> None:
    with serve(make_settings(tmp_path)) as (server, endpoints, _):
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/s/s1/hang", timeout=0.3)
            admitted = await eventually_admitted(client, "s1")
            assert admitted.status_code == 200
            assert endpoints.hang_state == "client left", "admitted while the left request still ran"


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/s/s1/boom", "/s/s1/raw"])
async def test_lane_and_claim_are_released_when_the_app_raises(tmp_path: Path, path: str) -> None:
    no_reuse = httpx.Limits(max_keepalive_connections=0)  # uvicorn drops a connection whose app raised
    with serve(make_settings(tmp_path)) as (server, endpoints, _):
        async with httpx.AsyncClient(base_url=server.url, timeout=10, limits=no_reuse) as client:
            headers = {"Idempotency-Key": "k-1"}
            failed = await client.post(path, content=b"a", headers=headers)
            assert failed.status_code == 500
            assert (await client.post("/s/s1/turn")).status_code == 200
            retried = await client.post(path, content=b"a", headers=headers)
            assert retried.status_code == 500, "a failed request's key is free for its retry"


@pytest.mark.anyio
async def test_invalid_session_id_is_400_and_never_runs(tmp_path: Path) -> None:
    with serve(make_settings(tmp_path)) as (server, endpoints, _):
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            answers = [await client.post(f"/s/{bad}/turn") for bad in ("a%20b", "%2E%2E", "x" * 129, "a%00b")]
    for answer in answers:
        body = assert_problem(answer, 400, "invalid-session-id")
        assert "sessionId" not in body
    assert endpoints.calls == []


@pytest.mark.anyio
async def test_requests_without_a_session_and_websockets_pass_through(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, rateLimits={"perSession": "1/minute", "perSender": "1/minute"})
    with serve(settings) as (server, endpoints, gate):
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            for _ in range(5):  # never rate limited, never laned
                assert (await client.get("/healthz")).text == "ok"
            running = asyncio.create_task(client.post("/s/s1/turn?ms=500"))
            await wait_for(lambda: len(endpoints.calls) == 1, 5.0)
            async with websockets.connect(f"ws://127.0.0.1:{server.port}/s/s1/ws", open_timeout=5) as socket:
                await socket.send("hello")
                assert await socket.recv() == "hello"
            assert (await running).status_code == 200
        assert gate._backend is not None
    assert endpoints.lifespan == ["startup", "shutdown"], "lifespan messages reached the app"
    assert gate._backend is None, "the gate closed the backend it opened, at shutdown"
