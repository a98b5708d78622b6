"""Hostile and unlucky traffic against a real gateway process (issue 11).

Each test drives ``sessiongate serve`` as a separate OS process over HTTP on
127.0.0.1 and proves one defence: server paths stay out of problem details,
control characters stay out of the log, and the other refusals below.
"""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import NO_RATE_LIMITS, GatewayProcess, assert_problem, messages_url, run_cli, wait_until


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


def send_head(port: int, head: bytes, *, chunk: int = 65_536) -> bytes:
    """Send ``head`` piece by piece, stopping as soon as the server answers; its answer (``b""`` if it just closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            for start in range(0, len(head), chunk):
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered before the head was complete
                sock.sendall(head[start:start + chunk])
            return sock.recv(65_536)
        except (BrokenPipeError, ConnectionResetError):
            return b""


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_an_oversized_or_slow_request_head_is_refused_and_the_gateway_stays_small(tmp_path: Path) -> None:
    twenty_mib = 20 * 1024 * 1024
    with GatewayProcess(tmp_path / "data") as gateway:
        resource.prlimit(gateway.pid, resource.RLIMIT_NOFILE, (256, 256))
        gateway_process = psutil.Process(gateway.pid)
        before = gateway_process.memory_info().rss
        start = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        many_lines = start + b"".join(b"X-Pad-%d: %s\r\n" % (n, b"a" * 1000) for n in range(twenty_mib // 1000))
        one_line = start + b"X-Big: " + b"a" * twenty_mib
        many_small = start + b"A: b\r\n" * 500 + b"\r\n"
        for head in (many_lines, one_line, many_small):
            answer = send_head(gateway.port, head)
            assert answer.startswith(b"HTTP/1.1 431") or answer == b"", answer[:100]
        slow = []
        for _ in range(300):  # more half-sent heads than the gateway has descriptors
            sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
            sock.sendall(start + b"X-Slow: ")
            slow.append(sock)
        try:
            wait_until(lambda: healthy(gateway.url), timeout=30, what="/healthz answering again")
            assert slow[0].recv(100).startswith(b"HTTP/1.1 408")  # the first ones were timed out
        finally:
            for sock in slow:
                sock.close()
        grown = gateway_process.memory_info().rss - before
    assert grown < 40 * 1024 * 1024, f"the gateway grew by {grown / 2**20:.0f} MiB"


def user_texts(url: str, session_id: str) -> list[str]:
    messages = httpx.get(messages_url(url, session_id), timeout=5).json()["messages"]
    return [message["text"] for message in messages if message["role"] == "user"]


def test_a_queued_message_whose_client_left_gives_up_its_place_and_never_runs(
    tmp_path: Path, storage_url: str
) -> None:
    config = {"backend": {"url": storage_url}, "rateLimits": NO_RATE_LIMITS,
              "lane": {"mode": "queue", "queueCap": 2, "queueWaitMs": 30_000},
              "providers": [{"id": "slow", "type": "echo", "delayMs": 1500}]}
    with GatewayProcess(tmp_path / "data", config) as gateway, httpx.Client(timeout=20) as client:
        url = messages_url(gateway.url, "queued")
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, url, json={"text": "first"})
            time.sleep(0.3)
            for text in ("gone-1", "gone-2"):  # they wait in the queue, then their clients give up
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(url, json={"text": text}, timeout=httpx.Timeout(20, read=0.3))
            live = pool.submit(client.post, url, json={"text": "live"})
            assert first.result().status_code == 200
            assert live.result().status_code == 200, live.result().text  # not queue-full: the places were given up
        assert user_texts(gateway.url, "queued") == ["first", "live"]


def test_a_failed_append_leaves_the_transcript_as_before_and_answers_storage_failed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with GatewayProcess(data) as gateway, httpx.Client(timeout=10) as client:
        url = messages_url(gateway.url, "full")
        assert client.post(url, json={"text": "kept"}).status_code == 200
        path = data / "sessions" / "full.jsonl"
        before = path.read_bytes()
        # Python ignores SIGXFSZ: a write past the limit fails with EFBIG, part-way (the user line fits, the reply not)
        resource.prlimit(gateway.pid, resource.RLIMIT_FSIZE, (len(before) + 30_000, resource.RLIM_INFINITY))
        big = {"text": "x" * 20_000}
        answers = [client.post(url, json=big), client.post(url, json=big, headers={"Idempotency-Key": "k-1"}),
                   client.post(url, json=big, headers={"Idempotency-Key": "k-1"})]
        during = client.get(f"{gateway.url}/readyz")
        after_failures = path.read_bytes()
        resource.prlimit(gateway.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        retried = client.post(url, json=big, headers={"Idempotency-Key": "k-1"})
        ready = client.get(f"{gateway.url}/readyz")
        texts = user_texts(gateway.url, "full")
    for answer in answers:  # with or without a key, and a retry of the key: the same answer, none stored
        assert answer.status_code == 507, answer.status_code
        assert_problem(answer, 507, "storage-failed")
    assert after_failures == before  # not one byte of the failed turns
    assert_problem(during, 507, "storage-failed")
    assert (retried.status_code, ready.status_code) == (200, 200)
    assert texts == ["kept", big["text"]]


def test_a_page_on_another_site_can_neither_drive_nor_read_an_open_gateway(tmp_path: Path) -> None:
    evil, friend = "https://evil.example", "https://friend.example"
    config = {"server": {"corsOrigins": [friend]}}
    with GatewayProcess(tmp_path / "data", config) as gateway, httpx.Client(timeout=10) as client:
        url = messages_url(gateway.url, "victim")
        simple = client.post(url, content='{"text": "from evil"}',  # a CORS "simple" request: no preflight
                             headers={"Content-Type": "text/plain", "Origin": evil})
        cross_site = client.post(url, json={"text": "from evil"},
                                 headers={"Origin": evil, "Sec-Fetch-Site": "cross-site"})
        old_browser = client.post(url, json={"text": "from evil"}, headers={"Origin": evil})
        read = client.get(url, headers={"Origin": evil})
        preflight = client.options(url, headers={"Origin": evil, "Access-Control-Request-Method": "POST"})
        same_origin = client.post(url, json={"text": "webchat"},
                                  headers={"Origin": gateway.url, "Sec-Fetch-Site": "same-origin"})
        allowed = client.post(url, json={"text": "friend"}, headers={"Origin": friend, "Sec-Fetch-Site": "cross-site"})
        script = client.post(url, json={"text": "curl"})  # no browser headers: an API client
        not_json = client.post(url, content='{"text": "plain"}', headers={"Content-Type": "text/plain"})
        texts = user_texts(gateway.url, "victim")
    for refused in (simple, cross_site, old_browser):
        assert refused.status_code in (403, 415), refused.text
    assert_problem(cross_site, 403, "forbidden")
    assert_problem(not_json, 415, "unsupported-media-type")
    assert "access-control-allow-origin" not in read.headers
    assert "access-control-allow-origin" not in preflight.headers
    assert (same_origin.status_code, allowed.status_code, script.status_code) == (200, 200, 200)
    assert allowed.headers["access-control-allow-origin"] == friend
    assert texts == ["webchat", "friend", "curl"]


def test_per_sender_limits_whoever_provably_sends_behind_a_trusted_proxy_or_not(tmp_path: Path) -> None:
    limits = {"perSession": None, "perSender": "2/minute"}
    behind_proxy = {"rateLimits": limits, "server": {"trustedProxies": ["127.0.0.1/32"]}}
    exposed = {"rateLimits": limits}  # the peer (this test, 127.0.0.1) is nobody's proxy

    def statuses(url: str, sends: list[tuple[str | None, str]]) -> list[int]:
        answers = []
        for number, (forwarded_for, sender) in enumerate(sends):
            headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
            answer = httpx.post(messages_url(url, f"s{number}"), json={"text": "hi", "sender": sender},
                                headers=headers, timeout=10)
            answers.append(answer.status_code)
        return answers

    with GatewayProcess(tmp_path / "a", behind_proxy) as proxied, GatewayProcess(tmp_path / "b", exposed) as direct:
        # two users behind the proxy: a bucket each; naming another sender in the body changes nothing
        assert statuses(proxied.url, [("203.0.113.1", "ann"), ("203.0.113.1", "bob"), ("203.0.113.1", "cy"),
                                      ("203.0.113.2", "ann"), ("203.0.113.2", "ann")]) == [200, 200, 429, 200, 200]
        # an untrusted peer's X-Forwarded-For and body sender are ignored: one client, one bucket
        assert statuses(direct.url, [("203.0.113.1", "a"), ("203.0.113.2", "b"), ("203.0.113.3", "c"),
                                     (None, "d")]) == [200, 200, 429, 429]


def test_every_valid_id_works_long_or_differing_only_in_case_and_old_names_stay_readable(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sessions").mkdir(parents=True)
    old = '{"id":"o1","role":"user","text":"from before","at":"2026-01-01T00:00:00.000Z","fence":null}\n'
    (data / "sessions" / "Legacy.jsonl").write_text(old)  # the name an upper-case id had before case-safe names
    long_id = "u@x:" * 32  # 128 valid characters, 352 once escaped
    with GatewayProcess(data) as gateway, httpx.Client(timeout=10) as client:
        for session_id in (long_id, "Chat", "chat", "Legacy"):
            answer = client.post(messages_url(gateway.url, session_id), json={"text": f"to {session_id}"})
            assert answer.status_code == 200, answer.text[:300]
        texts = {session_id: user_texts(gateway.url, session_id) for session_id in (long_id, "Chat", "chat", "Legacy")}
    assert texts == {long_id: [f"to {long_id}"], "Chat": ["to Chat"], "chat": ["to chat"],
                     "Legacy": ["from before", "to Legacy"]}
    names = [path.name for path in (data / "sessions").iterdir()]
    assert max(len(name.encode()) for name in names) < 255
    assert len({name.lower() for name in names}) == len(names)  # no two files a case-insensitive disk would merge
    doctor = run_cli("doctor", "--data-dir", str(data))  # the operator CLI finds every session by its id
    assert "transcripts: 4 sessions, 9 records, all parse" in doctor.stdout, doctor.stdout + doctor.stderr


def test_the_operator_commands_say_when_they_look_at_a_data_dir_where_nothing_ran(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    listed = run_cli("locks", "list", "--data-dir", str(missing))
    checked = run_cli("doctor", "--data-dir", str(missing))
    assert listed.returncode != 0 and "no data dir" in listed.stderr, listed.stdout + listed.stderr
    assert checked.returncode != 0 and "fail  data dir" in checked.stdout, checked.stdout
    assert "no locks held" not in listed.stdout + checked.stdout
    assert not missing.exists()  # neither made an empty one


def test_doctor_warns_when_channels_are_on_and_the_sessions_api_is_open_to_the_network(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    channels = {"telegram": {"secretToken": "s3cret"}}
    for config, level in (({"channels": channels, "server": {"host": "0.0.0.0"}}, "warn"),
                          ({"channels": channels, "server": {"host": "0.0.0.0"}, "auth": {"tokens": ["t"]}}, "ok"),
                          ({"channels": channels, "server": {"host": "127.0.0.1"}}, "ok")):
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        result = run_cli("doctor", "--config", str(path), "--data-dir", str(tmp_path / "data"))
        (auth,) = [line for line in result.stdout.splitlines() if line[6:].startswith("auth:")]
        assert auth.startswith(level), auth
