"""Long conversations cost what short ones do: real gateway processes over real, big transcript files.

The big transcripts (100 000 records) are written straight to disk, as a year
of chat would have left them, with no index beside them: the gateway must
build it, use it, and rebuild it when it is deleted, corrupted or out of date.
Latency bounds are generous (a loaded 2-core machine); the code before the
index took ~0.3 s per turn at 100 000 records and stalled every other session
as long, which they catch.
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from sessiongate import FileTranscriptStore, TranscriptStore, _transcript_index, open_backend
from sessiongate._transcript_index import index_path
from tests.fakes.openai_server import FakeOpenAI
from tests.support import (
    NO_RATE_LIMITS,
    GatewayProcess,
    assert_problem,
    messages_url,
    scrape_metrics,
    transcript,
    write_transcript,
)
from tests.workers import settings_for

pytestmark = pytest.mark.anyio

BIG = 100_000
QUIET = {"rateLimits": NO_RATE_LIMITS, "transcript": {"fsync": "never"}}


async def timed_turn(client: httpx.AsyncClient, base: str, session_id: str, text: str) -> float:
    started = time.perf_counter()
    response = await client.post(messages_url(base, session_id), json={"text": text})
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


async def test_a_100k_record_session_costs_a_short_one_and_stalls_nobody(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    write_transcript(data_dir, "huge", BIG)
    with FakeOpenAI("model") as model, GatewayProcess(data_dir, {
        **QUIET, "providers": [model.provider()], "history": {"maxMessages": 20},
    }) as gateway:
        async with httpx.AsyncClient(timeout=60) as client:
            await timed_turn(client, gateway.url, "huge", "first: builds the index")
            assert len(model.requests[-1]["messages"]) == 20  # the newest 20 records, the new message last
            assert model.requests[-1]["messages"][-1] == {"role": "user", "content": "first: builds the index"}
            for number in range(3):
                await timed_turn(client, gateway.url, f"warm-{number}", "warm up")

            async def others(rounds: int) -> list[float]:
                return [await timed_turn(client, gateway.url, f"other-{round_ % 4}", "hi") for round_ in range(rounds)]

            alone = await others(30)
            huge_times: list[float] = []
            busy = True

            async def keep_huge_busy() -> None:
                while busy:
                    huge_times.append(await timed_turn(client, gateway.url, "huge", "again"))

            runner = asyncio.create_task(keep_huge_busy())
            try:
                beside_huge = await others(30)
            finally:
                busy = False
                await runner

        families, _ = scrape_metrics(gateway.url)
    assert families.get("sessiongate_event_loop_lag_seconds") == "histogram"
    assert len(model.requests[-1]["messages"]) == 20
    small = statistics.median(alone)
    bound = max(0.15, 5 * small)
    assert statistics.median(huge_times) < bound, (statistics.median(huge_times), small)
    assert statistics.median(beside_huge) < bound, (statistics.median(beside_huge), small)


async def test_paging_walks_every_message_exactly_once_newest_page_first(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    ids = write_transcript(data_dir, "paged", 2_345)
    with GatewayProcess(data_dir, QUIET) as gateway:
        async with httpx.AsyncClient(timeout=30) as client:
            for number in range(3):
                await timed_turn(client, gateway.url, "paged", f"live {number}")
            url: str | None = f"{messages_url(gateway.url, 'paged')}?limit=100"
            pages = []
            while url is not None:
                response = await client.get(url)
                assert response.status_code == 200, response.text
                page = response.json()["messages"]
                assert 0 < len(page) <= 100
                pages.append(page)
                url = f"{gateway.url}{response.links['next']['url']}" if "next" in response.links else None
                assert len(pages) < 100
            newest_first = await client.get(messages_url(gateway.url, "paged"))  # the default limit
            bad = [
                await client.get(f"{messages_url(gateway.url, 'paged')}?{query}")
                for query in ("limit=0", "limit=1001", "limit=ten", "limit=-5", "before=no-such-message")
            ]
            unknown = await client.get(messages_url(gateway.url, "never-used"))
        walked = [message["id"] for page in reversed(pages) for message in page]
        assert walked[: len(ids)] == ids  # every message once, in transcript order within and across pages
        assert [m["text"] for m in transcript(gateway.url, "paged")[len(ids):]] == [
            text for number in range(3) for text in (f"live {number}",) * 2
        ]
        assert len(walked) == len(ids) + 6 and len(set(walked)) == len(walked)
    assert [m["id"] for m in newest_first.json()["messages"]] == walked[-100:]
    assert newest_first.links["next"]["url"].endswith(f"before={walked[-100]}")
    for response in bad:
        assert_problem(response, 400, "invalid-request")
    assert unknown.status_code == 200 and unknown.json()["messages"] == [] and "next" not in unknown.links


async def test_a_crash_recovery_retry_on_a_100k_session_finds_its_earlier_answer(tmp_path: Path) -> None:
    """The first attempt was appended and its process died before answering: no gate record, only the transcript."""
    data_dir = tmp_path / "data"
    ids = write_transcript(data_dir, "recover", BIG, key_at=1_000)
    with GatewayProcess(data_dir, QUIET) as gateway:
        async with httpx.AsyncClient(timeout=60) as client:
            retry = await client.post(
                messages_url(gateway.url, "recover"), json={"text": "question 1000"}, headers={"Idempotency-Key": "key-1000"}
            )
            reused = await client.post(
                messages_url(gateway.url, "recover"), json={"text": "another"}, headers={"Idempotency-Key": "key-1000"}
            )
            newest = (await client.get(messages_url(gateway.url, "recover") + "?limit=1")).json()["messages"]
    assert retry.status_code == 200, retry.text
    assert retry.json()["messageId"] == ids[1_000]
    assert retry.json()["reply"] == {"id": ids[1_001], "text": "answer 1001", "provider": "echo"}
    assert_problem(reused, 422, "idempotency-key-reused")
    assert [m["id"] for m in newest] == [ids[-1]]  # nothing was appended


async def _answers(store: TranscriptStore, ids: list[str]) -> list[Any]:
    """Everything the index answers for: pages, key lookups, a turn's tail (locked, so also its repair)."""
    async with store.locked("s") as locked:
        tail = await locked.tail(7)
        through = await locked.tail(5, through=ids[len(ids) // 3])
        found = await locked.find("idempotencyKey", "key-40")
    newest = await store.page("s", limit=50)
    middle = await store.page("s", limit=50, before=ids[len(ids) // 2])
    first = await store.page("s", limit=50, before=ids[10])
    return [tail, through, found, await store.find("s", "replyTo", ids[40]), await store.find("s", "id", "nope"),
            newest, middle, first, await store.page("s", limit=5, before="nope")]


def _check(answers: list[Any], ids: list[str]) -> None:
    third, half = len(ids) // 3, len(ids) // 2
    assert [r["id"] for r in answers[0]] == ids[-7:]
    assert [r["id"] for r in answers[1]] == ids[third - 4: third + 1]
    assert answers[2]["id"] == ids[40] and answers[3]["id"] == ids[41] and answers[4] is None
    assert [r["id"] for r in answers[5].records] == ids[-50:] and answers[5].more
    assert [r["id"] for r in answers[6].records] == ids[half - 50: half] and answers[6].more
    assert [r["id"] for r in answers[7].records] == ids[:10] and not answers[7].more
    assert answers[8] is None


async def test_a_short_transcript_answers_the_same_without_an_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(tmp_path / "data", transcript={"fsync": "never"})
    ids = write_transcript(settings.data_dir, "s", 300, key_at=40)
    backend = open_backend(settings)
    store = FileTranscriptStore(backend, settings)
    try:
        small = await _answers(store, ids)
        _check(small, ids)
        assert not index_path(store.path_for("s")).exists()  # most sessions are short: no file to create
        monkeypatch.setattr(_transcript_index, "INDEX_FROM_BYTES", 0)
        assert await _answers(store, ids) == small
        assert index_path(store.path_for("s")).exists()
    finally:
        await backend.aclose()


async def test_the_index_rebuilt_after_deletion_or_corruption_gives_the_same_answers(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "data", transcript={"fsync": "never"})
    ids = write_transcript(settings.data_dir, "s", 5_000, key_at=40)
    backend = open_backend(settings)
    store = FileTranscriptStore(backend, settings)
    transcript_path = store.path_for("s")
    index = index_path(transcript_path)
    try:
        expected = await _answers(store, ids)
        _check(expected, ids)
        assert index.exists()

        index.unlink()
        assert await _answers(store, ids) == expected

        garbage = index.with_name("garbage")
        garbage.write_bytes(b"this is not a database" * 100)
        for suffix in ("-wal", "-shm"):
            Path(f"{index}{suffix}").unlink(missing_ok=True)
        garbage.replace(index)  # e.g. a bad restore
        assert await _answers(store, ids) == expected

        with sqlite3.connect(index) as db:  # a readable index that lies: offsets and keys point elsewhere
            db.execute("UPDATE records SET offset = offset + 3")
            db.execute("UPDATE keys SET seq = seq + 1")
        assert await _answers(store, ids) == expected

        with transcript_path.open("ab") as file:  # a crash mid-append: a torn last line
            file.write(b'{"id":"torn","role":"user","te')
        assert await _answers(store, ids) == expected  # the locked read set it aside; the index never saw it
        assert transcript_path.read_bytes().endswith(b"\n")

        stored = await store.append("s", [{"role": "user", "text": "after the repair"}])
        page = await store.page("s", limit=2)
        assert [r["id"] for r in page.records] == [ids[-1], stored[0]["id"]]

        write_transcript(settings.data_dir, "s", 5_000, key_at=42)  # replaced under the index, same size
        replaced = await store.page("s", limit=3)
        assert [r["id"] for r in replaced.records] == ids[-3:]
        assert await store.find("s", "idempotencyKey", "key-40") is None
        assert (await store.find("s", "idempotencyKey", "key-42"))["id"] == ids[42]
    finally:
        await backend.aclose()
