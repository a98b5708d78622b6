"""Fixtures shared by the whole suite."""

from __future__ import annotations

import pytest
import redis

from tests.support import REDIS_URL


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def redis_url() -> str:
    """A clean Redis database (db 15) on the local server; fails (never skips) when Redis is down."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {REDIS_URL} is required for this test and is not reachable: {exc}")
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


STORAGE_URLS = ("memory://", "file://", "redis")


@pytest.fixture(params=STORAGE_URLS)
def storage_url(request: pytest.FixtureRequest) -> str:
    """Each storage in turn; Redis through the ``redis_url`` fixture (fails if Redis is down)."""
    if request.param == "redis":
        return request.getfixturevalue("redis_url")
    return request.param
