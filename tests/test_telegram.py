"""Telegram webhook, end to end: a real gateway process, a fake Bot API on 127.0.0.1, kill -9 and restart.

Each test uses its own chat id and update ids, so they can share one gateway.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from sessiongate import FileTranscriptStore, Settings, open_backend
from sessiongate.gateway._server import create_app
from sessiongate.gateway.channels.telegram import MAX_MESSAGE_CHARS
from sessiongate.gateway.settings import GatewaySettings
from tests.fakes.telegram_api import BOT_TOKEN, SECRET, SECRET_HEADER, FakeTelegramApi, update
from tests.support import (
    NO_RATE_LIMITS,
    GatewayProcess,
    UvicornThread,
    metric_delta,
    scrape_metrics,
    transcript,
    wait_until,
)

ENV = {"TELEGRAM_BOT_TOKEN": BOT_TOKEN}


def gateway_config(api_base: str, *, delay_ms: int) -> dict[str, Any]:
    return {
        "channels": {"telegram": {"secretToken": SECRET, "apiBase": api_base}},
        "providers": [{"id": "echo", "type": "echo", "delayMs": delay_ms}],
        "sessionWriteLock": {"timeoutMs": 300},
        "rateLimits": NO_RATE_LIMITS,
    }


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, telegram_api: FakeTelegramApi) -> Iterator[GatewayProcess]:
    data_dir = tmp_path_factory.mktemp("telegram") / "data"
    with GatewayProcess(data_dir, gateway_config(telegram_api.url, delay_ms=800), env=ENV) as process:
        yield process


def post_update(url: str, body: dict[str, Any], *, secret: str | None = SECRET) -> httpx.Response:
    headers = {SECRET_HEADER: secret} if secret is not None else {}
    return httpx.post(f"{url}/v1/webhooks/telegram", json=body, headers=headers, timeout=10)


def chat_transcript(gateway: GatewayProcess, chat_id: int) -> list[dict[str, Any]]:
    return transcript(gateway.url, f"telegram:{chat_id}")


def test_missing_or_wrong_secret_is_401_and_nothing_is_stored(gateway: GatewayProcess) -> None:
    for secret in (None, "wrong", SECRET + "x"):
        response = post_update(gateway.url, update(1, 11, "hello"), secret=secret)
        assert response.status_code == 401
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["type"].endswith("unauthorized")
    assert chat_transcript(gateway, 11) == []


@pytest.mark.parametrize("telegram", [None, {"apiBase": "http://127.0.0.1:9"}], ids=["no-section", "no-secret"])
def test_unconfigured_telegram_answers_404_channel_not_configured(
    tmp_path: Path, telegram: dict[str, Any] | None
) -> None:
    settings = GatewaySettings.model_validate({"dataDir": str(tmp_path), "channels": {"telegram": telegram}})
    with UvicornThread(create_app(settings)) as server:
        response = post_update(server.url, update(1, 10, "anyone there?"))
    assert response.status_code == 404
    assert response.json()["type"].endswith("channel-not-configured")


def test_a_body_that_is_not_a_json_object_is_400_not_a_retried_500(gateway: GatewayProcess) -> None:
    for body in (b"{", b"[1]", b"[" * 100_000):  # the last: nested too deep for the JSON parser
        response = httpx.post(f"{gateway.url}/v1/webhooks/telegram", content=body, headers={SECRET_HEADER: SECRET})
        assert response.status_code == 400 and response.json()["type"].endswith("invalid-request")


def test_update_without_text_is_acknowledged_and_ignored(gateway: GatewayProcess) -> None:
    sticker = {"update_id": 20, "message": {"message_id": 1, "chat": {"id": 12}, "sticker": {"file_id": "x"}}}
    assert post_update(gateway.url, sticker).status_code == 200
    for malformed in ({"message": {"text": "no update id"}}, {"update_id": 21, "message": {"chat": "x", "text": "hi"}}):
        bad = post_update(gateway.url, malformed)
        assert bad.status_code == 400 and bad.json()["type"].endswith("invalid-request")
    not_json = httpx.post(f"{gateway.url}/v1/webhooks/telegram", content=b"{", headers={SECRET_HEADER: SECRET})
    assert not_json.status_code == 400 and not_json.json()["type"].endswith("invalid-request")
    assert chat_transcript(gateway, 12) == []


def test_same_update_three_times_is_stored_and_answered_once(
    gateway: GatewayProcess, telegram_api: FakeTelegramApi
) -> None:
    answers = [post_update(gateway.url, update(100, 13, "only once")) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json()["accepted"] for a in answers] == ["new", "duplicate", "duplicate"]
    assert telegram_api.wait_for_texts(1, chat_id=13) == ["only once"]
    records = chat_transcript(gateway, 13)
    assert [(r["role"], r["text"]) for r in records] == [("user", "only once"), ("assistant", "only once")]
    assert records[0]["externalId"] == "telegram:100" and records[1]["replyTo"] == records[0]["id"]


@pytest.mark.anyio
async def test_concurrent_copies_of_one_update_store_it_once(
    gateway: GatewayProcess, telegram_api: FakeTelegramApi
) -> None:
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        async def post() -> None:
            response = await client.post(
                "/v1/webhooks/telegram", json=update(150, 14, "racing copies"), headers={SECRET_HEADER: SECRET}
            )
            statuses.append(response.status_code)

        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(post)
    assert 200 in statuses and set(statuses) <= {200, 429}  # a copy racing the first may be told to retry
    assert await anyio.to_thread.run_sync(lambda: telegram_api.wait_for_texts(1, chat_id=14)) == ["racing copies"]
    assert [r["role"] for r in chat_transcript(gateway, 14)] == ["user", "assistant"]


@pytest.mark.anyio
async def test_updates_arriving_during_a_turn_wait_and_run_in_update_id_order(
    gateway: GatewayProcess, telegram_api: FakeTelegramApi
) -> None:
    chat_id = 15
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        async def post(update_id: int) -> None:
            response = await client.post(
                "/v1/webhooks/telegram", json=update(update_id, chat_id, f"m{update_id}"),
                headers={SECRET_HEADER: SECRET},
            )
            assert response.status_code == 200

        await post(200)  # its turn (800 ms of model time) is running while the next five arrive
        async with anyio.create_task_group() as group:
            for update_id in (204, 201, 205, 203, 202):
                group.start_soon(post, update_id)
    expected = [f"m{n}" for n in range(200, 206)]
    assert await anyio.to_thread.run_sync(lambda: telegram_api.wait_for_texts(6, chat_id=chat_id)) == expected
    records = chat_transcript(gateway, chat_id)
    replies = [r for r in records if r["role"] == "assistant"]
    assert [r["text"] for r in replies] == expected
    assert len({r["replyTo"] for r in replies}) == 6


def test_telegram_429_from_send_message_is_honoured(gateway: GatewayProcess, telegram_api: FakeTelegramApi) -> None:
    telegram_api.throttle_next(1, retry_after_s=1)
    assert post_update(gateway.url, update(300, 16, "after a pause")).status_code == 200
    assert telegram_api.wait_for_texts(1, chat_id=16) == ["after a pause"]
    calls = [call for call in telegram_api.calls if call.body.get("chat_id") == 16]
    assert [call.throttled for call in calls] == [True, False]
    assert calls[1].at - calls[0].at >= 1.0  # the retry came after Telegram's retry_after
    assert calls[1].path == f"/bot{BOT_TOKEN}/sendMessage"


def test_a_long_reply_throttled_between_its_parts_sends_each_part_once(
    gateway: GatewayProcess, telegram_api: FakeTelegramApi
) -> None:
    first, second = "a" * MAX_MESSAGE_CHARS, "the rest"
    telegram_api.throttle_next(1, retry_after_s=1, after=1)  # the first part goes out, the second gets a 429
    assert post_update(gateway.url, update(310, 30, first + second)).status_code == 200
    texts = telegram_api.wait_for_texts(2, chat_id=30)
    assert [len(text) for text in texts] == [len(first), len(second)]
    assert "".join(texts) == first + second
    calls = [call for call in telegram_api.calls if call.body.get("chat_id") == 30]
    assert [call.throttled for call in calls] == [False, True, False]


@pytest.mark.anyio
async def test_busy_write_lock_answers_429_with_integer_retry_after_and_the_retry_is_processed(
    gateway: GatewayProcess, telegram_api: FakeTelegramApi
) -> None:
    settings = Settings(data_dir=gateway.data_dir)
    backend = open_backend(settings)
    try:
        async with backend.write_lock("telegram:17"):  # another writer holds the transcript
            busy = await anyio.to_thread.run_sync(post_update, gateway.url, update(400, 17, "retried"))
    finally:
        await backend.aclose()
    assert busy.status_code == 429
    assert busy.headers["Retry-After"].isdigit() and int(busy.headers["Retry-After"]) >= 1
    assert busy.json()["type"].endswith("session-busy")
    retried = await anyio.to_thread.run_sync(post_update, gateway.url, update(400, 17, "retried"))
    assert retried.status_code == 200 and retried.json()["accepted"] == "new"
    assert await anyio.to_thread.run_sync(lambda: telegram_api.wait_for_texts(1, chat_id=17)) == ["retried"]


def test_kill_9_after_the_ack_loses_nothing_and_the_reply_goes_out_once(
    tmp_path: Path, telegram_api: FakeTelegramApi
) -> None:
    chat_id = 18
    config = gateway_config(telegram_api.url, delay_ms=2_000)
    first = GatewayProcess(tmp_path / "data", config, env=ENV).start()
    try:
        assert post_update(first.url, update(500, chat_id, "survives")).status_code == 200
        first.signal(signal.SIGKILL)  # mid-turn: the model call takes 2 s
        assert first.process is not None and first.process.wait(timeout=10) == -signal.SIGKILL
    finally:
        first.stop()
    assert telegram_api.texts(chat_id=chat_id) == []
    with GatewayProcess(tmp_path / "data", config, env=ENV) as second:
        assert telegram_api.wait_for_texts(1, chat_id=chat_id) == ["survives"]
        again = post_update(second.url, update(500, chat_id, "survives"))  # Telegram's retry after the crash
        assert again.status_code == 200 and again.json()["accepted"] == "duplicate"
        assert telegram_api.wait_for_texts(1, chat_id=chat_id) == ["survives"]
        assert [r["role"] for r in chat_transcript(second, chat_id)] == ["user", "assistant"]


@pytest.mark.anyio
async def test_crash_after_append_before_dedupe_record_neither_loses_nor_doubles(
    tmp_path: Path, telegram_api: FakeTelegramApi
) -> None:
    """The state a crash between the durable append and the dedupe record leaves: the retry is a duplicate."""
    chat_id = 19
    settings = Settings(data_dir=tmp_path / "data")
    backend = open_backend(settings)
    try:
        await FileTranscriptStore(backend, settings).append(
            f"telegram:{chat_id}",
            [{"role": "user", "text": "half done", "channel": "telegram", "externalId": "telegram:600",
              "updateId": 600}],
        )
    finally:
        await backend.aclose()
    with GatewayProcess(tmp_path / "data", gateway_config(telegram_api.url, delay_ms=0), env=ENV) as gateway:
        retry = await anyio.to_thread.run_sync(post_update, gateway.url, update(600, chat_id, "half done"))
        assert retry.status_code == 200 and retry.json()["accepted"] == "duplicate"
        assert await anyio.to_thread.run_sync(lambda: telegram_api.wait_for_texts(1, chat_id=chat_id)) == ["half done"]
        assert [r["role"] for r in chat_transcript(gateway, chat_id)] == ["user", "assistant"]


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["file", pytest.param("redis", marks=pytest.mark.redis)])
async def test_two_gateway_processes_sharing_the_sessions_process_each_update_once(
    tmp_path: Path, telegram_api: FakeTelegramApi, backend: str, request: pytest.FixtureRequest
) -> None:
    chat_id = 20 if backend == "file" else 21
    config = gateway_config(telegram_api.url, delay_ms=200)
    if backend == "redis":
        config["backend"] = {"url": request.getfixturevalue("redis_url")}
    update_ids = range(700, 710)
    with GatewayProcess(tmp_path / "data", config, env=ENV) as one, GatewayProcess(tmp_path / "data", config, env=ENV) as two:
        async with httpx.AsyncClient(timeout=10) as client:
            async def post(update_id: int) -> None:
                """Deliver like Telegram: until a 2xx, waiting out each 429's Retry-After."""
                gateway = (one, two)[update_id % 2]  # both processes' workers see this chat's messages
                for _ in range(10):
                    response = await client.post(
                        f"{gateway.url}/v1/webhooks/telegram", json=update(update_id, chat_id, f"m{update_id}"),
                        headers={SECRET_HEADER: SECRET},
                    )
                    if response.status_code != 429:
                        break
                    await anyio.sleep(int(response.headers["Retry-After"]))
                assert response.status_code == 200

            async with anyio.create_task_group() as group:
                for update_id in update_ids:
                    group.start_soon(post, update_id)
        texts = await anyio.to_thread.run_sync(lambda: telegram_api.wait_for_texts(len(update_ids), chat_id=chat_id))
        records = chat_transcript(one, chat_id)
    assert sorted(texts) == sorted(f"m{n}" for n in update_ids)  # each once, none twice
    assert sorted(r["text"] for r in records if r["role"] == "assistant") == sorted(texts)


def test_a_missing_bot_token_fails_delivery_for_good_but_keeps_the_turn(
    tmp_path: Path, telegram_api: FakeTelegramApi
) -> None:
    config = gateway_config(telegram_api.url, delay_ms=0)
    config["channels"]["telegram"]["botTokenEnv"] = "SESSIONGATE_TEST_UNSET_BOT_TOKEN"
    chat_id = 22
    with GatewayProcess(tmp_path / "data", config) as gateway:
        assert post_update(gateway.url, update(800, chat_id, "anyone?")).status_code == 200
        wait_until(lambda: len(chat_transcript(gateway, chat_id)) == 2, timeout=10, what="the turn answered")
        wait_until(
            lambda: "SESSIONGATE_TEST_UNSET_BOT_TOKEN (the bot token) is not set" in gateway.log(),
            timeout=10, what="the delivery failure logged",
        )
    assert telegram_api.texts(chat_id=chat_id) == []  # given up at once: no retries against the API


def test_channel_series_count_messages_deliveries_and_retries(
    gateway: GatewayProcess, telegram_api: FakeTelegramApi
) -> None:
    chat_id = 23
    _, before = scrape_metrics(gateway.url)
    first = update(900, chat_id, "count me")
    assert post_update(gateway.url, first).json()["accepted"] == "new"
    assert post_update(gateway.url, first).json()["accepted"] == "duplicate"  # a platform retry
    assert telegram_api.wait_for_texts(1, chat_id=chat_id) == ["count me"]
    telegram_api.throttle_next(1, retry_after_s=1)
    assert post_update(gateway.url, update(901, chat_id, "and me")).json()["accepted"] == "new"
    assert telegram_api.wait_for_texts(2, chat_id=chat_id) == ["count me", "and me"]
    _, after = scrape_metrics(gateway.url)

    assert metric_delta(before, after, "sessiongate_channel_messages_total", channel="telegram", outcome="new") == 2
    assert metric_delta(before, after, "sessiongate_channel_messages_total", channel="telegram", outcome="duplicate") == 1
    assert metric_delta(before, after, "sessiongate_channel_deliveries_total", channel="telegram", outcome="sent") == 2
    assert metric_delta(before, after, "sessiongate_channel_delivery_retries_total", channel="telegram") == 1
