"""``sessiongate serve`` as users run it: real processes, real ports.

Proves: a bad config (unknown key, wrong type, out of range, not JSON, an
unusable data dir; from file, environment or flag) exits 2 before serving,
naming the key, without a traceback; ``serve`` is the default command;
``--workers 2`` serves and ``/metrics`` adds up every worker (the
multiprocess folder is removed at exit); ``server.logFormat=json`` writes JSON
lines carrying request and session ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from sessiongate.gateway.cli import with_default_command
from tests.support import GatewayProcess, free_port, messages_url, run_cli


@pytest.mark.parametrize(
    ("config", "env", "flags", "key"),
    [
        ({"sessionWriteLock": {"timeoutMs": 100, "bogus": 1}}, {}, [], "sessionWriteLock.bogus"),
        ({"lane": {"mode": "sometimes"}}, {}, [], "lane.mode"),
        ({}, {"SESSIONGATE_SESSION_WRITE_LOCK__TIMEOUT_MS": "soon"}, [], "sessionWriteLock.timeoutMs"),
        ({}, {}, ["--port", "70000"], "server.port"),
        ({"providers": [{"id": "x", "type": "openai"}]}, {}, [], "providers.0"),
        ("{not json", {}, [], "(file)"),
        ({}, {}, ["--data-dir", "DATA_UNDER_A_FILE"], "dataDir"),
    ],
)
def test_a_bad_config_exits_2_naming_the_key_without_traceback(
    tmp_path: Path, config: object, env: dict[str, str], flags: list[str], key: str
) -> None:
    path = tmp_path / "config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    flags = [str(path / "data") if flag == "DATA_UNDER_A_FILE" else flag for flag in flags]
    result = run_cli("--config", str(path), "--port", str(free_port()), *flags, env=env)  # no "serve": the default
    assert result.returncode == 2, result.stderr
    assert key in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "Uvicorn running" not in result.stderr


def test_serve_is_the_default_command() -> None:
    assert with_default_command([]) == ["serve"]
    assert with_default_command(["--port", "1"]) == ["serve", "--port", "1"]
    assert with_default_command(["serve", "--port", "1"]) == ["serve", "--port", "1"]
    assert with_default_command(["--help"]) == ["--help"]
    assert "serve" in run_cli("--help").stdout


def test_two_workers_serve_and_metrics_add_up(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with GatewayProcess(data, {}, extra_args=["--workers", "2"]) as gateway, httpx.Client(timeout=10) as client:
        answers = [client.post(messages_url(gateway.url, f"w{i}"), json={"text": f"m{i}"}) for i in range(6)]
        scrapes = [client.get(f"{gateway.url}/metrics").text for _ in range(3)]
        metrics_dirs = list((data / "metrics").iterdir())
    assert [a.status_code for a in answers] == [200] * 6
    assert len(metrics_dirs) == 1
    for scrape in scrapes:  # whichever worker answers, it counts every worker's calls
        assert 'sessiongate_provider_calls_total{outcome="ok",provider="echo"} 6.0' in scrape
    assert list((data / "metrics").iterdir()) == []  # removed at exit


def test_json_logs_carry_request_and_session_ids(tmp_path: Path) -> None:
    with GatewayProcess(tmp_path / "data", {"server": {"logFormat": "json"}}) as gateway:
        httpx.post(messages_url(gateway.url, "logged"), json={"text": "hi"}, headers={"X-Request-Id": "req-77"},
                   timeout=10)
    lines = [json.loads(line) for line in gateway.log().splitlines() if line.strip()]
    request_line = next(line for line in lines if line.get("requestId") == "req-77")
    assert request_line["sessionId"] == "logged"
    assert request_line["status"] == 200 and request_line["method"] == "POST"
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
