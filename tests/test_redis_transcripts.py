"""Transcripts in Redis (``transcript.url = redis://``): the store interface, storage-side fencing, the gateway on it.

Every store test runs on both stores (JSONL files and Redis streams), so the
Redis store is held to exactly the file store's behaviour; the fencing tests
send an append with a stale fence straight to Redis (no check in Python could
refuse it) and see Redis refuse it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from sessiongate import ConfigError, FencedOut, FileTranscriptStore, TranscriptStore, open_backend, open_transcripts
from sessiongate.gateway._server import create_app
from sessiongate.transcripts.redis import RedisTranscriptStore, TranscriptKeys, judge_persistence
from tests.support import NO_RATE_LIMITS, UvicornThread, messages_url
from tests.workers import settings_for

pytestmark = pytest.mark.anyio

KEY_PREFIX = "sgtx"


@pytest.fixture(params=["file", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TranscriptStore]:
    """Each transcript store over its own backend (Redis: the run's database, backend and transcripts alike)."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else "file://"
    settings = settings_for(tmp_path, url, backend={"url": url, "keyPrefix": KEY_PREFIX}, transcript={"url": url})
    backend = open_backend(settings)
    try:
        yield open_transcripts(backend, settings)
    finally:
        await backend.aclose()


def texts(records: list[dict]) -> list[str]:
    return [record["text"] for record in records]


async def fill(store: TranscriptStore, session_id: str, count: int) -> list[dict]:
    stored = []
    for number in range(count):
        stored += await store.append(session_id, [{"role": "user", "text": f"m{number}"}])
    return stored


async def test_the_store_is_chosen_by_transcript_url(store: TranscriptStore) -> None:
    assert isinstance(store, FileTranscriptStore) == store.location.startswith("/")


async def test_append_fills_id_at_fence_and_reads_back_in_order(store: TranscriptStore) -> None:
    stored = await store.append("chat:1", [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "hé"}], fence=7)
    assert [record["fence"] for record in stored] == [7, 7] and all(record["id"] and record["at"] for record in stored)
    assert await store.read_unlocked("chat:1") == stored
    assert await store.read("chat:1") == stored
    assert await store.session_ids() == ["chat:1"]
    assert await store.count("chat:1") == 2 and await store.count("nobody") == 0
    assert await store.read_unlocked("nobody") == []


async def test_tail_and_pages_read_the_newest_records(store: TranscriptStore) -> None:
    stored = await fill(store, "s", 7)
    async with store.locked("s") as transcript:
        assert texts(await transcript.tail(3)) == ["m4", "m5", "m6"]
        assert texts(await transcript.tail(3, through=stored[2]["id"])) == ["m0", "m1", "m2"]
        assert texts(await transcript.tail(100)) == [f"m{n}" for n in range(7)]
        with pytest.raises(ValueError):
            await transcript.tail(3, through="no-such-record")
    first = await store.page("s", limit=3)
    assert first is not None and texts(first.records) == ["m4", "m5", "m6"] and first.more
    second = await store.page("s", limit=3, before=first.records[0]["id"])
    assert second is not None and texts(second.records) == ["m1", "m2", "m3"] and second.more
    last = await store.page("s", limit=3, before=second.records[0]["id"])
    assert last is not None and texts(last.records) == ["m0"] and not last.more
    assert await store.page("s", limit=3, before="no-such-record") is None
    empty = await store.page("nobody", limit=3)
    assert empty is not None and empty.records == [] and not empty.more


async def test_find_looks_records_up_by_indexed_fields(store: TranscriptStore) -> None:
    user, reply = await store.append(
        "s", [{"role": "user", "text": "q", "idempotencyKey": "k1"}, {"role": "assistant", "text": "a"}]
    )
    reply = (await store.append("s", [{"role": "assistant", "text": "a2", "replyTo": user["id"]}]))[0]
    assert await store.find("s", "idempotencyKey", "k1") == user
    assert await store.find("s", "replyTo", user["id"]) == reply
    assert await store.find("s", "id", user["id"]) == user
    assert await store.find("s", "idempotencyKey", "k2") is None
    async with store.locked("s") as transcript:
        assert await transcript.find("idempotencyKey", "k1") == user


async def test_an_old_fence_is_refused_and_nothing_is_written(store: TranscriptStore, tmp_path: Path) -> None:
    backend = store._backend  # type: ignore[attr-defined]
    old = await backend.acquire_lane("s")
    await old.release()
    new = await backend.acquire_lane("s")
    try:
        await store.append("s", [{"role": "user", "text": "new"}], fence=new.fence)
        with pytest.raises(FencedOut):
            await store.append("s", [{"role": "user", "text": "late"}, {"role": "assistant", "text": "x"}], fence=old.fence)
    finally:
        await new.release()
    assert texts(await store.read_unlocked("s")) == ["new"]


@pytest.fixture
def redis_store_settings(tmp_path: Path, redis_url: str):  # noqa: ANN201
    return settings_for(tmp_path, redis_url, backend={"url": redis_url, "keyPrefix": KEY_PREFIX},
                        transcript={"url": redis_url}, rateLimits=NO_RATE_LIMITS)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


async def test_redis_itself_refuses_a_stale_fence(redis_store_settings, redis_client: redis.Redis) -> None:  # noqa: ANN001
    """The check is inside the script: bumping the fence key in Redis alone makes the same call fail."""
    backend = open_backend(redis_store_settings)
    store = open_transcripts(backend, redis_store_settings)
    try:
        await store.append("s", [{"role": "user", "text": "ok"}], fence=100)
        redis_client.set(backend.storage.keys.fence("s"), 101)  # another lane grant, as acquire.lua issues them
        with pytest.raises(FencedOut) as refused:
            await store.append("s", [{"role": "user", "text": "late"}], fence=100)
        assert "101" in str(refused.value)
    finally:
        await backend.aclose()
    keys = TranscriptKeys(KEY_PREFIX)
    assert redis_client.xlen(keys.stream("s")) == 1
    assert redis_client.ttl(keys.stream("s")) == -1 and redis_client.ttl(keys.index("s")) == -1  # kept: no TTL


async def test_a_retried_append_is_written_once(redis_store_settings, redis_client: redis.Redis) -> None:  # noqa: ANN001
    """A reply lost after the script ran makes the client send it again: the same records land once."""
    backend = open_backend(redis_store_settings)
    store = open_transcripts(backend, redis_store_settings)
    records = [{"id": "u1", "role": "user", "text": "q"}, {"id": "a1", "role": "assistant", "text": "a"}]
    try:
        await store.append("s", records, fence=None)
        await store.append("s", records, fence=None)
        assert [record["id"] for record in await store.read_unlocked("s")] == ["u1", "a1"]
    finally:
        await backend.aclose()


def test_transcript_url_must_be_the_backend_redis(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="transcript.url"):
        settings_for(tmp_path, "file://", transcript={"url": "redis://127.0.0.1:6379/0"})
    with pytest.raises(ConfigError, match="transcript.url"):
        settings_for(tmp_path, "redis://127.0.0.1:6379/1", transcript={"url": "redis://127.0.0.1:6379/2"})
    with pytest.raises(ConfigError):
        settings_for(tmp_path, "file://", transcript={"url": "file:///elsewhere"})
    assert settings_for(tmp_path, "redis://localhost/3", transcript={"url": "redis://localhost:6379/3"})


def test_the_aof_settings_are_judged() -> None:
    assert judge_persistence("yes", "always").durable
    assert not judge_persistence("yes", "everysec").durable
    assert "last second" in judge_persistence("yes", "everysec").detail
    assert not judge_persistence("no", "always").durable


async def test_redis_store_reports_the_servers_persistence(redis_store_settings, redis_client: redis.Redis) -> None:  # noqa: ANN001
    backend = open_backend(redis_store_settings)
    try:
        store = open_transcripts(backend, redis_store_settings)
        assert isinstance(store, RedisTranscriptStore)
        config = redis_client.config_get("append*")
        assert (await store.durability()) == judge_persistence(config["appendonly"], config["appendfsync"])
    finally:
        await backend.aclose()


def test_the_gateway_runs_turns_on_redis_transcripts(redis_store_settings, redis_client: redis.Redis, tmp_path: Path) -> None:  # noqa: ANN001
    """POST turns, page through GET, retry with an Idempotency-Key: nothing on disk, all in the stream."""
    with UvicornThread(create_app(redis_store_settings)) as server, httpx.Client(timeout=10) as client:
        for number in range(3):
            answer = client.post(messages_url(server.url, "web:1"), json={"text": f"t{number}"},
                                 headers={"Idempotency-Key": f"key-{number}"})
            assert answer.status_code == 200, answer.text
        again = client.post(messages_url(server.url, "web:1"), json={"text": "t2"}, headers={"Idempotency-Key": "key-2"})
        assert again.json()["messageId"] == answer.json()["messageId"]
        page = client.get(messages_url(server.url, "web:1"), params={"limit": 4})
        older = client.get(server.url + page.links["next"]["url"])
    assert texts(page.json()["messages"]) == ["t1", "t1", "t2", "t2"]  # echo answers with the text
    assert texts(older.json()["messages"]) == ["t0", "t0"] and "link" not in older.headers
    assert redis_client.xlen(TranscriptKeys(KEY_PREFIX).stream("web:1")) == 6
    assert not list((tmp_path / "sessions").glob("*.jsonl"))
