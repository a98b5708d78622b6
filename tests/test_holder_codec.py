"""One holder wire codec (``encode_holder`` / ``decode_holder``) for every storage.

The file storage writes a holder record into its lock file, the Redis storage
after its token in the lease value, and the memory storage keeps the Holder
itself; all of them must write exactly the codec's bytes, and a record one
storage wrote must read back as the same Holder in every other.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from sessiongate.storage import Holder, LeaseKind, LeaseStorage, decode_holder, encode_holder, open_storage
from sessiongate.storage.base import holder_head
from sessiongate.storage.file import FileStorage
from sessiongate.storage.redis import RedisStorage
from tests.workers import settings_for

pytestmark = pytest.mark.anyio

LANE = LeaseKind.LANE
LONG_MS = 60_000
OTHER_HOST = Holder(  # a holder on another host; its host name needs JSON escaping
    session_id="telegram:42@x.y-z_1", kind=LeaseKind.WRITE, pid=4_194_311, host='gw "b" \\ é',
    process_started_at=1_790_000_000.125, since=1_790_000_100.5, heartbeat_at=1_790_000_160.75, fence=0,
)


@pytest.fixture
async def storages(tmp_path: Path, redis_url: str) -> AsyncIterator[dict[str, LeaseStorage]]:
    opened = {url.split(":")[0]: open_storage(settings_for(tmp_path, url)) for url in ("memory://", "file://", redis_url)}
    yield opened
    for storage in opened.values():
        await storage.aclose()


async def stored_record(storage: LeaseStorage, kind: LeaseKind, session_id: str) -> str | None:
    """The holder record exactly as ``storage`` keeps it (``None`` for memory, which keeps the Holder itself)."""
    if isinstance(storage, FileStorage):
        return Path(storage._lease_path(kind, session_id)).read_text()
    if isinstance(storage, RedisStorage):
        value = await storage.client.get(storage.keys.lease(kind, session_id))
        return value.partition(" ")[2]
    return None


async def plant(storage: LeaseStorage, record: str, holder: Holder) -> None:
    """Put ``record`` where ``storage`` keeps ``holder``'s lease, as another process would have written it."""
    if isinstance(storage, FileStorage):
        path = storage._lease_path(holder.kind, holder.session_id)
        Path(path).write_text(record)
        mtime = holder.heartbeat_at - 1  # the file's heartbeat is its mtime when that is newer than the record's
        os.utime(path, (mtime, mtime))
    else:
        assert isinstance(storage, RedisStorage)
        await storage.client.set(storage.keys.lease(holder.kind, holder.session_id), f"token {record}", px=LONG_MS)


async def test_every_storage_writes_exactly_the_codec_record(storages: dict[str, LeaseStorage]) -> None:
    for name, storage in storages.items():
        lease = await storage.try_acquire(LANE, f"from-{name}", stale_ms=LONG_MS)
        assert lease is not None and lease.holder.fence > 0
        read = await storage.holder(LANE, f"from-{name}")
        assert read is not None  # the file storage reads its heartbeat from the lock file's mtime:
        assert replace(read, heartbeat_at=lease.holder.heartbeat_at) == lease.holder
        record = await stored_record(storage, LANE, f"from-{name}")
        assert record in (None, encode_holder(lease.holder)), name
        assert decode_holder(encode_holder(lease.holder)) == lease.holder


async def test_a_record_written_by_one_storage_reads_back_identically_in_the_others(
    storages: dict[str, LeaseStorage],
) -> None:
    written: dict[str, tuple[str, Holder]] = {}
    for name, storage in storages.items():
        lease = await storage.try_acquire(LANE, f"from-{name}", stale_ms=LONG_MS)
        assert lease is not None
        written[name] = (await stored_record(storage, LANE, f"from-{name}") or encode_holder(lease.holder), lease.holder)
        await lease.release()
    written["elsewhere"] = (encode_holder(OTHER_HOST), OTHER_HOST)
    for writer, (record, holder) in written.items():
        for reader in ("file", "redis"):
            await plant(storages[reader], record, holder)
            assert await storages[reader].holder(holder.kind, holder.session_id) == holder, (writer, reader)


def test_the_record_is_compact_json_with_the_fence_last() -> None:
    holder = replace(OTHER_HOST, kind=LANE, fence=1_790_000_160_750_123)
    record = encode_holder(holder)
    assert json.loads(record) == {
        "sessionId": holder.session_id, "kind": "lane", "pid": holder.pid, "host": holder.host,
        "processStartedAt": holder.process_started_at, "since": holder.since,
        "heartbeatAt": holder.heartbeat_at, "fence": holder.fence,
    }
    assert record == json.dumps(json.loads(record), separators=(",", ":"))  # compact, in this key order
    assert record == holder_head(holder) + "1790000160750123}"  # acquire.lua appends the fence it issues
    assert decode_holder(record) == holder and decode_holder(record.encode()) == holder


def test_records_written_before_the_codec_still_decode() -> None:
    """A rolling upgrade meets lock files and Redis values written by the previous release."""
    spaced = json.dumps(json.loads(encode_holder(OTHER_HOST)))  # the old Redis form: ", " and ": "
    old_file = (
        '{"sessionId":"s","kind":"write","pid": 12, "host": "vm", "processStartedAt": null,'
        '"since":5.5,"heartbeatAt":5.5,"fence":0}'
    )
    assert decode_holder(spaced) == OTHER_HOST
    assert decode_holder(old_file) == Holder("s", LeaseKind.WRITE, 12, "vm", None, 5.5, 5.5, 0)


@pytest.mark.parametrize("raw", ["", "{", "[]", "null", '{"sessionId": "s"}', '{"kind": "queue"}', b"\xff"])
def test_anything_else_is_a_value_error(raw: str | bytes) -> None:
    with pytest.raises(ValueError):
        decode_holder(raw)


async def test_redis_lease_values_are_the_token_then_the_record_on_grant_and_renew(
    redis_url: str, tmp_path: Path
) -> None:
    """acquire.lua joins holder_head and the fence it issued; renew stores the record Python encoded."""
    storage = open_storage(settings_for(tmp_path, redis_url))
    assert isinstance(storage, RedisStorage)
    try:
        lease = await storage.try_acquire(LANE, "s", stale_ms=LONG_MS)
        assert lease is not None
        token, _, record = (await storage.client.get(storage.keys.lease(LANE, "s"))).partition(" ")
        assert len(token) == 32 and record == encode_holder(lease.holder)
        assert await lease.renew()  # renew.lua stores the record Python encoded
        assert await stored_record(storage, LANE, "s") == encode_holder(lease.holder)
    finally:
        await storage.aclose()
