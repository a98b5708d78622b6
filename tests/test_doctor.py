"""``sessiongate doctor``, run as a subprocess: one line per check, exit codes scripts can use."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

from sessiongate import FileTranscriptStore, Settings, open_backend
from tests.support import free_port, run_cli


def doctor(tmp_path: Path, config: dict | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config or {}))
    (tmp_path / "data").mkdir(exist_ok=True)  # where a gateway has run
    return run_cli("doctor", "--config", str(config_path), "--data-dir", str(tmp_path / "data"), env=env)


def levels(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """``{check name: level}`` from the output lines ``<level> <name>: <message>``."""
    return {line[6:].split(":", 1)[0]: line.split()[0] for line in result.stdout.splitlines()}


def transcript_path(data_dir: Path, session_id: str) -> Path:
    settings = Settings(data_dir=data_dir)

    async def path() -> Path:
        backend = open_backend(settings)
        try:
            return FileTranscriptStore(backend, settings).path_for(session_id)
        finally:
            await backend.aclose()

    return asyncio.run(path())


def test_fresh_data_dir_is_all_ok(tmp_path: Path) -> None:
    result = doctor(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert levels(result) == {
        "config": "ok", "data dir": "ok", "backend": "ok", "locks": "ok", "transcripts": "ok", "durability": "ok",
        "provider": "ok", "auth": "ok",
    }


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    out_of_range = doctor(tmp_path, {"sessionWriteLock": {"timeoutMs": -5}})
    assert out_of_range.returncode == 2
    assert out_of_range.stdout.startswith("fail  config: sessionWriteLock.timeoutMs")

    unknown = doctor(tmp_path, {"lane": {"mode": "reject", "maxWait": 5}})
    assert unknown.returncode == 2 and "lane.maxWait: unknown key" in unknown.stdout

    from_env = doctor(tmp_path, SESSIONGATE_CONTENTION__STATUS="418")
    assert from_env.returncode == 2
    assert "contention.status" in from_env.stdout and "SESSIONGATE_CONTENTION__STATUS" in from_env.stdout


def test_unreachable_redis_backend_is_a_fail_line(tmp_path: Path) -> None:
    result = doctor(tmp_path, {"backend": {"url": f"redis://127.0.0.1:{free_port()}/15"}})
    assert result.returncode == 1
    assert levels(result)["backend"] == "fail"
    assert "unreachable" in next(line for line in result.stdout.splitlines() if " backend:" in line)


def test_transcripts_that_do_not_parse_fail_and_torn_tails_warn(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    torn = transcript_path(data_dir, "chat:torn")
    torn.write_text('{"id": "1", "role": "user", "text": "hi"}\n{"id": "2", "ro')
    assert doctor(tmp_path).returncode == 0
    assert levels(doctor(tmp_path))["transcripts"] == "warn"

    transcript_path(data_dir, "chat:broken").write_text('{"id": "1"}\nnot json at all\n{"id": "3"}\n')
    result = doctor(tmp_path)
    assert result.returncode == 1
    line = next(line for line in result.stdout.splitlines() if " transcripts:" in line)
    assert line.startswith("fail") and "chat%3Abroken" in line


def test_missing_provider_key_is_a_warning(tmp_path: Path) -> None:
    config = {"providers": [{"id": "main", "type": "openai", "baseUrl": "http://127.0.0.1:9", "apiKeyEnv": "NOPE_KEY"}]}
    result = doctor(tmp_path, config)
    assert result.returncode == 0
    assert "warn  provider: main (openai): $NOPE_KEY is not set" in result.stdout
