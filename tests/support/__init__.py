"""Real servers for tests: uvicorn in a thread, the gateway as a separate process, Redis.

Everything binds to 127.0.0.1 on a free port and is bounded in time.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import redis
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from sessiongate._ids import file_stem
from sessiongate._problem import PROBLEM_TYPE_BASE

REPO_ROOT = Path(__file__).resolve().parents[2]
REDIS_SERVER = "redis://127.0.0.1:6379"  # the local server; tests reserve a database on it (see conftest)


PROBLEM = "application/problem+json"
NO_RATE_LIMITS = {"perSession": None, "perSender": None}  # rateLimits for tests that send many messages


def messages_url(base: str, session_id: str) -> str:
    return f"{base}/v1/sessions/{session_id}/messages"


def assert_problem(response: httpx.Response, status: int, name: str, *, session_id: str | None = None) -> dict:
    """Assert an RFC 9457 answer of the contract's type ``name`` (about ``session_id``, if given); return its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["type"] == PROBLEM_TYPE_BASE + name
    assert body["status"] == status
    assert body["title"] and body["detail"]
    if session_id is not None:
        assert body["sessionId"] == session_id
    return body


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_metrics(base: str) -> tuple[dict[str, str], Samples]:
    """``({family: type}, {(sample name, labels): value})`` from one ``GET /metrics``."""
    response = httpx.get(f"{base}/metrics", timeout=5)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        families[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return families, samples


def metric_value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (sample, sample_labels), v in samples.items() if sample == name and wanted <= sample_labels)


def metric_delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How much :func:`metric_value` moved between two scrapes."""
    return metric_value(after, name, **labels) - metric_value(before, name, **labels)


def transcript(base: str, session_id: str, *, limit: int = 1_000) -> list[dict[str, Any]]:
    """Every message of the session through the real API, in order, walking its pages (unknown session: ``[]``)."""
    pages: list[list[dict[str, Any]]] = []
    url: str | None = f"{messages_url(base, session_id)}?limit={limit}"
    while url is not None:
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200, response.text
        pages.append(response.json()["messages"])
        url = f"{base}{response.links['next']['url']}" if "next" in response.links else None
        assert len(pages) <= 10_000, "the Link rel=next chain does not end"
    return [message for page in reversed(pages) for message in page]


def write_transcript(data_dir: Path, session_id: str, count: int, *, key_at: int | None = None) -> list[str]:
    """``count`` records (user, assistant, ...) written directly as JSONL, as a long chat leaves them; their ids.

    Record ``key_at`` (a user record) carries ``idempotencyKey = "key-<key_at>"``, and its reply follows it.
    """
    sessions = data_dir / "sessions"
    sessions.mkdir(parents=True, exist_ok=True)
    ids = [f"r{number:07d}" for number in range(count)]
    with (sessions / f"{file_stem(session_id)}.jsonl").open("w", encoding="utf-8") as file:
        for first in range(0, count, 10_000):
            lines = []
            for number in range(first, min(count, first + 10_000)):
                record: dict[str, Any] = {"id": ids[number], "at": "2026-01-01T00:00:00.000Z", "fence": 1}
                if number % 2 == 0:
                    record.update(role="user", text=f"question {number}", channel="api")
                    if number == key_at:
                        record["idempotencyKey"] = f"key-{number}"
                else:
                    record.update(role="assistant", text=f"answer {number}", provider="echo", replyTo=ids[number - 1])
                lines.append(json.dumps(record, separators=(",", ":")) + "\n")
            file.writelines(lines)
    return ids


async def wait_for(predicate, timeout: float = 10.0, *, what: str = "condition") -> None:
    """The asyncio twin of :func:`wait_until`: poll ``predicate`` without blocking the loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        await asyncio.sleep(0.01)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without SESSIONGATE_* settings (a developer's shell must not leak into a test), plus ``extra``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("SESSIONGATE_")}
    return {**env, **dict(extra or {})}


def run_cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m sessiongate.gateway ARGS`` as an operator runs it: a separate process, a clean environment plus ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "sessiongate.gateway", *args], cwd=REPO_ROOT, env=clean_env(env),
        capture_output=True, text=True, timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, *, timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout} s")


class UvicornThread:
    """An ASGI app served by a real uvicorn on 127.0.0.1, in a background thread."""

    def __init__(self, app: Any, *, port: int | None = None, **uvicorn_options: Any) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on", **uvicorn_options
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=10, what="uvicorn start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class GatewayProcess:
    """``python -m sessiongate.gateway serve`` as a separate OS process, with its own config file."""

    def __init__(
        self,
        data_dir: Path,
        config: Mapping[str, Any] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = self.data_dir.parent / f"config-{self.port}.json"
        self.config_path.write_text(json.dumps(dict(config or {})))
        self.log_path = self.data_dir.parent / f"gateway-{self.port}.log"
        self.args = [
            sys.executable, "-m", "sessiongate.gateway", "serve",
            "--config", str(self.config_path),
            "--data-dir", str(self.data_dir),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            *(extra_args or []),
        ]
        self.env = clean_env(env)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, *, timeout: float = 20.0) -> GatewayProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # outside the checkout, so nothing resolves from its app/ or middleware/
            self.args, cwd=self.data_dir.parent, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

        def healthy() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log()}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=0.5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout=timeout, interval=0.05, what="gateway /healthz")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def stop(self, *, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.kill(self.process.pid, signal.SIGCONT)  # a test may have left it stopped
            except ProcessLookupError:
                pass
        self.stop()


class DedicatedRedis:
    """A throwaway ``redis-server`` on 127.0.0.1:<port>, stopped and started by the test.

    Without ``aof_dir`` it keeps nothing (a restart loses every key, as a crashed
    cache would); with it, it keeps an append-only file there with ``appendfsync``
    (a restart replays it).
    """

    def __init__(self, port: int, *, aof_dir: Path | None = None, appendfsync: str = "always") -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.persistence = ["--appendonly", "no"] if aof_dir is None else [
            "--appendonly", "yes", "--appendfsync", appendfsync, "--dir", str(aof_dir),
        ]

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *self.persistence],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            wait_until(lambda: self._pings(client), timeout=10, what=f"redis-server on port {self.port}")
        finally:
            client.close()

    @staticmethod
    def _pings(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # a crash: no goodbye to clients
            self.process.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)
