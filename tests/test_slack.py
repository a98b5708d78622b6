"""Slack Events API webhook, end to end: a real gateway process and a fake Slack Web API on 127.0.0.1.

Each test uses its own channel and event ids, so they can share one gateway.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from sessiongate import Settings, open_backend
from sessiongate.gateway._server import create_app
from sessiongate.gateway.settings import GatewaySettings
from tests.fakes.slack_api import BOT_TOKEN, FakeSlackApi
from tests.support import NO_RATE_LIMITS, GatewayProcess, UvicornThread, metric_delta, scrape_metrics, transcript

SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
BOT_USER = "UBOT"
TEAM = "T0001"
ENV = {"SLACK_SIGNING_SECRET": SIGNING_SECRET, "SLACK_BOT_TOKEN": BOT_TOKEN}
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, slack_api: FakeSlackApi) -> Iterator[GatewayProcess]:
    config = {
        "channels": {"slack": {"apiBase": slack_api.url}},
        "providers": [{"id": "echo", "type": "echo", "delayMs": 1_000}],
        "sessionWriteLock": {"timeoutMs": 300},
        "rateLimits": NO_RATE_LIMITS,
    }
    with GatewayProcess(tmp_path_factory.mktemp("slack") / "data", config, env=ENV) as process:
        yield process


def signed_post(
    url: str, payload: dict[str, Any], *, timestamp: int | None = None, secret: str = SIGNING_SECRET,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST ``payload`` as JSON, signed as Slack does."""
    body = json.dumps(payload).encode()
    signed = {**signature_headers(body, timestamp=timestamp, secret=secret), **(headers or {})}
    return httpx.post(f"{url}/v1/webhooks/slack", content=body, headers=signed, timeout=10)


def signature_headers(body: bytes, *, timestamp: int | None = None, secret: str = SIGNING_SECRET) -> dict[str, str]:
    """Slack's v0 signature: HMAC-SHA256 over ``v0:<timestamp>:<raw body>``, computed here independently."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), f"v0:{stamp}:".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": f"v0={digest}",
            "Content-Type": "application/json"}


def message_event(event_id: str, channel: str, text: str, **event: Any) -> dict[str, Any]:
    return {
        "type": "event_callback",
        "team_id": TEAM,
        "event_id": event_id,
        "event_time": int(time.time()),
        "authorizations": [{"team_id": TEAM, "user_id": BOT_USER, "is_bot": True}],
        "event": {"type": "message", "channel": channel, "user": "UHUMAN", "text": text,
                  "ts": f"{time.time():.6f}", "channel_type": "channel", **event},
    }


def channel_transcript(gateway: GatewayProcess, channel: str) -> list[dict[str, Any]]:
    return transcript(gateway.url, f"slack:{TEAM}:{channel}")


def test_url_verification_is_answered_with_the_challenge(gateway: GatewayProcess) -> None:
    response = signed_post(gateway.url, {"type": "url_verification", "token": "x", "challenge": "c-123"})
    assert response.status_code == 200 and response.json() == {"challenge": "c-123"}


@pytest.mark.parametrize(
    "case", ["bad signature", "wrong secret", "old timestamp", "future timestamp", "no headers"]
)
def test_bad_signature_or_stale_timestamp_is_401(gateway: GatewayProcess, case: str) -> None:
    payload = message_event("Ev-bad", "CBAD", "forged")
    if case == "bad signature":
        response = signed_post(gateway.url, payload, headers={"X-Slack-Signature": "v0=" + "0" * 64})
    elif case == "wrong secret":
        response = signed_post(gateway.url, payload, secret="not-the-secret")
    elif case == "old timestamp":  # correctly signed, but a replay from 6 minutes ago
        response = signed_post(gateway.url, payload, timestamp=int(time.time()) - 360)
    elif case == "future timestamp":
        response = signed_post(gateway.url, payload, timestamp=int(time.time()) + 360)
    else:
        response = httpx.post(f"{gateway.url}/v1/webhooks/slack", json=payload, timeout=10)
    assert response.status_code == 401
    assert response.json()["type"].endswith("unauthorized")
    assert channel_transcript(gateway, "CBAD") == []


@pytest.mark.parametrize(
    "slack", [None, {"signingSecretEnv": "H5_TEST_UNSET_SLACK_SECRET"}], ids=["no-section", "no-signing-secret"]
)
def test_unconfigured_slack_answers_404_channel_not_configured(tmp_path: Path, slack: dict[str, Any] | None) -> None:
    settings = GatewaySettings.model_validate({"dataDir": str(tmp_path), "channels": {"slack": slack}})
    with UvicornThread(create_app(settings)) as server:
        response = signed_post(server.url, {"type": "url_verification", "challenge": "c"})
    assert response.status_code == 404
    assert response.json()["type"].endswith("channel-not-configured")


def test_signed_body_that_is_not_a_json_object_is_400(gateway: GatewayProcess) -> None:
    for body in (b"{", b"[1]", b"[" * 100_000):  # the last: nested too deep for the JSON parser
        response = httpx.post(f"{gateway.url}/v1/webhooks/slack", content=body, headers=signature_headers(body))
        assert response.status_code == 400 and response.json()["type"].endswith("invalid-request")


def test_message_is_answered_with_chat_post_message(gateway: GatewayProcess, slack_api: FakeSlackApi) -> None:
    assert signed_post(gateway.url, message_event("Ev-1", "C1", "hello slack")).status_code == 200
    assert slack_api.wait_for_texts(1, channel="C1") == ["hello slack"]
    call = next(call for call in slack_api.delivered() if call.body["channel"] == "C1")
    assert call.headers["authorization"] == f"Bearer {BOT_TOKEN}" and "thread_ts" not in call.body
    assert [r["role"] for r in channel_transcript(gateway, "C1")] == ["user", "assistant"]


def test_thread_message_gets_its_own_session_and_a_threaded_reply(
    gateway: GatewayProcess, slack_api: FakeSlackApi
) -> None:
    payload = message_event("Ev-thread", "C2", "in a thread", thread_ts="1700000000.000100")
    assert signed_post(gateway.url, payload).status_code == 200
    assert slack_api.wait_for_texts(1, channel="C2") == ["in a thread"]
    call = next(call for call in slack_api.delivered() if call.body["channel"] == "C2")
    assert call.body["thread_ts"] == "1700000000.000100"
    thread = httpx.get(f"{gateway.url}/v1/sessions/slack:{TEAM}:C2:1700000000.000100/messages", timeout=5)
    assert [r["role"] for r in thread.json()["messages"]] == ["user", "assistant"]


def test_retried_event_id_is_processed_once(gateway: GatewayProcess, slack_api: FakeSlackApi) -> None:
    payload = message_event("Ev-retry", "C3", "once please")
    answers = [
        signed_post(gateway.url, payload, headers={"X-Slack-Retry-Num": str(n), "X-Slack-Retry-Reason": "http_timeout"}
                    if n else None)
        for n in range(3)
    ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert slack_api.wait_for_texts(1, channel="C3") == ["once please"]
    assert [r["role"] for r in channel_transcript(gateway, "C3")] == ["user", "assistant"]


def test_app_mention_and_message_for_the_same_message_are_processed_once(
    gateway: GatewayProcess, slack_api: FakeSlackApi
) -> None:
    as_message = message_event("Ev-m", "C4", "<@UBOT> both")
    as_mention = {**as_message, "event_id": "Ev-mention", "event": {**as_message["event"], "type": "app_mention"}}
    assert signed_post(gateway.url, as_message).status_code == 200
    assert signed_post(gateway.url, as_mention).status_code == 200
    assert slack_api.wait_for_texts(1, channel="C4") == ["<@UBOT> both"]


@pytest.mark.parametrize(
    ("channel", "event"),
    [
        ("CIGN1", {"bot_id": "B1", "user": "UOTHERBOT"}),  # any bot's message
        ("CIGN2", {"user": BOT_USER}),  # our own bot user
        ("CIGN3", {"subtype": "bot_message"}),
        ("CIGN4", {"subtype": "message_changed"}),
        ("CIGN5", {"subtype": "channel_join"}),
    ],
    ids=["bot_id", "own-bot-user", "bot_message", "edit", "join"],
)
def test_bot_messages_edits_and_joins_are_ignored(
    gateway: GatewayProcess, slack_api: FakeSlackApi, channel: str, event: dict[str, Any]
) -> None:
    response = signed_post(gateway.url, message_event(f"Ev-{channel}", channel, "x", **event))
    assert response.status_code == 200
    time.sleep(0.3)
    assert channel_transcript(gateway, channel) == [] and slack_api.texts(channel=channel) == []


def test_ack_is_fast_while_a_turn_runs(gateway: GatewayProcess, slack_api: FakeSlackApi) -> None:
    assert signed_post(gateway.url, message_event("Ev-fast-1", "C5", "first")).status_code == 200
    time.sleep(0.2)  # the first turn (1 s of model time) is running now
    started = time.monotonic()
    response = signed_post(gateway.url, message_event("Ev-fast-2", "C5", "second"))
    ack_ms = (time.monotonic() - started) * 1000
    log.warning("slack ack latency while a turn runs: %.1f ms", ack_ms)
    assert response.status_code == 200 and ack_ms < 3_000
    assert slack_api.wait_for_texts(2, channel="C5") == ["first", "second"]


@pytest.mark.anyio
async def test_busy_write_lock_still_acks_fast_and_the_spooled_message_is_processed(
    gateway: GatewayProcess, slack_api: FakeSlackApi
) -> None:
    _, before = scrape_metrics(gateway.url)
    backend = open_backend(Settings(data_dir=gateway.data_dir))
    try:
        async with backend.write_lock(f"slack:{TEAM}:C6"):  # another writer holds the transcript
            started = time.monotonic()
            response = await anyio.to_thread.run_sync(signed_post, gateway.url, message_event("Ev-spool", "C6", "spooled"))
            ack_ms = (time.monotonic() - started) * 1000
            await anyio.sleep(0.5)
    finally:
        await backend.aclose()
    log.warning("slack ack latency with the write lock busy: %.1f ms", ack_ms)
    assert response.status_code == 200 and ack_ms < 3_000
    assert await anyio.to_thread.run_sync(lambda: slack_api.wait_for_texts(1, channel="C6")) == ["spooled"]
    assert [r["role"] for r in channel_transcript(gateway, "C6")] == ["user", "assistant"]
    _, after = scrape_metrics(gateway.url)
    assert metric_delta(before, after, "sessiongate_channel_messages_total", channel="slack", outcome="spooled") == 1


@pytest.mark.anyio
async def test_spooled_event_survives_kill_9_and_is_processed_once_after_restart(
    tmp_path: Path, slack_api: FakeSlackApi
) -> None:
    config = {"channels": {"slack": {"apiBase": slack_api.url}}, "sessionWriteLock": {"timeoutMs": 200}}
    first = GatewayProcess(tmp_path / "data", config, env=ENV).start()
    backend = open_backend(Settings(data_dir=tmp_path / "data"))
    try:
        async with backend.write_lock(f"slack:{TEAM}:C8"):  # the ack can only spool the event
            acked = await anyio.to_thread.run_sync(signed_post, first.url, message_event("Ev-crash", "C8", "kept"))
            first.signal(signal.SIGKILL)
            assert first.process is not None and first.process.wait(timeout=10) == -signal.SIGKILL
    finally:
        await backend.aclose()
        first.stop()
    assert acked.status_code == 200 and slack_api.texts(channel="C8") == []
    with GatewayProcess(tmp_path / "data", config, env=ENV) as second:
        assert await anyio.to_thread.run_sync(lambda: slack_api.wait_for_texts(1, channel="C8")) == ["kept"]
        assert [r["role"] for r in channel_transcript(second, "C8")] == ["user", "assistant"]


def test_slack_429_is_honoured(gateway: GatewayProcess, slack_api: FakeSlackApi) -> None:
    slack_api.throttle_next(1, retry_after_s=1)
    assert signed_post(gateway.url, message_event("Ev-429", "C7", "patient")).status_code == 200
    assert slack_api.wait_for_texts(1, channel="C7") == ["patient"]
    calls = [call for call in slack_api.calls if call.body.get("channel") == "C7"]
    assert [call.throttled for call in calls] == [True, False]
    assert calls[1].at - calls[0].at >= 1.0
