"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.fakes.slack_api import BOT_TOKEN as SLACK_BOT_TOKEN
from tests.fakes.slack_api import FakeSlackApi
from tests.fakes.telegram_api import FakeTelegramApi
from tests.support import REDIS_URL, UvicornThread


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
