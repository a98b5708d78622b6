"""``GET /metrics`` on a real gateway: every series of the contract is there, and moves with traffic.

The traffic is chosen to touch each series: a turn through a broken provider
that fails over to echo (provider calls and failures, lane wait, write-lock
hold), concurrent messages for one session (a 409 ``session-busy``), a spent
per-session quota (``rate-limited``), and a lane left by a ``kill -9``'d holder
(a ``dead-pid`` takeover).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import GatewayProcess, free_port, metric_delta, metric_value, scrape_metrics
from tests.workers import HolderProcess

TURN_MS = 600
SERIES = {
    "sessiongate_lane_wait_seconds": "histogram",
    "sessiongate_write_lock_wait_seconds": "histogram",
    "sessiongate_write_lock_hold_seconds": "histogram",
    "sessiongate_turn_seconds": "histogram",
    "sessiongate_contention_answers": "counter",
    "sessiongate_queue_depth": "gauge",
    "sessiongate_takeovers": "counter",
    "sessiongate_fencing_refusals": "counter",
    "sessiongate_provider_calls": "counter",
    "sessiongate_provider_failures": "counter",
}


def gateway_config() -> dict:
    return {
        "providers": [
            {"id": "broken", "type": "openai", "baseUrl": f"http://127.0.0.1:{free_port()}", "timeoutMs": 2000},
            {"id": "echo", "type": "echo", "delayMs": TURN_MS},
        ],
        "rateLimits": {"perSession": "4/minute", "perSender": "1000/minute"},
    }


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with GatewayProcess(tmp_path_factory.mktemp("metrics") / "data", gateway_config()) as process:
        yield process


def post(gateway: GatewayProcess, session_id: str, text: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/sessions/{session_id}/messages", json={"text": text},
                      headers={"Idempotency-Key": uuid.uuid4().hex}, timeout=30)


def concurrent_posts(gateway: GatewayProcess, session_id: str, count: int) -> list[int]:
    statuses: list[int] = []
    barrier = threading.Barrier(count)

    def one(number: int) -> None:
        barrier.wait(timeout=10)
        statuses.append(post(gateway, session_id, f"concurrent {number}").status_code)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return sorted(statuses)


def test_every_series_is_exposed(gateway: GatewayProcess) -> None:
    families, _ = scrape_metrics(gateway.url)
    missing = {name: kind for name, kind in SERIES.items() if families.get(name) != kind}
    assert not missing, f"missing or mistyped series: {missing}"


def test_series_move_with_traffic(gateway: GatewayProcess, tmp_path: Path) -> None:
    _, before = scrape_metrics(gateway.url)

    assert post(gateway, "metrics:failover", "hello").json()["reply"]["provider"] == "echo"
    statuses = concurrent_posts(gateway, "metrics:busy", 3)
    assert 200 in statuses and 409 in statuses, statuses
    quota = [post(gateway, "metrics:quota", f"m{n}").status_code for n in range(5)]
    assert quota[-1] == 429, quota

    holder = HolderProcess(gateway.data_dir, "lane", "metrics:dead")
    holder.kill()
    assert post(gateway, "metrics:dead", "after the crash").status_code == 200

    _, after = scrape_metrics(gateway.url)

    assert metric_delta(before, after, "sessiongate_lane_wait_seconds_count") >= 4
    assert metric_delta(before, after, "sessiongate_write_lock_hold_seconds_count") >= 4
    assert metric_delta(before, after, "sessiongate_turn_seconds_count") >= 4
    assert metric_delta(before, after, "sessiongate_contention_answers_total", type="session-busy") >= 1
    assert metric_delta(before, after, "sessiongate_contention_answers_total", type="rate-limited") >= 1
    assert metric_delta(before, after, "sessiongate_provider_calls_total", provider="broken", outcome="error") >= 1
    assert metric_delta(before, after, "sessiongate_provider_calls_total", provider="echo", outcome="ok") >= 1
    assert metric_delta(before, after, "sessiongate_provider_failures_total", provider="broken") >= 1
    # contention is no provider error
    assert metric_delta(before, after, "sessiongate_provider_failures_total", provider="echo") == 0
    assert metric_delta(before, after, "sessiongate_takeovers_total", kind="lane", reason="dead-pid") == 1
    assert metric_value(after, "sessiongate_queue_depth") == 0
    assert metric_value(after, "sessiongate_fencing_refusals_total") == 0


def test_counts_add_up_across_workers(tmp_path: Path) -> None:
    """Under ``--workers 2`` every scrape reports the sum of both workers, whichever one answers."""
    config = {"providers": [{"id": "echo", "type": "echo"}]}
    with GatewayProcess(tmp_path / "data", config, extra_args=["--workers", "2"]) as gateway:
        sent = 12
        for number in range(sent):
            assert post(gateway, f"workers:{number}", "hi").status_code == 200
        for _ in range(4):  # the scrapes land on either worker
            _, samples = scrape_metrics(gateway.url)
            assert metric_value(samples, "sessiongate_provider_calls_total", provider="echo", outcome="ok") == sent
