"""Exactly once across a crash: the transcript itself answers a retried Idempotency-Key.

The gate's idempotency records answer ordinary retries. One window is left:
the turn was appended, then the process died before its answer was recorded
(or sent). The retry then finds no finished record, so the turn runner looks
in the transcript for the key. These tests open that window on purpose by
removing the records between two real gateway processes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.fakes.openai_server import FakeOpenAI
from tests.support import GatewayProcess


def post(url: str, session: str, text: str, key: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/sessions/{session}/messages", json={"text": text},
                      headers={"Idempotency-Key": key}, timeout=10)


@pytest.mark.parametrize(
    ("first_key", "retry_key"),
    [("key-1", "key-1"), ('"key-1"', "key-1")],  # the second: the same key as an sf-string, then bare
    ids=["same-spelling", "quoted-then-bare"],
)
def test_retry_after_a_lost_idempotency_record_is_answered_from_the_transcript(
    tmp_path: Path, first_key: str, retry_key: str
) -> None:
    data_dir = tmp_path / "data"
    with FakeOpenAI("model") as fake:
        config = {"providers": [fake.provider()]}
        with GatewayProcess(data_dir, config) as gateway:
            first = post(gateway.url, "crash", "hello", first_key)
        shutil.rmtree(data_dir / "records")  # what a kill -9 between append and record leaves
        with GatewayProcess(data_dir, config) as gateway:
            retry = post(gateway.url, "crash", "hello", retry_key)
            reused = post(gateway.url, "crash", "another text", retry_key)
            transcript = httpx.get(f"{gateway.url}/v1/sessions/crash/messages").json()["messages"]
    assert first.status_code == retry.status_code == 200
    assert retry.json() == first.json()
    assert fake.calls == 1, "the model must not be called again for a stored answer"
    assert [m["text"] for m in transcript] == ["hello", "model: hello"]
    assert reused.status_code == 422
    assert reused.json()["type"].endswith("idempotency-key-reused")
