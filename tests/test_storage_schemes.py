"""The scheme registry of ``sessiongate.storage`` is the one place that says which ``backend.url`` schemes exist.

Config validation, :func:`open_storage`, :func:`open_backend` and the rate
limits all follow it: a scheme added there is accepted and opened everywhere,
one removed is refused everywhere, and file or memory use never imports redis.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sessiongate import ConfigError, Settings, open_backend
from sessiongate._config import BackendSettings
from sessiongate._ratelimit import is_shared
from sessiongate.storage import SCHEMES, LeaseStorage, Scheme, open_storage
from sessiongate.storage.file import FileStorage
from sessiongate.storage.memory import MemoryStorage
from sessiongate.storage.redis import RedisStorage
from tests.support import REPO_ROOT, clean_env
from tests.workers import settings_for

pytestmark = pytest.mark.anyio

EXPECTED: dict[str, tuple[type[LeaseStorage], bool]] = {  # scheme -> (storage class, shared by every host)
    "file": (FileStorage, False),
    "memory": (MemoryStorage, False),
    "redis": (RedisStorage, True),
    "rediss": (RedisStorage, True),
}
URLS = {  # nothing is sent: a Redis client connects on first use
    "file": "file://",
    "memory": "memory://",
    "redis": "redis://127.0.0.1:6379/15",
    "rediss": "rediss://127.0.0.1:6379/15",
}


def test_the_registry_holds_exactly_the_documented_schemes() -> None:
    assert set(SCHEMES) == set(EXPECTED)


@pytest.mark.parametrize("scheme", sorted(EXPECTED))
async def test_every_scheme_the_config_accepts_opens_its_storage(tmp_path: Path, scheme: str) -> None:
    settings = settings_for(tmp_path, URLS[scheme])  # validated by Settings.load: accepted
    storage_class, shared = EXPECTED[scheme]
    storage = open_storage(settings)
    try:
        assert type(storage) is storage_class
        assert is_shared(settings) is shared
    finally:
        await storage.aclose()


async def test_a_scheme_registered_in_one_place_is_accepted_and_opened_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(SCHEMES, "scratch", Scheme(".memory:MemoryStorage", shared=False))
    settings = settings_for(tmp_path, "scratch://")
    backend = open_backend(settings)
    try:
        assert type(backend.storage) is MemoryStorage
        assert not is_shared(settings)
    finally:
        await backend.aclose()


def test_a_scheme_removed_from_the_registry_is_refused_by_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(SCHEMES, "memory")
    with pytest.raises(ConfigError) as error:
        settings_for(tmp_path, "memory://")
    assert error.value.key == "backend.url"
    assert "file://" in error.value.problem and "memory://" not in error.value.problem.split("(got")[0]


@pytest.mark.parametrize("url", ["ftp://x", "redis+sentinel://h:1", "127.0.0.1:6379", ""])
def test_an_unknown_scheme_is_a_config_error_naming_backend_url(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError) as error:
        settings_for(tmp_path, url)
    assert error.value.key == "backend.url"
    assert all(f"{scheme}://" in error.value.problem for scheme in SCHEMES)


def test_open_storage_refuses_an_unknown_scheme_that_skipped_validation() -> None:
    unvalidated = Settings().model_copy(update={"backend": BackendSettings.model_construct(url="ftp://x")})
    with pytest.raises(ConfigError) as error:
        open_storage(unvalidated)
    assert error.value.key == "backend.url" and "ftp://x" in str(error.value)


NO_REDIS_SCRIPT = """
import asyncio, sys
from sessiongate import Settings, open_backend
from sessiongate._ratelimit import RateLimits

async def main(data_dir):
    for url in ("file://", "memory://"):
        settings = Settings.load(env={}, overrides={"dataDir": data_dir, "backend": {"url": url}})
        backend = open_backend(settings)
        await RateLimits(settings).hit(session_id="s1", sender="10.0.0.1")
        await backend.aclose()

asyncio.run(main(sys.argv[1]))
print(sorted(m for m in sys.modules if m.split(".")[0] == "redis" or m == "sessiongate.storage.redis"))
"""


def test_file_and_memory_use_never_import_redis(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", NO_REDIS_SCRIPT, str(tmp_path)],
        cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
