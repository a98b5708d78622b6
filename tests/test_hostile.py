"""Hostile and unlucky traffic against a real gateway process (issue 11).

Each test drives ``sessiongate serve`` as a separate OS process over HTTP on
127.0.0.1 and proves one defence: server paths stay out of problem details,
control characters stay out of the log, and the other refusals below.
"""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
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


def raw_request(port: int, request: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``request`` bytes as they are (no client normalises them) and return what comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65_536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_control_characters_in_a_url_cannot_forge_a_log_line(tmp_path: Path) -> None:
    forged = "2026-11-30 05:00:00,000 INFO sessiongate.access [req=x session=None] POST /admin 200"
    with GatewayProcess(tmp_path / "data") as gateway:
        for path in (f"/v1/sessions/a%0A{forged}/messages", f"/nowhere%0D%0A{forged}%1B[2J%E2%80%A8"):
            answer = raw_request(gateway.port, f"GET {path.replace(' ', '%20')} HTTP/1.1\r\n"
                                               "Host: x\r\nConnection: close\r\n\r\n".encode())
            assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 404")), answer[:200]
        log = gateway.log()
    assert not any(line.startswith(forged) for line in log.splitlines()), log
    assert f"a\\n{forged}" in log and "\\x1b[2J\\u2028" in log


def test_the_first_busy_answer_of_a_slow_turn_does_not_underestimate_it(tmp_path: Path) -> None:
    config = {"providers": [{"id": "slow", "type": "echo", "delayMs": 3000}]}
    with GatewayProcess(tmp_path / "data", config) as gateway, httpx.Client(timeout=10) as client:
        url = messages_url(gateway.url, "first")
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, url, json={"text": "slow"})
            time.sleep(0.5)  # the first turn has run a while when the second message comes
            second = pool.submit(client.post, url, json={"text": "again"})
            answers = [first.result(), second.result()]
    (refused,) = [answer for answer in answers if answer.status_code != 200]
    busy = assert_problem(refused, 409, "session-busy")
    # no turn has finished yet: the running one is expected to take at least as long again, never past 3 s
    assert 1000 <= busy["retryAfterMs"] <= 3000
