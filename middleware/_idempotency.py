"""Idempotency-Key records (draft-ietf-httpapi-idempotency-key-header) in the backend's RecordStorage.

A request with an ``Idempotency-Key`` first *claims* the key with an
in-flight record; when its response is final the record becomes the stored
answer (status, headers, body) that every repeat gets back without running
the endpoint again. A retryable answer (409, 429, 5xx) is not an answer to
keep: its record is deleted so the retry can run. The request is identified
by a fingerprint of method, path and body, so the same key with another body
is refused.

Records live in the backend (files or Redis), so they survive a restart and
are shared by every process. An in-flight record never blocks its key for
ever: it expires after a bound, and one whose owner process is dead (same
host) is reclaimed at once.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import Scope

from ._errors import IdempotencyInFlight, IdempotencyKeyReused, InvalidRequest
from .storage.base import THIS_HOST, RecordStorage, owner_dead, this_process_started_at

__all__ = [
    "DEFAULT_IN_FLIGHT_TTL_MS",
    "IN_FLIGHT_RETRY_AFTER_MS",
    "MAX_KEY_LENGTH",
    "Claim",
    "Idempotency",
    "StoredAnswer",
    "idempotency_key",
    "is_retryable_status",
]

MAX_KEY_LENGTH = 255
# An in-flight record expires after this long even if its owner never finishes (hung on another host).
DEFAULT_IN_FLIGHT_TTL_MS = 10 * 60_000
IN_FLIGHT_RETRY_AFTER_MS = 1_000  # without a lane estimate


def idempotency_key(scope: Scope) -> str | None:
    """The request's ``Idempotency-Key`` (an sf-string; bare tokens accepted), or ``None``."""
    for name, value in scope["headers"]:
        if name == b"idempotency-key":
            key: str = value.decode("latin-1").strip()
            if len(key) >= 2 and key[0] == key[-1] == '"':
                key = key[1:-1]
            if not 1 <= len(key) <= MAX_KEY_LENGTH:
                raise InvalidRequest(f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} characters")
            return key
    return None


def is_retryable_status(status: int) -> bool:
    """Answers a retry may change: contention, rate limits, server and backend errors."""
    return status in (409, 429) or status >= 500


@dataclass(frozen=True)
class StoredAnswer:
    """A final answer, as replayed to a repeat of its request."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def to_record(self, fingerprint: str) -> dict[str, Any]:
        return {
            "state": "done",
            "fingerprint": fingerprint,
            "status": self.status,
            "headers": [[name.decode("latin-1"), value.decode("latin-1")] for name, value in self.headers],
            "body": base64.b64encode(self.body).decode("ascii"),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> StoredAnswer:
        return cls(
            status=int(record["status"]),
            headers=[(name.encode("latin-1"), value.encode("latin-1")) for name, value in record["headers"]],
            body=base64.b64decode(record["body"]),
        )


class Claim:
    """This request owns the key until :meth:`complete` or :meth:`abandon`."""

    def __init__(self, idempotency: Idempotency, record_key: str, fingerprint: str) -> None:
        self._idempotency = idempotency
        self._record_key = record_key
        self.fingerprint = fingerprint

    async def complete(self, answer: StoredAnswer) -> None:
        """Keep a final answer for repeats; drop the claim if the answer is retryable."""
        if is_retryable_status(answer.status):
            await self.abandon()
        else:
            await self._idempotency.records.put(
                self._record_key, answer.to_record(self.fingerprint), ttl_ms=self._idempotency.ttl_ms
            )

    async def abandon(self) -> None:
        """Forget the claim, so a retry with the same key runs."""
        await self._idempotency.records.delete(self._record_key)


class Idempotency:
    """Claims and stored answers of Idempotency-Keys, namespaced by session, method and path."""

    def __init__(
        self,
        records: RecordStorage,
        *,
        ttl_ms: int,
        in_flight_ttl_ms: int = DEFAULT_IN_FLIGHT_TTL_MS,
        estimate_retry_after_ms: Callable[[str], int] = lambda session_id: IN_FLIGHT_RETRY_AFTER_MS,
    ) -> None:
        self.records = records
        self.ttl_ms = ttl_ms
        self.in_flight_ttl_ms = in_flight_ttl_ms
        self.estimate_retry_after_ms = estimate_retry_after_ms  # when the running request should be done

    async def begin(self, session_id: str, scope: Scope, key: str, body: bytes) -> Claim | StoredAnswer:
        """Claim ``key``, or return its stored answer.

        Raises :class:`IdempotencyKeyReused` (another body under this key) or
        :class:`IdempotencyInFlight` (the first request is still running).
        """
        record_key = _record_key(session_id, scope, key)
        fingerprint = _fingerprint(scope, body)
        for _ in range(3):  # add / read / reclaim races with other processes; bounded
            if await self.records.add(record_key, _in_flight(fingerprint), ttl_ms=self.in_flight_ttl_ms):
                return Claim(self, record_key, fingerprint)
            record = await self.records.get(record_key)
            if record is None:
                continue  # expired or completed-as-retryable in between: try to claim again
            if record.get("fingerprint") != fingerprint:
                raise IdempotencyKeyReused(
                    "this Idempotency-Key was used with a different request", session_id=session_id
                )
            if record.get("state") == "done":
                return StoredAnswer.from_record(record)
            if not await self._reclaim_if_owner_dead(record_key, record):
                break
        raise IdempotencyInFlight(
            "a request with this Idempotency-Key is still being processed",
            retry_after_ms=self.estimate_retry_after_ms(session_id),
            session_id=session_id,
        )

    async def _reclaim_if_owner_dead(self, record_key: str, record: dict[str, Any]) -> bool:
        """Delete an in-flight record whose owner process died; one claimant wins the right to."""
        if not owner_dead(record.get("host"), int(record["pid"]), record.get("processStartedAt")):
            return False
        reclaim_key = f"{record_key}:reclaim:{record['owner']}"
        if not await self.records.add(reclaim_key, {"by": os.getpid()}, ttl_ms=self.in_flight_ttl_ms):
            return False
        await self.records.delete(record_key)
        return True


def _record_key(session_id: str, scope: Scope, key: str) -> str:
    """A storage-safe key: the digest of session, method, path and client key."""
    digest = hashlib.sha256("\0".join((session_id, scope["method"], scope["path"], key)).encode())
    return f"idempotency:{digest.hexdigest()}"


def _fingerprint(scope: Scope, body: bytes) -> str:
    digest = hashlib.sha256(f"{scope['method']}\0{scope['path']}\0".encode())
    digest.update(body)
    return digest.hexdigest()


def _in_flight(fingerprint: str) -> dict[str, Any]:
    return {
        "state": "in-flight",
        "fingerprint": fingerprint,
        "owner": uuid.uuid4().hex,
        "pid": os.getpid(),
        "host": THIS_HOST,
        "processStartedAt": this_process_started_at(),
        "startedAt": time.time(),
    }
