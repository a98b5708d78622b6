"""GatewaySettings: CLI > environment > file > default, and errors that name the key and its source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sessiongate._errors import ConfigError
from sessiongate.gateway.settings import GatewaySettings


def _file(tmp_path: Path, values: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    return path


def test_defaults_run_as_is() -> None:
    settings = GatewaySettings.load(env={})
    assert settings.session_write_lock.timeout_ms == 2_000
    assert settings.lane.mode == "reject" and settings.lane.max_wait_ms == 0
    assert settings.backend.url == "file://" and settings.transcript.fsync == "always"
    assert [p.type for p in settings.providers] == ["echo"]
    assert settings.sessions_dir == Path("data/sessions")


def test_precedence_cli_over_env_over_file_over_default(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        {
            "dataDir": "/from-file",
            "sessionWriteLock": {"timeoutMs": 111, "staleMs": 5_000},
            "lane": {"mode": "queue", "queueCap": 3},
        },
    )
    env = {
        "SESSIONGATE_SESSION_WRITE_LOCK__TIMEOUT_MS": "222",
        "SESSIONGATE_LANE__QUEUE_CAP": "4",
        "SESSIONGATE_DATA_DIR": "/from-env",
    }
    settings = GatewaySettings.load(path, env=env, overrides={"dataDir": "/from-cli"})
    assert settings.data_dir == Path("/from-cli")  # CLI beats env and file
    assert settings.session_write_lock.timeout_ms == 222  # env beats file
    assert settings.session_write_lock.stale_ms == 5_000  # file beats default, siblings kept
    assert settings.lane.queue_cap == 4 and settings.lane.mode == "queue"
    assert settings.lane.max_wait_ms == 0  # default
    assert settings.contention.status == 409


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = _file(tmp_path, {"contention": {"status": 429}})
    assert GatewaySettings.load(env={"SESSIONGATE_CONFIG": str(path)}).contention.status == 429


def test_env_json_values_for_lists(tmp_path: Path) -> None:
    settings = GatewaySettings.load(env={"SESSIONGATE_AUTH__TOKENS": '["a", "b"]'})
    assert settings.auth.tokens == ["a", "b"]


@pytest.mark.parametrize(
    ("file_values", "env", "key", "problem", "source"),
    [
        ({"lane": {"maxWait": 5}}, {}, "lane.maxWait", "unknown key", "config.json"),
        ({}, {"SESSIONGATE_LANE__MAX_WAIT": "5"}, "lane.maxWait", "unknown key", "SESSIONGATE_LANE__MAX_WAIT"),
        ({"sessionWriteLock": {"timeoutMs": "soon"}}, {}, "sessionWriteLock.timeoutMs", "integer", "config.json"),
        ({}, {"SESSIONGATE_SESSION_WRITE_LOCK__STALE_MS": "5"}, "sessionWriteLock.staleMs", "greater than", "SESSIONGATE_SESSION_WRITE_LOCK__STALE_MS"),  # noqa: E501
        ({"lane": {"queueCap": 0}}, {}, "lane.queueCap", "greater than", "config.json"),
        ({"lane": {"mode": "drop"}}, {}, "lane.mode", "'reject' or 'queue'", "config.json"),
        ({"contention": {"status": 500}}, {}, "contention.status", "409", "config.json"),
        ({"rateLimits": {"perSession": "lots"}}, {}, "rateLimits.perSession", "limits rate string", "config.json"),
        ({"providers": [{"id": "o", "type": "openai"}]}, {}, "providers.0", "baseUrl", "config.json"),
        ({"backend": {"url": "ftp://x"}}, {}, "backend.url", "redis://", "config.json"),
    ],
)
def test_errors_name_key_problem_and_source(
    tmp_path: Path, file_values: dict, env: dict, key: str, problem: str, source: str
) -> None:
    with pytest.raises(ConfigError) as error:
        GatewaySettings.load(_file(tmp_path, file_values), env=env)
    assert error.value.key == key
    assert problem in error.value.problem
    assert source in (error.value.source or "")
    assert key in str(error.value) and source in str(error.value)


def test_cli_errors_name_the_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        GatewaySettings.load(env={}, overrides={"server": {"port": 70_000}})
    assert error.value.key == "server.port" and error.value.source == "the command line"


def test_bad_json_file_names_line_and_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"lane": {"mode": "queue",}}')
    with pytest.raises(ConfigError) as error:
        GatewaySettings.load(path, env={})
    assert "not valid JSON at line 1" in error.value.problem and error.value.source == str(path)


def test_missing_file_and_non_object_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        GatewaySettings.load(tmp_path / "nope.json", env={})
    assert "cannot read" in missing.value.problem and "nope.json" in str(missing.value)
    with pytest.raises(ConfigError) as not_object:
        GatewaySettings.load(_file(tmp_path, [1, 2]), env={})
    assert "JSON object" in not_object.value.problem


def test_bad_json_in_environment_value() -> None:
    with pytest.raises(ConfigError) as error:
        GatewaySettings.load(env={"SESSIONGATE_AUTH__TOKENS": "[oops"})
    assert error.value.key == "auth.tokens" and error.value.source == "SESSIONGATE_AUTH__TOKENS"
