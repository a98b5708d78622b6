"""``POST /v1/chat/completions`` on the wire: the same gate as the messages API, errors in OpenAI's shape.

A real uvicorn serving ``create_app``, driven by httpx. Proves: rate limits,
Idempotency-Key and the lane apply to this route as to the messages API (a
repeat is replayed and the model called once; a spent quota is a 429 with
every retry header); the body limit and router errors answer in OpenAI's
shape with the same statuses and headers; answers match /openapi.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema_rs

from tests.fakes import serve_gateway
from tests.fakes.openai_server import FakeOpenAI

CHAT = "/v1/chat/completions"


def chat_body(text: str, **fields: object) -> dict:
    return {"model": "model", "messages": [{"role": "user", "content": text}], **fields}


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    return error


def test_an_idempotency_key_replays_the_completion_without_calling_the_model_again(tmp_path: Path) -> None:
    with FakeOpenAI("model") as fake:
        with serve_gateway(tmp_path / "data", {"providers": [fake.provider()]}) as server, \
                httpx.Client(base_url=server.url, timeout=10) as client:
            key = {"Idempotency-Key": "chat-1", "X-Session-Id": "idem"}
            first = client.post(CHAT, json=chat_body("once"), headers=key)
            repeat = client.post(CHAT, json=chat_body("once"), headers=key)
            other_body = client.post(CHAT, json=chat_body("changed"), headers=key)
            stored = client.get("/v1/sessions/idem/messages").json()["messages"]
    assert first.status_code == repeat.status_code == 200
    assert repeat.json() == first.json() and repeat.headers["idempotent-replayed"] == "true"
    assert_openai_error(other_body, 422, "idempotency-key-reused")
    assert fake.calls == 1
    assert [m["text"] for m in stored] == ["once", "model: once"]


def test_a_spent_rate_limit_is_a_429_in_openais_shape_with_every_retry_header(tmp_path: Path) -> None:
    config = {"rateLimits": {"perSession": "1/minute", "perSender": None}}
    with serve_gateway(tmp_path / "data", config) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        ok = client.post(CHAT, json=chat_body("one", user="limited"))
        limited = client.post(CHAT, json=chat_body("two", user="limited"))
    assert ok.status_code == 200
    error = assert_openai_error(limited, 429, "rate-limited")
    assert error["type"] == "rate_limit_error"
    headers = limited.headers
    assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) >= 1
    assert headers["x-should-retry"] == "true" and headers["ratelimit-policy"].startswith('"perSession"')


def test_body_limit_and_router_errors_answer_in_openais_shape(tmp_path: Path) -> None:
    config = {"server": {"maxBodyBytes": 200}}
    with serve_gateway(tmp_path / "data", config) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        too_large = client.post(CHAT, json=chat_body("x" * 500, user="big"))
        wrong_method = client.get(CHAT)
        json_type = {"Content-Type": "application/json"}
        not_json = client.post(CHAT, content=b"{", headers={"X-Session-Id": "s", **json_type})
        messages_route = client.post("/v1/sessions/s/messages", content=b"{", headers=json_type)
        plain_text = client.post(CHAT, content=b"{}", headers={"X-Session-Id": "s", "Content-Type": "text/plain"})
    assert_openai_error(too_large, 413, "payload-too-large")
    assert_openai_error(wrong_method, 405, "method-not-allowed")
    assert "POST" in wrong_method.headers["allow"]
    assert_openai_error(not_json, 400, "invalid-request")
    assert not_json.headers["x-should-retry"] == "false"
    assert_openai_error(plain_text, 415, "unsupported-media-type")  # a browser's simple request runs no turn
    assert messages_route.headers["content-type"] == "application/problem+json"  # the choice is per route


def test_answers_match_the_openapi_document(tmp_path: Path) -> None:
    with serve_gateway(tmp_path / "data") as server, httpx.Client(base_url=server.url, timeout=10) as client:
        document = client.get("/openapi.json").json()
        answers = {
            (CHAT, "post", "200"): client.post(CHAT, json=chat_body("hi", user="doc")),
            (CHAT, "post", "400"): client.post(CHAT, json={"messages": []}),
            ("/v1/models", "get", "200"): client.get("/v1/models"),
        }
    for (path, method, status), response in answers.items():
        assert str(response.status_code) == status
        media = document["paths"][path][method]["responses"][status]["content"]
        spec = media["application/json"]
        assert response.headers["content-type"].startswith("application/json")
        schema = {**spec["schema"], "components": document["components"]}
        jsonschema_rs.Draft202012Validator(schema).validate(json.loads(response.text))
