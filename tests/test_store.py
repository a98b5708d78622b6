"""TranscriptStore: append/read, torn-line repair, fencing, path safety, fsync policies."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from sessiongate._backend import open_backend
from sessiongate._errors import FencedOut, InvalidSessionId, SessionBusy, SessionGateError
from sessiongate._metrics import FENCING_REFUSALS
from sessiongate._store import FileTranscriptStore
from tests.workers import settings_for, sibling_backends

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["always", "never"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> FileTranscriptStore:
    settings = settings_for(tmp_path, transcript={"fsync": request.param})
    return FileTranscriptStore(open_backend(settings), settings)


async def test_append_fills_id_at_and_fence_and_reads_back_in_order(store: FileTranscriptStore) -> None:
    first = await store.append("chat:1", [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "yo"}], fence=3)
    assert [r["text"] for r in first] == ["hi", "yo"]
    assert all(len(r["id"]) == 32 and r["at"].endswith("Z") and r["fence"] == 3 for r in first)
    await store.append("chat:1", [{"id": "mine", "role": "user", "text": "again", "at": "2020-01-01T00:00:00Z"}])
    records = await store.read("chat:1")
    assert [r["text"] for r in records] == ["hi", "yo", "again"]
    assert records[2]["id"] == "mine" and records[2]["fence"] is None
    assert await store.read_unlocked("chat:1") == records
    assert await store.session_ids() == ["chat:1"]
    assert store.path_for("chat:1").name == "chat%3A1.jsonl"


async def test_torn_last_line_is_set_aside_and_appends_continue(store: FileTranscriptStore) -> None:
    await store.append("s", [{"role": "user", "text": "whole"}])
    path = store.path_for("s")
    with path.open("ab") as file:
        file.write(b'{"role":"user","text":"cut in the mid')  # a crash mid-append
    assert [r["text"] for r in await store.read_unlocked("s")] == ["whole"]  # skipped, not touched
    assert not list(path.parent.glob("s.jsonl.torn-*"))

    assert [r["text"] for r in await store.read("s")] == ["whole"]
    (side,) = path.parent.glob("s.jsonl.torn-*")
    assert side.read_bytes() == b'{"role":"user","text":"cut in the mid'
    assert path.read_bytes().endswith(b"}\n")
    await store.append("s", [{"role": "user", "text": "next"}])
    assert [json.loads(line)["text"] for line in path.read_bytes().splitlines()] == ["whole", "next"]


async def test_append_after_a_torn_tail_repairs_first(store: FileTranscriptStore) -> None:
    path = store.path_for("s")
    path.write_bytes(b'{"text":"a"}\n{"text":"torn')
    await store.append("s", [{"role": "user", "text": "b"}])
    assert [r["text"] for r in await store.read_unlocked("s")] == ["a", "b"]
    assert len(list(path.parent.glob("s.jsonl.torn-*"))) == 1


async def test_old_fence_is_refused(store: FileTranscriptStore, tmp_path: Path) -> None:
    backend = store._backend
    old = await backend.acquire_lane("s")
    await old.release()
    new = await backend.acquire_lane("s")
    refusals = FENCING_REFUSALS._value.get()
    with pytest.raises(FencedOut) as fenced:
        await store.append("s", [{"role": "user", "text": "late"}], fence=old.fence)
    assert (fenced.value.fence, fenced.value.current_fence) == (old.fence, new.fence)
    assert FENCING_REFUSALS._value.get() == refusals + 1
    await store.append("s", [{"role": "user", "text": "current"}], fence=new.fence)
    assert [r["text"] for r in await store.read("s")] == ["current"]
    await new.release()


@pytest.mark.parametrize("bad_id", ["..", ".", "a/../b", "../etc/passwd", "/abs", "", "a b", "x" * 129, "nul\0"])
async def test_bad_ids_are_refused(store: FileTranscriptStore, bad_id: str) -> None:
    with pytest.raises(InvalidSessionId):
        await store.append(bad_id, [{"text": "x"}])
    with pytest.raises(InvalidSessionId):
        await store.read_unlocked(bad_id)


async def test_a_symlink_at_the_transcript_path_is_refused(store: FileTranscriptStore, tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    os.symlink(target, store.path_for("s"))
    with pytest.raises(SessionGateError):
        await store.append("s", [{"text": "x"}])
    assert target.read_text() == "keep me"


async def test_locked_read_then_append_is_one_critical_section(store: FileTranscriptStore) -> None:
    async with store.locked("s") as transcript:
        assert await transcript.read() == []
        await transcript.append([{"role": "user", "text": "one"}])
        assert [r["text"] for r in await transcript.read()] == ["one"]


async def test_a_writer_that_lost_its_write_lock_does_not_write(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, sessionWriteLock={"staleMs": 300, "timeoutMs": 2_000})
    slow, fast = (FileTranscriptStore(backend, settings) for backend in sibling_backends(settings))
    async with slow.locked("s") as stalled:
        time.sleep(0.45)  # the event loop stalls past staleMs: no heartbeat
        await fast.append("s", [{"role": "user", "text": "taker"}])  # takes the stale write lock over
        await asyncio.sleep(0.2)  # the stalled holder's next heartbeat finds its lease gone
        with pytest.raises(SessionBusy):
            await stalled.append([{"role": "user", "text": "late"}])
    assert [r["text"] for r in await fast.read("s")] == ["taker"]
