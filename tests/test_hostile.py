"""Hostile and unlucky traffic against a real gateway process (issue 11).

Each test drives ``sessiongate serve`` as a separate OS process over HTTP on
127.0.0.1 and proves one defence: server paths stay out of problem details,
control characters stay out of the log, and the other refusals below.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from tests.support import GatewayProcess, assert_problem, messages_url


def test_a_server_fault_shows_the_request_id_and_logs_the_path(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sessions").mkdir(parents=True)
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text("")
    os.symlink(outside, data / "sessions" / "planted.jsonl")  # resolves outside the sessions folder: a fault
    with GatewayProcess(data) as gateway, httpx.Client(timeout=10) as client:
        answers = [client.post(messages_url(gateway.url, "planted"), json={"text": "hi"}),
                   client.get(messages_url(gateway.url, "planted"))]
        log = gateway.log()
    for answer in answers:
        problem = assert_problem(answer, 500, "internal-error")
        assert str(tmp_path) not in answer.text
        assert answer.headers["x-request-id"] in problem["detail"]
    assert str(data.resolve() / "sessions") in log  # the operator still finds where it went wrong
