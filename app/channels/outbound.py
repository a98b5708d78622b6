"""Calls to a chat platform's API: the bot token, one JSON POST, and retries that honour the platform's Retry-After.

Why it exists: Telegram and Slack differ in their payloads and in how they
say "slow down", not in how a reply is posted, which failures are transient
(network errors, 5xx) or how long to wait before the next try (what the
platform asked for, capped). One place for those, so every channel sends and
retries the same way.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from .._metrics import CHANNEL_DELIVERY_RETRIES
from .base import Channel, DeliveryFailed, DeliveryRetry

__all__ = ["MAX_RETRY_AFTER_S", "SEND_ATTEMPTS", "bot_token", "post_json", "seconds_or_default", "send_with_retries"]

SEND_ATTEMPTS = 5
MAX_RETRY_AFTER_S = 60.0


def bot_token(env_name: str) -> str:
    """The bot token from the environment variable the config names; without it no delivery can succeed."""
    token = os.environ.get(env_name)
    if not token:
        raise DeliveryFailed(f"environment variable {env_name} (the bot token) is not set")
    return token


async def post_json(
    http: httpx.AsyncClient, url: str, payload: dict[str, Any], *, what: str, headers: dict[str, str] | None = None
) -> tuple[httpx.Response, dict[str, Any]]:
    """POST ``payload`` to a platform API; network errors and 5xx raise DeliveryRetry.

    Returns the response and its JSON object body (empty when it has none).
    """
    try:
        response = await http.post(url, json=payload, headers=headers)
    except httpx.TransportError as exc:
        raise DeliveryRetry(f"{what}: {type(exc).__name__}") from exc
    if response.status_code >= 500:
        raise DeliveryRetry(f"{what}: HTTP {response.status_code}")
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    return response, answer if isinstance(answer, dict) else {}


def seconds_or_default(value: object, default: float = 1.0) -> float:
    """A platform's retry-after as seconds; ``default`` when it is missing or not a number."""
    if not isinstance(value, (int, float, str)):
        return default
    try:
        return float(value)
    except ValueError:
        return default


async def send_with_retries(channel: Channel, http: httpx.AsyncClient, session_id: str, text: str) -> None:
    """Send ``text`` part by part, each with up to ``SEND_ATTEMPTS`` tries; raises DeliveryRetry / DeliveryFailed.

    A part is retried alone, so a part the platform has taken is never sent again.
    """
    for part in channel.parts(text):
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(DeliveryRetry),
            wait=_platform_retry_after,
            stop=stop_after_attempt(SEND_ATTEMPTS),
            before_sleep=lambda _: CHANNEL_DELIVERY_RETRIES.labels(channel=channel.name).inc(),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await channel.send(http, session_id, part)


def _platform_retry_after(retry_state: RetryCallState) -> float:
    """tenacity wait: what the platform asked for (1 s when it did not say), capped at ``MAX_RETRY_AFTER_S``."""
    outcome = retry_state.outcome
    error = outcome.exception() if outcome is not None else None
    asked = error.retry_after_s if isinstance(error, DeliveryRetry) else 1.0
    return min(MAX_RETRY_AFTER_S, max(0.0, asked))
