"""``sessiongate locks list|inspect|clean`` against real holders in other processes.

Each holder is a separate Python process that takes a lease through the real
file storage and renews it (the heartbeat) until it is killed or stopped. The
CLI runs as a subprocess (``python -m sessiongate.gateway locks ...``), as an operator would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import free_port, run_cli, wait_until
from tests.workers import HOLDER_STALE_MS, HolderProcess, settings_for, spawn

STALE_MS = HOLDER_STALE_MS

@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"sessionWriteLock": {"staleMs": STALE_MS}}))
    return path

@pytest.fixture
def holders(data_dir: Path) -> Iterator[list[HolderProcess]]:
    started: list[HolderProcess] = []
    yield started
    for holder in started:
        holder.stop()

def hold(holders: list[HolderProcess], data_dir: Path, kind: str, session_id: str, **options) -> HolderProcess:
    holder = HolderProcess(data_dir, kind, session_id, **options)
    holders.append(holder)
    return holder

def locks(data_dir: Path, *args: str, backend_url: str = "file://") -> subprocess.CompletedProcess[str]:
    action, *rest = args
    return run_cli(
        "locks", action, "--config", str(data_dir.parent / "config.json"), "--data-dir", str(data_dir), *rest,
        env={"SESSIONGATE_BACKEND__URL": backend_url}, timeout=30,
    )

def states(data_dir: Path, **options: str) -> dict[tuple[str, str], str]:
    result = locks(data_dir, "list", "--json", **options)
    assert result.returncode in (0, 1), result.stderr
    return {(h["sessionId"], h["kind"]): h["state"] for h in json.loads(result.stdout)}

def test_killed_holder_is_listed_dead_and_only_it_is_cleaned(data_dir: Path, holders: list[HolderProcess]) -> None:
    dead = hold(holders, data_dir, "lane", "chat:dead")
    hold(holders, data_dir, "write", "chat:dead")
    live = hold(holders, data_dir, "lane", "chat:live")
    dead_pid = dead.process.pid
    dead.kill()
    holders[1].kill()

    listing = locks(data_dir, "list")
    assert listing.returncode == 1, listing.stderr  # dead holders present
    row = next(line for line in listing.stdout.splitlines() if line.startswith("chat:dead") and " lane " in line)
    assert "dead-pid" in row and str(dead_pid) in row
    assert states(data_dir) == {
        ("chat:dead", "lane"): "dead-pid",
        ("chat:dead", "write"): "dead-pid",
        ("chat:live", "lane"): "live",
    }

    dry = locks(data_dir, "clean", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("would remove") == 2 and "chat:live" not in dry.stdout
    assert states(data_dir)[("chat:dead", "lane")] == "dead-pid", "--dry-run changed something"

    clean = locks(data_dir, "clean")
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.count("removed") == 2 and "chat:live" not in clean.stdout
    assert states(data_dir) == {("chat:live", "lane"): "live"}
    assert locks(data_dir, "list").returncode == 0

    assert live.process.poll() is None
    inspect = locks(data_dir, "inspect", "chat:live", "--json")
    assert inspect.returncode == 0, inspect.stderr
    report = json.loads(inspect.stdout)
    assert report["holders"]["lane"]["pid"] == live.process.pid
    assert report["holders"]["lane"]["state"] == "live"
    assert report["fence"] >= 1 and report["holders"]["write"] is None

def test_stopped_holder_turns_stale_and_loses_its_lease_to_clean(
    data_dir: Path, holders: list[HolderProcess]
) -> None:
    frozen = hold(holders, data_dir, "lane", "chat:frozen")
    assert states(data_dir)[("chat:frozen", "lane")] == "live"
    os.kill(frozen.process.pid, signal.SIGSTOP)
    wait_until(lambda: states(data_dir)[("chat:frozen", "lane")] == "stale",
               timeout=STALE_MS / 1000 + 5, interval=0.2, what="the stopped holder reads stale")

    clean = locks(data_dir, "clean")
    assert clean.returncode == 0 and "removed lane lock of chat:frozen (stale" in clean.stdout
    assert states(data_dir) == {}

    os.kill(frozen.process.pid, signal.SIGCONT)
    assert frozen.next_line() == "lost"  # its next heartbeat finds the lease gone

def test_inspect_text_and_usage_errors(data_dir: Path, holders: list[HolderProcess]) -> None:
    holder = hold(holders, data_dir, "lane", "chat:inspect")
    text = locks(data_dir, "inspect", "chat:inspect")
    assert text.returncode == 0, text.stderr
    assert f"live: pid {holder.process.pid}" in text.stdout
    assert "transcript" in text.stdout and "(none yet)" in text.stdout

    assert locks(data_dir, "inspect", "../etc/passwd").returncode == 2
    (data_dir.parent / "config.json").write_text(json.dumps({"sessionWriteLock": {"staleMs": "soon"}}))
    bad = locks(data_dir, "list")
    assert bad.returncode == 2 and "sessionWriteLock.staleMs" in bad.stderr

@pytest.mark.redis
def test_redis_backend_dead_holder_is_listed_and_cleaned(
    data_dir: Path, holders: list[HolderProcess], redis_url: str
) -> None:
    """Redis leases expire after staleMs by themselves; with a long one, clean removes a dead holder first."""
    stale_ms = 60_000
    (data_dir.parent / "config.json").write_text(json.dumps({"sessionWriteLock": {"staleMs": stale_ms}}))
    dead = hold(holders, data_dir, "lane", "chat:redis-dead", backend_url=redis_url, stale_ms=stale_ms)
    hold(holders, data_dir, "lane", "chat:redis-live", backend_url=redis_url, stale_ms=stale_ms)
    dead.kill()
    assert states(data_dir, backend_url=redis_url) == {
        ("chat:redis-dead", "lane"): "dead-pid",
        ("chat:redis-live", "lane"): "live",
    }
    clean = locks(data_dir, "clean", backend_url=redis_url)
    assert clean.returncode == 0 and "removed lane lock of chat:redis-dead" in clean.stdout
    assert states(data_dir, backend_url=redis_url) == {("chat:redis-live", "lane"): "live"}

def test_unreachable_backend_exits_3(data_dir: Path) -> None:
    result = locks(data_dir, "list", backend_url=f"redis://127.0.0.1:{free_port()}/15")
    assert result.returncode == 3 and "unreachable" in result.stderr


def test_inspect_counts_the_waiters_in_the_session_queue(data_dir: Path, holders: list[HolderProcess]) -> None:
    hold(holders, data_dir, "lane", "chat:queued")
    settings = settings_for(data_dir, sessionWriteLock={"staleMs": STALE_MS}, lane={"mode": "queue", "queueWaitMs": 30_000})
    waiter = spawn("queue", settings, "chat:queued", "w", data_dir.parent / "served.txt")
    try:
        def queued() -> int:
            return json.loads(locks(data_dir, "inspect", "chat:queued", "--json").stdout)["queued"]

        wait_until(lambda: queued() == 1, timeout=20, interval=0.2, what="one waiter queued")
        assert "queue       1 waiting" in locks(data_dir, "inspect", "chat:queued").stdout
    finally:
        waiter.kill()
        waiter.communicate(timeout=10)
    assert queued() == 0  # a killed waiter holds no place
