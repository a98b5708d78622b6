"""Retrying client libraries against a busy session, with the settings docs/clients.md gives.

``requests`` with urllib3's ``Retry``: it honours ``Retry-After`` (whole
seconds) but retries only the statuses it is told to, and POST only when
``allowed_methods`` says so. Proves the two settings in the client table work
(``status_forcelist`` with 409; or ``contention.status: 429``, which urllib3
retries by default), and that its usual settings return the 409.

stamina with a backoff hook that returns ``retry-after-ms``, httpx with
tenacity and a wait that reads it, and the
Anthropic SDK (the same retry rules as the OpenAI SDK's: ``retry-after-ms``
first, ``x-should-retry``) on the messages API, wait the millisecond estimate.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest
import requests
import stamina
import tenacity
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from tests.fakes import serve_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.support import UvicornThread, messages_url, transcript, wait_until

TURN_S = 0.8


@pytest.fixture
def model() -> Iterator[FakeOpenAI]:
    with FakeOpenAI("model", delay_s=TURN_S) as fake:
        yield fake


def busy_gateway(tmp_path: Path, model: FakeOpenAI, **config: object) -> UvicornThread:
    return serve_gateway(tmp_path / "data", {"providers": [model.provider()], **config})


def start_first_turn(url: str, model: FakeOpenAI) -> threading.Thread:
    """Send one message in the background; return once the model runs its turn (the session is busy).

    One turn of another session finishes first, so the busy answers' estimate
    comes from turn-time history (the turn's 0.8 s, less its elapsed time);
    before any turn has finished the estimate is at least 1 s (docs/gate.md).
    """
    warm_up = url.rsplit("/", 1)[0] + "-warm-up/messages"
    assert requests.post(warm_up, json={"text": "warm-up"}, timeout=10).status_code == 200
    calls = model.calls
    first = threading.Thread(target=requests.post, args=(url,), kwargs={"json": {"text": "first"}, "timeout": 10})
    first.start()
    wait_until(lambda: model.calls == calls + 1, timeout=10, what="the first turn to reach the model")
    return first


def post_while_busy(url: str, model: FakeOpenAI, retry: Retry) -> requests.Response:
    """Start one turn, and once the model runs it, POST a second message through ``retry``."""
    first = start_first_turn(url, model)
    with requests.Session() as session:
        session.mount("http://", HTTPAdapter(max_retries=retry))
        response = session.post(url, json={"text": "second"}, headers={"Idempotency-Key": "urllib3-second"},
                                timeout=10)
    first.join(timeout=10)
    return response


def user_texts(base: str, session_id: str) -> list[str]:
    return [m["text"] for m in transcript(base, session_id) if m["role"] == "user"]


def retried_statuses(response: requests.Response) -> list[int | None]:
    return [attempt.status for attempt in response.raw.retries.history]


URLLIB3_SETTINGS = {  # id -> (Retry, gateway config, the busy status it retries)
    "status_forcelist with 409": (
        Retry(total=10, status_forcelist={409, 429, 503}, allowed_methods=None, backoff_factor=0.1), {}, 409),
    "contention.status 429, urllib3 defaults but POST allowed": (  # 429 + Retry-After: RETRY_AFTER_STATUS_CODES
        Retry(total=10, allowed_methods=None), {"contention": {"status": 429}}, 429),
}


@pytest.mark.parametrize(("retry", "config", "busy_status"), URLLIB3_SETTINGS.values(), ids=URLLIB3_SETTINGS)
def test_urllib3_retry_with_the_documented_settings_waits_and_is_served(
    tmp_path: Path, model: FakeOpenAI, retry: Retry, config: dict, busy_status: int
) -> None:
    with busy_gateway(tmp_path, model, **config) as server:
        response = post_while_busy(messages_url(server.url, "urllib3"), model, retry)
        stored = user_texts(server.url, "urllib3")
    assert response.status_code == 200, response.text
    assert busy_status in retried_statuses(response)
    assert stored == ["first", "second"]


def test_urllib3_usual_settings_do_not_retry_a_409(tmp_path: Path, model: FakeOpenAI) -> None:
    with busy_gateway(tmp_path, model) as server:
        response = post_while_busy(messages_url(server.url, "urllib3-usual"), model, Retry(total=10))
    assert response.status_code == 409  # why docs/clients.md names status_forcelist or contention.status: 429


def test_stamina_with_a_retry_after_ms_backoff_hook_waits_the_estimate(tmp_path: Path, model: FakeOpenAI) -> None:
    waits: list[float] = []

    def busy_backoff(error: Exception) -> bool | float:
        """Retry what the gateway marks retryable, after its estimate in ms; nothing else."""
        if not isinstance(error, httpx.HTTPStatusError) or error.response.headers.get("x-should-retry") != "true":
            return False
        waits.append(int(error.response.headers["retry-after-ms"]) / 1000)
        return waits[-1]

    @stamina.retry(on=busy_backoff, attempts=10, timeout=30)
    def send(url: str) -> dict:
        response = httpx.post(url, json={"text": "second"}, headers={"Idempotency-Key": "stamina-second"}, timeout=10)
        response.raise_for_status()
        return response.json()

    with busy_gateway(tmp_path, model) as server:
        url = messages_url(server.url, "stamina")
        first = start_first_turn(url, model)
        answer = send(url)
        first.join(timeout=10)
        stored = user_texts(server.url, "stamina")
    assert answer["reply"]["text"] == "model: second"
    assert waits and all(0 < wait < 1.0 for wait in waits)  # the ms estimate, not whole seconds
    assert stored == ["first", "second"]


def test_the_anthropic_sdk_retries_a_busy_session_after_retry_after_ms(
    tmp_path: Path, model: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    with busy_gateway(tmp_path, model) as server:
        url = messages_url(server.url, "anthropic")
        first = start_first_turn(url, model)
        with anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=10) as client, \
                caplog.at_level(logging.INFO, logger="anthropic"):
            answer = client.post("/v1/sessions/anthropic/messages", body={"text": "second"}, cast_to=object)
        first.join(timeout=10)
        stored = user_texts(server.url, "anthropic")
    waits = [float(record.args[-1]) for record in caplog.records  # type: ignore[index]
             if record.getMessage().startswith("Retrying request")]  # "Retrying request to %s in %f seconds"
    assert answer["reply"]["text"] == "model: second"  # type: ignore[index]
    assert waits and all(wait < 1.0 for wait in waits), waits
    assert stored == ["first", "second"]


def test_httpx_with_tenacity_waiting_retry_after_ms_is_served(tmp_path: Path, model: FakeOpenAI) -> None:
    def retryable(error: BaseException) -> bool:
        return isinstance(error, httpx.HTTPStatusError) and error.response.headers.get("x-should-retry") == "true"

    def server_estimate(state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        assert isinstance(error, httpx.HTTPStatusError)
        return int(error.response.headers["retry-after-ms"]) / 1000

    waited: list[float] = []
    retrying = tenacity.Retrying(retry=tenacity.retry_if_exception(retryable), wait=server_estimate,
                                 stop=tenacity.stop_after_attempt(10) | tenacity.stop_after_delay(30),
                                 before_sleep=lambda state: waited.append(state.upcoming_sleep), reraise=True)
    with busy_gateway(tmp_path, model) as server:
        url = messages_url(server.url, "tenacity")
        first = start_first_turn(url, model)
        for attempt in retrying:
            with attempt:
                response = httpx.post(url, json={"text": "second"}, headers={"Idempotency-Key": "tenacity-second"},
                                      timeout=10)
                response.raise_for_status()
        first.join(timeout=10)
        stored = user_texts(server.url, "tenacity")
    assert response.json()["reply"]["text"] == "model: second"
    assert waited and all(0 < wait < 1.0 for wait in waited)
    assert stored == ["first", "second"]
