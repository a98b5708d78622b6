"""problem+json (RFC 9457) rendering: every contract error type, both output paths identical."""

from __future__ import annotations

import json

import pytest

from sessiongate import Settings
from sessiongate._errors import (
    BackendUnavailable,
    IdempotencyInFlight,
    IdempotencyKeyReused,
    InvalidRequest,
    InvalidSessionId,
    LockTimeout,
    PayloadTooLarge,
    QueueFull,
    RateLimited,
    SessionBusy,
    SessionGateError,
    Unauthorized,
)
from sessiongate._problem import (
    problem_body,
    problem_json,
    problem_response,
    problem_status,
    public_detail,
    render_problem,
    retry_after_seconds,
    send_problem,
)

RATE_LIMITED = RateLimited(
    "perSession quota spent", retry_after_ms=12_345, limit=30, remaining=0, window_s=60, policy="perSession",
    session_id="s1",
)

CASES: list[tuple[SessionGateError, str, int, bool]] = [
    (SessionBusy("busy", retry_after_ms=1500, session_id="s1"), "session-busy", 409, True),
    (LockTimeout("s1", waited_ms=20, retry_after_ms=250), "session-busy", 409, True),
    (QueueFull("s1", queue_cap=2, retry_after_ms=3000), "queue-full", 429, True),
    (RATE_LIMITED, "rate-limited", 429, True),
    (IdempotencyInFlight("running", retry_after_ms=1000, session_id="s1"), "idempotency-in-flight", 409, True),
    (IdempotencyKeyReused("other body", session_id="s1"), "idempotency-key-reused", 422, False),
    (InvalidRequest("bad json"), "invalid-request", 400, False),
    (InvalidSessionId("a b"), "invalid-session-id", 400, False),
    (PayloadTooLarge("too big"), "payload-too-large", 413, False),
    (Unauthorized("no token"), "unauthorized", 401, False),
    (BackendUnavailable("redis down"), "backend-unavailable", 503, True),
]


@pytest.mark.parametrize(("error", "name", "status", "retryable"), CASES, ids=[c[1] + str(i) for i, c in enumerate(CASES)])
def test_every_contract_error_renders_as_problem_json(
    error: SessionGateError, name: str, status: int, retryable: bool
) -> None:
    problem = render_problem(error)
    body = json.loads(problem.body)
    headers = dict(problem.headers)

    assert problem.status == status == body["status"]
    assert body["type"].endswith("/" + name)
    assert body["title"] == error.title
    assert body["detail"] == (error.detail if status < 500 else public_detail(error, status))
    assert headers["Content-Type"] == "application/problem+json"
    assert ("sessionId" in body) == (error.session_id is not None)
    if retryable:
        assert body["retryAfterMs"] == error.retry_after_ms
        assert int(headers["Retry-After"]) >= 1
        assert headers["retry-after-ms"] == str(error.retry_after_ms)  # the OpenAI and Anthropic SDKs read it first
        assert headers["x-should-retry"] == "true"
        assert headers["Cache-Control"] == "no-store"
    else:
        assert "retryAfterMs" not in body and "Retry-After" not in headers and "Cache-Control" not in headers
        assert "retry-after-ms" not in headers
        assert headers["x-should-retry"] == "false"  # an SDK must not resend it (they retry 409 and 5xx by default)


@pytest.mark.parametrize(("ms", "seconds"), [(1, 1), (999, 1), (1000, 1), (1001, 2), (12_345, 13)])
def test_retry_after_is_whole_seconds_rounded_up_at_least_one(ms: int, seconds: int) -> None:
    assert retry_after_seconds(ms) == seconds


def test_invalid_session_id_is_never_echoed_as_a_session_id() -> None:
    body = json.loads(render_problem(InvalidSessionId("../etc")).body)
    assert "sessionId" not in body


def test_rate_limited_carries_ratelimit_fields_of_the_ietf_draft() -> None:
    problem = render_problem(RATE_LIMITED)
    headers = dict(problem.headers)
    body = json.loads(problem.body)

    assert headers["RateLimit-Policy"] == '"perSession";q=30;w=60'
    assert headers["RateLimit"] == '"perSession";r=0;t=13'
    assert headers["Retry-After"] == "13"
    assert body | {"policy": "perSession", "limit": 30, "remaining": 0, "windowSeconds": 60} == body


def test_contention_status_applies_to_session_busy_only() -> None:
    settings = Settings(contention={"status": 429})
    assert problem_status(SessionBusy("busy", retry_after_ms=5), settings) == 429
    assert problem_status(LockTimeout("s", waited_ms=1, retry_after_ms=5), settings) == 429
    assert problem_status(QueueFull("s", queue_cap=1, retry_after_ms=5), settings) == 429
    assert problem_status(IdempotencyInFlight("x", retry_after_ms=5), settings) == 409
    assert problem_status(SessionBusy("busy", retry_after_ms=5), Settings()) == 409
    body = json.loads(render_problem(SessionBusy("busy", retry_after_ms=5), 429).body)
    assert body["status"] == 429


@pytest.mark.anyio
async def test_starlette_response_and_raw_asgi_send_the_same_answer() -> None:
    error = QueueFull("s1", queue_cap=2, retry_after_ms=2500)
    raw: list[dict] = []
    via_starlette: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def record(into: list[dict]):
        async def send(message: dict) -> None:
            into.append(message)

        return send

    await send_problem(await record(raw), error)
    await problem_response(error)({"type": "http", "method": "GET", "headers": []}, receive, await record(via_starlette))

    assert [m["type"] for m in raw] == [m["type"] for m in via_starlette]
    assert raw[0]["status"] == via_starlette[0]["status"] == 429
    assert sorted(raw[0]["headers"]) == sorted(via_starlette[0]["headers"])
    assert raw[1]["body"] == via_starlette[1]["body"]


@pytest.mark.parametrize(("error", "name", "status", "retryable"), CASES)
def test_the_fast_body_encoding_is_exactly_json_dumps(
    error: SessionGateError, name: str, status: int, retryable: bool
) -> None:
    """The cached-head encoder of the busy path writes byte for byte what json.dumps writes."""
    for answer_status in (status, 503):
        body = problem_body(error, answer_status)
        assert problem_json(error, answer_status) == json.dumps(body, separators=(",", ":")).encode()
    tricky = SessionBusy('quote " backslash \\ tab \t unicode é ☃', retry_after_ms=7, session_id="a:b@c")
    assert problem_json(tricky, 409) == json.dumps(problem_body(tricky, 409), separators=(",", ":")).encode()
