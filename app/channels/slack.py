"""Slack: the Events API webhook ``POST /v1/webhooks/slack`` and replies through ``chat.postMessage``.

Slack wants every event acknowledged within 3 s and treats anything else as a
failure to retry; a 409/429 would only bring the same event back. So after the
signature check the webhook always answers 2xx: it makes the message durable
in its transcript when the write lock comes quickly, and otherwise (lock busy,
backend down, the same event being accepted right now) writes it to the local
spool (:class:`~sessiongate.gateway.channels.durable.Spool`), which a background task appends
later. The turn runs after the ack, in :mod:`sessiongate.gateway.channels.worker`.

Sessions follow Slack's conversations: ``slack:<team>:<channel>`` for a
channel's top level, ``slack:<team>:<channel>:<thread_ts>`` for a thread (the
reply goes to the same thread).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time
from collections.abc import Mapping
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sessiongate import RetryableError, Unauthorized, is_valid_session_id

from .._body import json_object
from ..settings import SlackSettings
from .base import Acceptance, Channel, ChannelNotConfigured, DeliveryFailed, DeliveryRetry, Inbound
from .outbound import bot_token, post_json, seconds_or_default
from .worker import channel_for

__all__ = ["SlackChannel", "signature", "slack_webhook"]

SIGNATURE_HEADER = "X-Slack-Signature"
TIMESTAMP_HEADER = "X-Slack-Request-Timestamp"
MAX_CLOCK_SKEW_S = 300  # Slack's advice: refuse requests more than 5 minutes off (replays)
ACK_BUDGET_S = 2.0  # time for the durable append before falling back to the spool (Slack allows 3 s)
MESSAGE_EVENTS = ("message", "app_mention")
RETRYABLE_API_ERRORS = ("ratelimited", "service_unavailable", "internal_error", "fatal_error", "request_timeout")


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """Slack's v0 request signature: ``v0=`` + hex HMAC-SHA256 of ``v0:<timestamp>:<body>``."""
    digest = hmac.new(secret.encode(), b"v0:" + timestamp.encode() + b":" + body, hashlib.sha256)
    return f"v0={digest.hexdigest()}"


class SlackChannel(Channel):
    name = "slack"

    def __init__(self, settings: SlackSettings) -> None:
        self.settings = settings

    def verify(self, headers: Mapping[str, str], body: bytes, *, now: float | None = None) -> None:
        """Check signature (constant time) and timestamp freshness; raises Unauthorized."""
        secret = os.environ.get(self.settings.signing_secret_env)
        if not secret:
            raise ChannelNotConfigured(
                f"environment variable {self.settings.signing_secret_env} (the Slack signing secret) is not set"
            )
        timestamp = headers.get(TIMESTAMP_HEADER, "")
        try:
            sent_at = int(timestamp)
        except ValueError:
            raise Unauthorized(f"missing or malformed {TIMESTAMP_HEADER}") from None
        if abs((time.time() if now is None else now) - sent_at) > MAX_CLOCK_SKEW_S:
            raise Unauthorized(f"{TIMESTAMP_HEADER} is more than {MAX_CLOCK_SKEW_S} s off")
        given = headers.get(SIGNATURE_HEADER, "")
        if not hmac.compare_digest(given.encode(), signature(secret, timestamp, body).encode()):
            raise Unauthorized(f"missing or wrong {SIGNATURE_HEADER}")

    def inbound(self, payload: dict[str, Any]) -> Inbound | None:
        """The user message of an ``event_callback``, or ``None`` for anything to ignore.

        Ignored: other event types, message subtypes (edits, deletions, joins,
        bot messages), messages from a bot (``bot_id``) or from this app's bot user.
        """
        event = payload.get("event")
        if not isinstance(event, dict) or event.get("type") not in MESSAGE_EVENTS:
            return None
        if event.get("subtype") or event.get("bot_id") or event.get("user") in _bot_user_ids(payload):
            return None
        team = payload.get("team_id") or event.get("team")
        fields = (team, event.get("channel"), event.get("ts"), event.get("text"), payload.get("event_id"))
        if not all(isinstance(value, str) and value for value in fields):
            return None
        team, channel, ts, text, event_id = fields
        session_id = f"slack:{team}:{channel}" + (f":{event['thread_ts']}" if event.get("thread_ts") else "")
        if not is_valid_session_id(session_id):
            return None
        record: dict[str, Any] = {
            "role": "user",
            "text": text,
            "channel": self.name,
            "externalId": f"slack:{channel}:{ts}",  # one message, whether it came as message or app_mention
        }
        if isinstance(event.get("user"), str):
            record["sender"] = f"slack:{event['user']}"
        return Inbound(session_id=session_id, record=record, dedupe_key=f"dedupe:slack:{team}:{event_id}")

    async def send(self, http: httpx.AsyncClient, session_id: str, text: str) -> None:
        token = bot_token(self.settings.bot_token_env)
        _, _, channel, *thread = session_id.split(":", 3)
        message: dict[str, Any] = {"channel": channel, "text": text}
        if thread:
            message["thread_ts"] = thread[0]
        response, answer = await post_json(
            http, f"{self.settings.api_base.rstrip('/')}/chat.postMessage", message,
            what="chat.postMessage", headers={"Authorization": f"Bearer {token}"},
        )
        if response.status_code == 429 or answer.get("error") in RETRYABLE_API_ERRORS:
            raise DeliveryRetry(f"chat.postMessage: {answer.get('error') or 'HTTP 429'}",
                                retry_after_s=seconds_or_default(response.headers.get("Retry-After")))
        if not answer.get("ok"):
            raise DeliveryFailed(f"chat.postMessage: {answer.get('error') or f'HTTP {response.status_code}'}")


def _bot_user_ids(payload: dict[str, Any]) -> set[str]:
    """This app's bot user(s), from the event's ``authorizations``."""
    authorizations = payload.get("authorizations")
    if not isinstance(authorizations, list):
        return set()
    return {a["user_id"] for a in authorizations if isinstance(a, dict) and a.get("is_bot") and "user_id" in a}


async def slack_webhook(request: Request) -> Response:
    """``POST /v1/webhooks/slack``: the challenge, or 200 once the event is durable (transcript or spool).

    Bad signatures and bodies raise their typed errors to the app's handler (401, 400, 404).
    """
    worker, channel = channel_for(request, SlackChannel)
    body = await request.body()
    channel.verify(request.headers, body)
    payload = json_object(body)
    if payload.get("type") == "url_verification":
        return JSONResponse({"challenge": payload.get("challenge")})
    inbound = channel.inbound(payload) if payload.get("type") == "event_callback" else None
    if inbound is None:
        return JSONResponse({"ok": True, "ignored": True})
    try:
        async with asyncio.timeout(ACK_BUDGET_S):
            outcome = await worker.accept(inbound)
    except (RetryableError, TimeoutError):
        outcome = None
    if outcome is None or outcome is Acceptance.IN_PROGRESS:
        await worker.accept_later(inbound)
    return JSONResponse({"ok": True})
