"""``sessiongate transcripts export|import``, run as subprocesses: file store -> Redis -> file store, unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import run_cli, write_transcript

KEY_PREFIX = "sgmove"


def cli(tmp_path: Path, config: dict, *args: str, data_dir: Path) -> str:
    config_path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.json"
    config_path.write_text(json.dumps(config))
    result = run_cli("transcripts", *args, "--config", str(config_path), "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.redis
def test_export_import_round_trip_file_redis_file(tmp_path: Path, redis_url: str) -> None:
    source = tmp_path / "source"
    write_transcript(source, "chat:1", 7, key_at=3)
    write_transcript(source, "web-2", 1_203)  # more than one import batch
    file_store: dict = {}
    redis_store = {"backend": {"url": redis_url, "keyPrefix": KEY_PREFIX}, "transcript": {"url": redis_url}}

    exported = cli(tmp_path, file_store, "export", data_dir=source)
    lines = exported.splitlines()
    assert len(lines) == 7 + 1_203 and json.loads(lines[0])["sessionId"] == "chat:1"

    dump = tmp_path / "dump.jsonl"
    dump.write_text(exported)
    cli(tmp_path, redis_store, "import", "--input", str(dump), data_dir=tmp_path / "unused")
    cli(tmp_path, redis_store, "import", "--input", str(dump), data_dir=tmp_path / "unused")  # again: nothing doubled
    from_redis = cli(tmp_path, redis_store, "export", data_dir=tmp_path / "unused")
    assert from_redis == exported

    back = tmp_path / "back"
    (tmp_path / "from-redis.jsonl").write_text(from_redis)
    cli(tmp_path, file_store, "import", "-i", str(tmp_path / "from-redis.jsonl"), data_dir=back)
    assert cli(tmp_path, file_store, "export", data_dir=back) == exported
    assert cli(tmp_path, file_store, "export", "--session", "chat:1", data_dir=back) == "".join(
        f"{line}\n" for line in lines[:7]
    )


def test_a_bad_import_line_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sessionId": "ok", "record": {"id": "r1", "text": "x"}}\n{"sessionId": "no/slash", "record": {}}\n')
    config = tmp_path / "config.json"
    config.write_text("{}")
    result = run_cli("transcripts", "import", "-i", str(bad), "--config", str(config), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2 and "line 2" in result.stderr
