"""The Python client and ``sessiongate send`` against a real gateway process that is busy.

A turn of the echo provider takes ``TURN_MS``; while it runs, the session's
lane is held (seen from here through the real file storage, as ``locks list``
sees it), so a second message gets ``session-busy`` with Retry-After. The
client must wait as told and get served, never retry what is not retryable,
stop within its budget, and keep one Idempotency-Key per logical message.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from sessiongate import Settings
from sessiongate.gateway.client import (
    AsyncSessionGateClient,
    GaveUp,
    ProblemError,
    RetryNotice,
    RetryPolicy,
    SessionGateClient,
    retry_after_ms,
)
from sessiongate.storage import LeaseKind, open_storage
from tests.support import GatewayProcess, free_port, run_cli, wait_until

TURN_MS = 1500
TOKEN = "client-test-token"


class CountingTransport(httpx.HTTPTransport):
    """A real HTTP transport that counts the requests it sends."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return super().handle_request(request)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = {
        "providers": [{"id": "echo", "type": "echo", "delayMs": TURN_MS}],
        "rateLimits": {"perSession": "1000/minute", "perSender": "1000/minute"},
        "auth": {"tokens": [TOKEN]},
    }
    with GatewayProcess(tmp_path_factory.mktemp("client") / "data", config) as process:
        yield process


def client(gateway: GatewayProcess, **options) -> SessionGateClient:
    return SessionGateClient(gateway.url, TOKEN, **options)


def lane_held(gateway: GatewayProcess, session_id: str) -> bool:
    """Whether the gateway holds the session's lane, read from the real lock storage."""

    async def probe() -> bool:
        storage = open_storage(Settings(data_dir=gateway.data_dir))
        try:
            return await storage.holder(LeaseKind.LANE, session_id) is not None
        finally:
            await storage.aclose()

    return asyncio.run(probe())


def start_long_turn(gateway: GatewayProcess, session_id: str) -> threading.Thread:
    """Post one message in the background and return once its turn holds the lane."""
    outcome: dict[str, object] = {}

    def post() -> None:
        with client(gateway, policy=RetryPolicy(max_attempts=1)) as c:
            outcome["answer"] = c.send(session_id, "the long turn")

    thread = threading.Thread(target=post, daemon=True)
    thread.outcome = outcome  # type: ignore[attr-defined]
    thread.start()
    wait_until(lambda: lane_held(gateway, session_id), timeout=5, what="the long turn holds the lane")
    return thread


def user_texts(gateway: GatewayProcess, session_id: str) -> list[str]:
    with client(gateway) as c:
        return [m["text"] for m in c.messages(session_id) if m["role"] == "user"]


def test_busy_session_client_waits_per_retry_after_and_gets_served(gateway: GatewayProcess) -> None:
    notices: list[RetryNotice] = []
    long_turn = start_long_turn(gateway, "busy-1")
    with client(gateway, on_retry=notices.append) as c:
        answer = c.send("busy-1", "second message")
    long_turn.join(timeout=10)

    assert "second message" in answer["reply"]["text"]
    assert long_turn.outcome["answer"]["reply"]["text"]  # the long turn was not disturbed
    assert notices, "the client was never told the session is busy"
    first = notices[0].error
    assert isinstance(first, ProblemError) and first.type == "session-busy" and first.status == 409
    assert first.retry_after_ms and first.retry_after_ms > 0
    assert all(n.wait_s >= n.error.retry_after_ms / 1000 for n in notices), "waited less than the server asked"
    assert user_texts(gateway, "busy-1") == ["the long turn", "second message"]


def test_never_retries_400_401_422(gateway: GatewayProcess) -> None:
    transport = CountingTransport()
    with client(gateway, transport=transport) as c:
        with pytest.raises(ProblemError) as bad_id:
            c.send("not a valid id!", "hello")
        assert (bad_id.value.status, bad_id.value.type) == (400, "invalid-session-id")
        assert transport.requests == 1

        c.send("reuse-1", "first body", idempotency_key="key-reuse-1")
        before = transport.requests
        with pytest.raises(ProblemError) as reused:
            c.send("reuse-1", "a different body", idempotency_key="key-reuse-1")
        assert (reused.value.status, reused.value.type) == (422, "idempotency-key-reused")
        assert transport.requests == before + 1

    wrong_token = CountingTransport()
    with SessionGateClient(gateway.url, "wrong", transport=wrong_token) as c:
        with pytest.raises(ProblemError) as unauthorized:
            c.send("auth-1", "hello")
    assert (unauthorized.value.status, unauthorized.value.type) == (401, "unauthorized")
    assert wrong_token.requests == 1


def test_gives_up_within_its_time_budget(gateway: GatewayProcess) -> None:
    long_turn = start_long_turn(gateway, "budget-1")
    budget_s = 0.6
    started = time.monotonic()
    with client(gateway, policy=RetryPolicy(total_s=budget_s)) as c:
        with pytest.raises(GaveUp) as gave_up:
            c.send("budget-1", "too impatient")
    elapsed = time.monotonic() - started
    long_turn.join(timeout=10)

    assert isinstance(gave_up.value.last, ProblemError) and gave_up.value.last.type == "session-busy"
    assert elapsed < budget_s + 0.5, f"spent {elapsed:.2f} s on a {budget_s} s budget"
    assert user_texts(gateway, "budget-1") == ["the long turn"]


def test_gives_up_on_an_unreachable_gateway() -> None:
    policy = RetryPolicy(max_attempts=3, total_s=5)
    with SessionGateClient(f"http://127.0.0.1:{free_port()}", policy=policy) as c:
        with pytest.raises(GaveUp) as gave_up:
            c.send("nobody-home", "hello")
    assert gave_up.value.attempts == 3
    assert isinstance(gave_up.value.last, httpx.ConnectError)


def test_idempotency_key_is_reused_when_the_reply_is_lost(gateway: GatewayProcess) -> None:
    """The first attempt times out mid-turn; retries carry the same key, so the turn runs once."""
    notices: list[RetryNotice] = []
    with client(gateway, timeout_s=TURN_MS / 1000 / 3, on_retry=notices.append,
                policy=RetryPolicy(total_s=15, max_attempts=30)) as c:
        answer = c.send("lost-reply-1", "only once please")
    kinds = {type(n.error).__name__ if not isinstance(n.error, ProblemError) else n.error.type for n in notices}
    assert "ReadTimeout" in kinds, kinds
    assert "only once please" in answer["reply"]["text"]
    with client(gateway) as c:
        transcript = c.messages("lost-reply-1")
    assert [m["text"] for m in transcript if m["role"] == "user"] == ["only once please"]
    assert len([m for m in transcript if m["role"] == "assistant"]) == 1


@pytest.mark.anyio
async def test_async_client_waits_and_gets_served(gateway: GatewayProcess) -> None:
    notices: list[RetryNotice] = []
    long_turn = await asyncio.to_thread(start_long_turn, gateway, "async-1")
    async with AsyncSessionGateClient(gateway.url, TOKEN, on_retry=notices.append) as c:
        answer = await c.send("async-1", "async message")
        transcript = await c.messages("async-1")
    await asyncio.to_thread(long_turn.join, 10)
    assert "async message" in answer["reply"]["text"]
    assert notices and notices[0].error.type == "session-busy"
    assert [m["text"] for m in transcript if m["role"] == "user"] == ["the long turn", "async message"]


@pytest.mark.parametrize(
    ("headers", "problem", "expected_ms"),
    [
        ({"Retry-After": "3"}, {"retryAfterMs": 1250}, 1250),  # the body's finer estimate wins
        ({"Retry-After": "3"}, {}, 3000),
        ({"Retry-After": "soon"}, {}, None),
        ({}, {}, None),
    ],
)
def test_server_hint_is_read_from_body_then_header(headers: dict, problem: dict, expected_ms) -> None:
    response = httpx.Response(429, headers=headers, json=problem)
    assert retry_after_ms(response, problem) == expected_ms


def test_server_hint_may_be_an_http_date() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert retry_after_ms(httpx.Response(503, headers={"Retry-After": when}), {}) == pytest.approx(30_000, abs=1500)


def test_waits_follow_the_hint_with_jitter_and_back_off_without_one() -> None:
    """Through httpx's transport seam: a 503 with a hint, then connection errors, then the answer."""
    answers = iter([
        httpx.Response(503, json={"type": "https://x/backend-unavailable", "status": 503, "retryAfterMs": 200}),
        httpx.ConnectError("refused"),
        httpx.ConnectError("refused"),
        httpx.Response(200, json={"reply": {"text": "finally"}}),
    ])
    keys: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["Idempotency-Key"])
        outcome = next(answers)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    notices: list[RetryNotice] = []
    policy = RetryPolicy(backoff_base_s=0.01, backoff_max_s=0.05)
    with SessionGateClient("http://gateway.invalid", transport=httpx.MockTransport(answer), policy=policy,
                           on_retry=notices.append) as c:
        assert c.send("s", "hi")["reply"]["text"] == "finally"
    assert len(set(keys)) == 1 and len(keys) == 4
    assert 0.2 <= notices[0].wait_s <= 0.3  # the hint plus at most 50 % jitter
    assert all(0 <= n.wait_s <= 0.05 for n in notices[1:])  # full jitter under the cap


def send_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("send", *args)


def test_send_command_prints_the_reply_and_uses_exit_codes(gateway: GatewayProcess) -> None:
    ok = send_cli("cli-1", "hello from the shell", "--url", gateway.url, "--token", TOKEN)
    assert ok.returncode == 0, ok.stderr
    assert "hello from the shell" in ok.stdout

    bad = send_cli("bad id", "hello", "--url", gateway.url, "--token", TOKEN)
    assert bad.returncode == 2 and "invalid" in bad.stderr.lower()

    gone = send_cli("cli-1", "hello", "--url", f"http://127.0.0.1:{free_port()}", "--budget", "0.5")
    assert gone.returncode == 3 and "gave up" in gone.stderr
