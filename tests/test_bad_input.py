"""Bad input never gets a 500 or a traceback: each is a 4xx problem+json, refused before the lane.

Proves: malformed JSON, wrong types, missing/blank/unknown fields, bad session
ids (``..``, spaces, 200 characters, NUL, ``/``) even sent raw on the socket,
a 2 MiB body by Content-Length and streamed without one (413), and a fuzz
of random bodies and ids (hypothesis) all get 4xx problems; the gateway
keeps serving and the transcripts hold nothing of it. Schemathesis over
``/openapi.json`` lives in ``tests/chaos/test_fuzz.py``.
"""

from __future__ import annotations

import json
import socket
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes import serve_gateway
from tests.support import PROBLEM, UvicornThread, assert_problem, messages_url

TWO_MIB = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> UvicornThread:
    with serve_gateway(tmp_path_factory.mktemp("bad") / "data") as running:
        yield running


@pytest.fixture
def client() -> httpx.Client:
    with httpx.Client(timeout=10) as client:
        yield client


@pytest.mark.parametrize(
    "body",
    [b"{", b"not json", b"", b"\xff\xfe\x00", b"[]", b'"text"', b"null", b'{"text": 1}', b'{"text": null}',
     b'{"text": ["a"]}', b'{"text": ""}', b'{"text": "   "}', b'{"sender": "x"}', b'{"text": "hi", "sender": 7}',
     b'{"text": "hi", "sender": ""}', b'{"text": "hi", "extra": true}', b'{"text": "\\ud800"}',
     b"[" * 100_000, json.dumps({"text": "x" * 40_000}).encode()],
)
def test_malformed_bodies_are_invalid_request(server: UvicornThread, client: httpx.Client, body: bytes) -> None:
    response = client.post(messages_url(server.url, "bodies"), content=body,
                           headers={"Content-Type": "application/json"})
    assert_problem(response, 400, "invalid-request")


@pytest.mark.parametrize("raw_id", ["%2E%2E", "%2E", "a%20b", "x" * 200, "a%00b", "a%2Fb", "%C3%A9t%C3%A9", "a%0Ab"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_bad_session_ids_are_refused(server: UvicornThread, client: httpx.Client, raw_id: str, method: str) -> None:
    response = client.request(method, f"{server.url}/v1/sessions/{raw_id}/messages", json={"text": "hi"})
    problem = assert_problem(response, 400, "invalid-session-id")
    assert "sessionId" not in problem  # an invalid id is never echoed back as one


def raw_request(port: int, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (no client-side path normalisation); the status and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_a_literal_dot_dot_path_never_reaches_a_transcript(server: UvicornThread) -> None:
    body = b'{"text": "escape"}'
    status, answer = raw_request(server.port, b"POST /v1/sessions/../messages HTTP/1.1\r\nHost: x\r\n"
                                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert status == 400 and json.loads(answer)["type"].endswith("invalid-session-id")


def test_two_mib_body_is_413_by_content_length(server: UvicornThread, client: httpx.Client) -> None:
    body = json.dumps({"text": "x" * TWO_MIB}).encode()
    assert_problem(client.post(messages_url(server.url, "big"), content=body), 413, "payload-too-large")


def test_two_mib_streamed_body_is_413_while_it_arrives(server: UvicornThread, client: httpx.Client) -> None:
    def chunks():
        yield b'{"text": "'
        for _ in range(32):
            yield b"x" * 65536
        yield b'"}'

    response = client.post(messages_url(server.url, "big-stream"), content=chunks(),  # chunked, no Content-Length
                           headers={"Content-Type": "application/json"})
    assert_problem(response, 413, "payload-too-large")


def test_a_bad_content_length_is_invalid_request(server: UvicornThread) -> None:
    status, answer = raw_request(server.port, b"POST /v1/sessions/cl/messages HTTP/1.1\r\nHost: x\r\n"
                                 b"Connection: close\r\nContent-Length: 12x\r\n\r\n")
    assert 400 <= status < 500  # uvicorn's parser or our check; never a 500


def test_nothing_bad_was_written_and_the_gateway_still_serves(server: UvicornThread, client: httpx.Client) -> None:
    for session in ("bodies", "big", "big-stream"):
        assert client.get(messages_url(server.url, session)).json()["messages"] == []
    assert client.post(messages_url(server.url, "fine"), json={"text": "still here"}).status_code == 200


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    session_id=st.text(st.characters(exclude_categories=["Cs"]), max_size=140),
    body=st.one_of(st.binary(max_size=300),
                   st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=30),
                                lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=3),
                                max_leaves=8).map(lambda v: json.dumps(v).encode())),
)
def test_fuzzed_requests_never_get_a_5xx(server: UvicornThread, client: httpx.Client, session_id: str,
                                         body: bytes) -> None:
    url = f"{server.url}/v1/sessions/{quote(session_id, safe='')}/messages"
    for method in ("POST", "GET"):
        response = client.request(method, url, content=body)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert response.headers["content-type"] == PROBLEM


