"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from tests.fakes.slack_api import BOT_TOKEN as SLACK_BOT_TOKEN
from tests.fakes.slack_api import FakeSlackApi
from tests.fakes.telegram_api import FakeTelegramApi
from tests.support import REDIS_SERVER, UvicornThread


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


TEST_DATABASES = (15, 13, 12, 11, 10)  # not 14: the benchmarks use it
RESERVATION_KEY = "sessiongate-tests:reserved-by"


@pytest.fixture(scope="session")
def redis_database() -> Iterator[str]:
    """One Redis database of the local server, reserved for this test run; fails (never skips) without Redis.

    Each run takes the first free database of :data:`TEST_DATABASES` (a key set
    with NX marks it), so two checkouts testing at once do not flush each
    other's keys. A crashed run's mark expires after an hour.
    """
    base = REDIS_SERVER
    for number in TEST_DATABASES:
        client = redis.Redis.from_url(f"{base}/{number}")
        try:
            reserved = client.set(RESERVATION_KEY, os.getpid(), nx=True, ex=3600)
        except redis.RedisError as exc:
            client.close()
            pytest.fail(f"Redis at {base} is required for this test and is not reachable: {exc}")
        if reserved:
            try:
                yield f"{base}/{number}"
            finally:
                client.delete(RESERVATION_KEY)
                client.close()
            return
        client.close()
    pytest.fail(f"every test database {TEST_DATABASES} of {base} is reserved by another run")


@pytest.fixture
def redis_url(redis_database: str) -> Iterator[str]:
    """This run's Redis database, emptied before and after the test (keeping the run's reservation)."""
    client = redis.Redis.from_url(redis_database)

    def empty() -> None:
        client.flushdb()
        client.set(RESERVATION_KEY, os.getpid(), ex=3600)

    empty()
    yield redis_database
    empty()
    client.close()


STORAGE_URLS = ("memory://", "file://", pytest.param("redis", marks=pytest.mark.redis))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that asks for ``redis_url`` by name carries the ``redis`` mark, so ``-m "not redis"`` needs no Redis."""
    for item in items:
        if "redis_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.redis)


@pytest.fixture(params=STORAGE_URLS)
def storage_url(request: pytest.FixtureRequest) -> str:
    """Each storage in turn; Redis through the ``redis_url`` fixture (fails if Redis is down)."""
    if request.param == "redis":
        return request.getfixturevalue("redis_url")
    return request.param


@pytest.fixture(scope="module")
def telegram_api() -> Iterator[FakeTelegramApi]:
    """A fake Telegram Bot API served on 127.0.0.1 for one test module (tests keep to their own chat ids)."""
    api = FakeTelegramApi()
    with UvicornThread(api.app) as server:
        api.url = server.url
        yield api


@pytest.fixture(scope="module")
def slack_api() -> Iterator[FakeSlackApi]:
    """A fake Slack Web API served on 127.0.0.1 for one test module (tests keep to their own channels)."""
    api = FakeSlackApi(SLACK_BOT_TOKEN)
    with UvicornThread(api.app) as server:
        api.url = server.url
        yield api
