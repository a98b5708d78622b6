"""The messages API end to end: a real uvicorn serving ``create_app``, driven by httpx.

Proves: the POST/GET contract; one turn per session (a second concurrent
message gets a fast 409 problem with Retry-After, and the model is called
once); distinct sessions run in parallel; clients honouring Retry-After are
all served, each message exactly once and in order; bearer auth; the probes,
/metrics, /openapi.json (every route described, answers match their schema)
and 404/405 as problem+json; CORS exposes the contention headers.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import jsonschema_rs
import pytest

from sessiongate._problem import PROBLEM_TYPE_BASE
from sessiongate.gateway._server import create_app
from tests.fakes import gateway_settings, serve_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.support import assert_problem, messages_url, wait_for


def test_post_then_get_the_transcript(tmp_path: Path) -> None:
    with serve_gateway(tmp_path / "data") as server, httpx.Client(timeout=10) as client:
        first = client.post(messages_url(server.url, "chat-1"), json={"text": "hello", "sender": "ann"})
        second = client.post(messages_url(server.url, "chat-1"), json={"text": "again"})
        transcript = client.get(messages_url(server.url, "chat-1"))
        empty = client.get(messages_url(server.url, "never-used"))

    assert first.status_code == second.status_code == 200, second.text
    body = first.json()
    assert body["sessionId"] == "chat-1"
    assert body["reply"] == {"id": body["reply"]["id"], "text": "hello", "provider": "echo"}
    messages = transcript.json()["messages"]
    assert transcript.json()["sessionId"] == "chat-1"
    assert [(m["role"], m["text"]) for m in messages] == [
        ("user", "hello"), ("assistant", "hello"), ("user", "again"), ("assistant", "again")
    ]
    assert messages[0]["id"] == body["messageId"] and messages[0]["sender"] == "ann"
    assert messages[1]["replyTo"] == body["messageId"] and messages[1]["provider"] == "echo"
    assert all(m["at"].endswith("Z") for m in messages)
    assert empty.json() == {"sessionId": "never-used", "messages": []}


@pytest.mark.anyio
async def test_concurrent_messages_on_one_session_one_runs_one_gets_fast_409(tmp_path: Path) -> None:
    with FakeOpenAI("slow", delay_s=1.5) as fake:
        config = {"providers": [fake.provider()]}
        with serve_gateway(tmp_path / "data", config) as server:
            async with httpx.AsyncClient(timeout=10) as client:
                url = messages_url(server.url, "one")
                running = asyncio.create_task(client.post(url, json={"text": "first"}))
                await wait_for(lambda: fake.calls == 1)
                busy = await client.post(url, json={"text": "second"})
                answered_during_turn = not running.done()  # no lock wait: the first turn still runs
                done = await running
                transcript = (await client.get(url)).json()["messages"]

    assert done.status_code == 200 and done.json()["reply"]["text"] == "slow: first"
    problem = assert_problem(busy, 409, "session-busy")
    assert problem["sessionId"] == "one"
    assert problem["retryAfterMs"] >= 1
    assert int(busy.headers["retry-after"]) >= 1
    assert busy.headers["retry-after-ms"] == str(problem["retryAfterMs"])
    assert busy.headers["x-should-retry"] == "true"
    assert busy.headers["cache-control"] == "no-store"
    assert answered_during_turn
    assert fake.calls == 1
    assert [m["text"] for m in transcript] == ["first", "slow: first"]


@pytest.mark.anyio
async def test_distinct_sessions_run_in_parallel(tmp_path: Path) -> None:
    sessions = [f"s{i}" for i in range(4)]
    with FakeOpenAI("model", delay_s=1.0) as fake:
        with serve_gateway(tmp_path / "data", {"providers": [fake.provider()]}) as server:
            async with httpx.AsyncClient(timeout=20) as client:
                answers = await asyncio.gather(*(
                    client.post(messages_url(server.url, s), json={"text": s}) for s in sessions
                ))
    assert [a.status_code for a in answers] == [200] * 4
    assert fake.max_in_flight == 4  # every session's model call overlapped the others


async def send_honouring_retry_after(client: httpx.AsyncClient, url: str, text: str, *, attempts: int = 200) -> dict:
    """POST until 200, sleeping ``retryAfterMs`` after each retryable answer (409 busy, 429 limited; bounded)."""
    for _ in range(attempts):
        response = await client.post(url, json={"text": text})
        if response.status_code == 200:
            return response.json()
        assert response.status_code in (409, 429), response.text
        await asyncio.sleep(response.json()["retryAfterMs"] / 1000)
    raise AssertionError(f"{text!r} not served after {attempts} attempts")


@pytest.mark.anyio
async def test_three_clients_honouring_retry_after_are_all_served_once_in_order(tmp_path: Path) -> None:
    config = {"providers": [{"id": "echo", "type": "echo", "delayMs": 100}]}
    with serve_gateway(tmp_path / "data", config) as server:
        url = messages_url(server.url, "shared")
        async with httpx.AsyncClient(timeout=10) as client:

            async def one_client(name: str) -> list[dict]:
                return [await send_honouring_retry_after(client, url, f"{name}-{i}") for i in range(3)]

            replies = await asyncio.gather(*(one_client(name) for name in ("a", "b", "c")))
            transcript = (await client.get(url)).json()["messages"]

    assert all(r["reply"]["text"] == r_text for client_replies, name in zip(replies, "abc")
               for r, r_text in zip(client_replies, (f"{name}-{i}" for i in range(3))))
    users = [m["text"] for m in transcript if m["role"] == "user"]
    assert sorted(users) == sorted(f"{n}-{i}" for n in "abc" for i in range(3))  # each exactly once
    for name in "abc":
        assert [u for u in users if u.startswith(name)] == [f"{name}-{i}" for i in range(3)]  # in order
    pairs = list(zip(transcript[::2], transcript[1::2]))
    assert all(u["role"] == "user" and r["role"] == "assistant" and r["replyTo"] == u["id"] for u, r in pairs)


def test_bearer_tokens_guard_the_sessions_api_only(tmp_path: Path) -> None:
    config = {"auth": {"tokens": ["s3cret-one", "s3cret-two"]}}
    with serve_gateway(tmp_path / "data", config) as server, httpx.Client(timeout=10) as client:
        url = messages_url(server.url, "guarded")
        missing = client.post(url, json={"text": "hi"})
        wrong = client.get(url, headers={"Authorization": "Bearer s3cret-on"})
        basic = client.get(url, headers={"Authorization": "Basic s3cret-one"})
        ok = client.post(url, json={"text": "hi"}, headers={"Authorization": "Bearer s3cret-two"})
        ok_get = client.get(url, headers={"authorization": "bearer s3cret-one"})
        health = client.get(f"{server.url}/healthz")

    for response in (missing, wrong, basic):
        assert_problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert ok.status_code == 200 and ok_get.status_code == 200
    assert health.status_code == 200


def test_probes_metrics_and_router_errors(tmp_path: Path) -> None:
    with serve_gateway(tmp_path / "data") as server, httpx.Client(timeout=10) as client:
        client.post(messages_url(server.url, "m"), json={"text": "count me"})
        healthz = client.get(f"{server.url}/healthz")
        readyz = client.get(f"{server.url}/readyz")
        metrics = client.get(f"{server.url}/metrics")
        not_found = client.get(f"{server.url}/nope")
        wrong_method = client.delete(messages_url(server.url, "m"))

    assert healthz.json() == {"status": "ok"} and readyz.json() == {"status": "ready"}
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'sessiongate_provider_calls_total{outcome="ok",provider="echo"}' in metrics.text
    assert "sessiongate_lane_wait_seconds" in metrics.text
    assert_problem(not_found, 404, "not-found")
    assert_problem(wrong_method, 405, "method-not-allowed")
    assert "POST" in wrong_method.headers["allow"]


def test_readyz_is_503_when_the_backend_is_unreachable(tmp_path: Path) -> None:
    config = {"backend": {"url": "redis://127.0.0.1:1/0"}}  # nothing listens on port 1
    with serve_gateway(tmp_path / "data", config) as server, httpx.Client(timeout=10) as client:
        readyz = client.get(f"{server.url}/readyz")
        post = client.post(messages_url(server.url, "x"), json={"text": "hi"})
    assert_problem(readyz, 503, "backend-unavailable")
    assert int(readyz.headers["retry-after"]) >= 1
    assert post.status_code == 503 and post.json()["type"].endswith("backend-unavailable")


def test_cors_exposes_the_contention_headers(tmp_path: Path) -> None:
    origin = {"Origin": "http://127.0.0.1:9"}
    config = {"server": {"corsOrigins": ["http://127.0.0.1:9"]}}
    with serve_gateway(tmp_path / "data", config) as server, httpx.Client(timeout=10) as client:
        url = messages_url(server.url, "c")
        preflight = client.options(url, headers={**origin, "Access-Control-Request-Method": "POST",
                                                 "Access-Control-Request-Headers": "idempotency-key, content-type"})
        answer = client.post(url, json={"text": "hi"}, headers=origin)
    assert preflight.status_code == 200
    exposed = {h.strip().lower() for h in answer.headers["access-control-expose-headers"].split(",")}
    assert {"retry-after", "retry-after-ms", "x-should-retry", "ratelimit", "ratelimit-policy",
            "idempotent-replayed"} <= exposed


def test_request_id_is_echoed_or_made(tmp_path: Path) -> None:
    with serve_gateway(tmp_path / "data") as server, httpx.Client(timeout=10) as client:
        given = client.get(f"{server.url}/healthz", headers={"X-Request-Id": "trace-42"})
        made = client.get(f"{server.url}/healthz", headers={"X-Request-Id": "bad id {}"})
    assert given.headers["x-request-id"] == "trace-42"
    assert made.headers["x-request-id"] not in ("", "bad id {}")


def test_openapi_describes_every_route_and_real_answers_match(tmp_path: Path) -> None:
    settings = gateway_settings(tmp_path / "data")
    app = create_app(settings)
    with serve_gateway(tmp_path / "data") as server, httpx.Client(timeout=10) as client:
        document = client.get(f"{server.url}/openapi.json").json()
        url = messages_url(server.url, "doc")
        answers = {
            ("post", "200"): client.post(url, json={"text": "hi"}),
            ("get", "200"): client.get(url),
            ("post", "400"): client.post(url, content=b"{", headers={"Content-Type": "application/json"}),
        }

    assert document["openapi"].startswith("3.1")
    described = set(document["paths"])
    for route in app.routes:
        path = getattr(route, "path_format", None)
        if path and not path.startswith("/static"):
            assert path in described, f"{path} is not in /openapi.json"
    for name in ("session-busy", "queue-full", "rate-limited", "idempotency-in-flight", "idempotency-key-reused",
                 "invalid-request", "invalid-session-id", "payload-too-large", "unauthorized",
                 "all-providers-failed", "backend-unavailable"):
        assert PROBLEM_TYPE_BASE + name in document["components"]["schemas"]["Problem"]["properties"]["type"]["enum"]

    operations = document["paths"]["/v1/sessions/{sessionId}/messages"]
    for (method, status), response in answers.items():
        assert str(response.status_code) == status
        media = operations[method]["responses"][status]["content"]
        (content_type, spec), = media.items()
        assert response.headers["content-type"].startswith(content_type)
        schema = {**spec["schema"], "components": document["components"]}
        jsonschema_rs.Draft202012Validator(schema).validate(json.loads(response.text))


def test_an_unexpected_error_is_a_bare_500_problem_and_frees_the_lane(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with serve_gateway(data) as server, httpx.Client(timeout=10) as client:
        (data / "sessions" / "broken.jsonl").mkdir()  # the transcript cannot be read: an I/O fault, not bad input
        url = messages_url(server.url, "broken")
        answers = [client.post(url, json={"text": "hi"}) for _ in range(2)]
        healthy = client.post(messages_url(server.url, "fine"), json={"text": "hi"})
    for answer in answers:  # the second is not session-busy: the failed turn released its lane
        problem = assert_problem(answer, 500, "internal-error")
        assert "Traceback" not in problem["detail"] and "broken.jsonl" not in problem["detail"]
        assert answer.headers["x-request-id"] in problem["detail"]
    assert healthy.status_code == 200


def test_an_idempotency_key_replays_the_answer_without_calling_the_model_again(tmp_path: Path) -> None:
    with FakeOpenAI("model") as fake:
        with serve_gateway(tmp_path / "data", {"providers": [fake.provider()]}) as server, \
                httpx.Client(timeout=10) as client:
            url = messages_url(server.url, "idem")
            key = {"Idempotency-Key": "msg-1"}
            first = client.post(url, json={"text": "once"}, headers=key)
            repeat = client.post(url, json={"text": "once"}, headers=key)
            other_body = client.post(url, json={"text": "changed"}, headers=key)
            transcript = client.get(url).json()["messages"]
    assert first.status_code == repeat.status_code == 200
    assert repeat.json() == first.json() and repeat.headers["idempotent-replayed"] == "true"
    assert_problem(other_body, 422, "idempotency-key-reused")
    assert fake.calls == 1
    assert [m["text"] for m in transcript] == ["once", "model: once"]
