"""Idempotency-Key records over every backend's RecordStorage: claim, replay, reuse, reclaim."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sessiongate import Settings, open_backend
from sessiongate._errors import IdempotencyInFlight, IdempotencyKeyReused, InvalidRequest
from sessiongate._idempotency import Claim, Idempotency, StoredAnswer, idempotency_key
from sessiongate.storage import RecordStorage

SCOPE = {"type": "http", "method": "POST", "path": "/v1/sessions/s1/messages", "headers": []}
ANSWER = StoredAnswer(200, [(b"content-type", b"application/json")], b'{"reply":"hi"}')


@pytest.fixture
async def records(storage_url: str, tmp_path: Path) -> AsyncIterator[RecordStorage]:
    backend = open_backend(Settings(data_dir=tmp_path / "data", backend={"url": storage_url}))
    yield backend.records
    await backend.aclose()


def _idempotency(records: RecordStorage, in_flight_ttl_ms: int = 60_000) -> Idempotency:
    return Idempotency(records, ttl_ms=60_000, in_flight_ttl_ms=in_flight_ttl_ms)


@pytest.mark.anyio
async def test_completed_answer_is_replayed(records: RecordStorage) -> None:
    idempotency = _idempotency(records)
    claim = await idempotency.begin("s1", SCOPE, "key-1", b'{"text":"hi"}')
    assert isinstance(claim, Claim)
    await claim.complete(ANSWER)

    assert await idempotency.begin("s1", SCOPE, "key-1", b'{"text":"hi"}') == ANSWER


@pytest.mark.anyio
async def test_same_key_while_in_flight_is_refused(records: RecordStorage) -> None:
    idempotency = _idempotency(records)
    await idempotency.begin("s1", SCOPE, "key-1", b"a")
    with pytest.raises(IdempotencyInFlight) as caught:
        await idempotency.begin("s1", SCOPE, "key-1", b"a")
    assert caught.value.retry_after_ms >= 1 and caught.value.session_id == "s1"


@pytest.mark.anyio
async def test_same_key_with_another_body_is_refused_in_flight_and_after(records: RecordStorage) -> None:
    idempotency = _idempotency(records)
    claim = await idempotency.begin("s1", SCOPE, "key-1", b"a")
    with pytest.raises(IdempotencyKeyReused):
        await idempotency.begin("s1", SCOPE, "key-1", b"b")
    await claim.complete(ANSWER)
    with pytest.raises(IdempotencyKeyReused):
        await idempotency.begin("s1", SCOPE, "key-1", b"b")


@pytest.mark.anyio
@pytest.mark.parametrize("status", [409, 429, 500, 502, 503])
async def test_retryable_answers_are_not_kept(records: RecordStorage, status: int) -> None:
    idempotency = _idempotency(records)
    claim = await idempotency.begin("s1", SCOPE, "key-1", b"a")
    await claim.complete(StoredAnswer(status, [], b"{}"))
    assert isinstance(await idempotency.begin("s1", SCOPE, "key-1", b"a"), Claim)


@pytest.mark.anyio
async def test_keys_are_namespaced_by_session_and_path(records: RecordStorage) -> None:
    idempotency = _idempotency(records)
    await idempotency.begin("s1", SCOPE, "key-1", b"a")
    assert isinstance(await idempotency.begin("s2", SCOPE, "key-1", b"a"), Claim)
    assert isinstance(await idempotency.begin("s1", SCOPE | {"path": "/other"}, "key-1", b"a"), Claim)


@pytest.mark.anyio
async def test_in_flight_record_of_a_dead_process_is_reclaimed_at_once(records: RecordStorage) -> None:
    idempotency = _idempotency(records)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=10)
    claim = await idempotency.begin("s1", SCOPE, "key-1", b"a")
    assert isinstance(claim, Claim)
    record = await records.get(claim._record_key)
    await records.put(claim._record_key, record | {"pid": dead.pid, "processStartedAt": None}, ttl_ms=60_000)

    assert isinstance(await idempotency.begin("s1", SCOPE, "key-1", b"a"), Claim)


@pytest.mark.anyio
async def test_in_flight_record_expires_after_its_bound(records: RecordStorage) -> None:
    idempotency = _idempotency(records, in_flight_ttl_ms=300)
    await idempotency.begin("s1", SCOPE, "key-1", b"a")
    time.sleep(0.4)
    assert isinstance(await idempotency.begin("s1", SCOPE, "key-1", b"a"), Claim)


@pytest.mark.parametrize(
    ("header", "expected"), [(b"abc", "abc"), (b'"8e03978e-40d5"', "8e03978e-40d5"), (b" k ", "k")]
)
def test_key_is_read_as_sf_string_or_bare_token(header: bytes, expected: str) -> None:
    assert idempotency_key(SCOPE | {"headers": [(b"idempotency-key", header)]}) == expected


@pytest.mark.parametrize("header", [b"", b'""', b"x" * 256])
def test_empty_or_overlong_key_is_invalid_request(header: bytes) -> None:
    with pytest.raises(InvalidRequest):
        idempotency_key(SCOPE | {"headers": [(b"idempotency-key", header)]})


def test_no_header_no_key() -> None:
    assert idempotency_key(SCOPE) is None
