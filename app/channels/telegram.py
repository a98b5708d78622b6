"""Telegram: the ``POST /v1/webhooks/telegram`` webhook and replies through the Bot API's ``sendMessage``.

Telegram delivers each ``Update`` until it gets a 2xx and honours only an
integer ``Retry-After`` on a 429. So the webhook checks the secret token,
makes the message durable (:meth:`ChannelWorker.accept`) and answers 200; only
when the transcript's write lock cannot be had in time does it answer 429, and
then nothing was written, so Telegram's retry is processed normally. The turn
runs later, in :mod:`sessiongate.gateway.channels.worker`, in ``update_id`` order per chat.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sessiongate import InvalidRequest, SessionBusy, Unauthorized, problem_response

from .._body import json_object
from ..settings import TelegramSettings
from .base import Acceptance, Channel, ChannelNotConfigured, DeliveryFailed, DeliveryRetry, Inbound
from .outbound import bot_token, post_json, seconds_or_default
from .worker import channel_for

__all__ = ["TelegramChannel", "telegram_webhook"]

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
MAX_MESSAGE_CHARS = 4096  # the Bot API's limit for one message's text
UPDATE_KINDS = ("message", "channel_post")  # updates that carry a new message (edits are ignored)
IN_PROGRESS_RETRY_MS = 1_000


class TelegramChannel(Channel):
    name = "telegram"

    def __init__(self, settings: TelegramSettings) -> None:
        self.settings = settings

    def order_key(self, record: dict[str, Any]) -> int:
        return int(record.get("updateId", 0))

    def parts(self, text: str) -> list[str]:
        return [text[start:start + MAX_MESSAGE_CHARS] for start in range(0, max(1, len(text)), MAX_MESSAGE_CHARS)]

    @property
    def bot_id(self) -> str:
        """The bot's numeric id (the token's prefix), so two bots sharing a backend keep apart."""
        token = os.environ.get(self.settings.bot_token_env)
        return token.split(":", 1)[0] if token else "default"

    def check_secret(self, request: Request) -> None:
        """Constant-time check of Telegram's secret token header; raises Unauthorized."""
        expected = self.settings.secret_token
        if expected is None:
            raise ChannelNotConfigured("channels.telegram.secretToken is not set")
        given = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise Unauthorized(f"missing or wrong {SECRET_HEADER}")

    def inbound(self, update: dict[str, Any]) -> Inbound | None:
        """The message of ``update`` as an Inbound, or ``None`` for an update without text."""
        update_id = update.get("update_id")
        if not isinstance(update_id, int) or isinstance(update_id, bool):
            raise InvalidRequest("an Update needs an integer update_id")
        message = next((update[kind] for kind in UPDATE_KINDS if isinstance(update.get(kind), dict)), None)
        if message is None or not isinstance(message.get("text"), str):
            return None
        chat_id = _object(message.get("chat")).get("id")
        if not isinstance(chat_id, int) or isinstance(chat_id, bool):
            raise InvalidRequest("a message needs an integer chat.id")
        record: dict[str, Any] = {
            "role": "user",
            "text": message["text"],
            "channel": self.name,
            "externalId": f"telegram:{update_id}",
            "updateId": update_id,
        }
        sender = _object(message.get("from")).get("id")
        if sender is not None:
            record["sender"] = f"telegram:{sender}"
        return Inbound(
            session_id=f"telegram:{chat_id}",
            record=record,
            dedupe_key=f"dedupe:telegram:{self.bot_id}:{update_id}",
        )

    async def send(self, http: httpx.AsyncClient, session_id: str, text: str) -> None:
        token = bot_token(self.settings.bot_token_env)
        chat_id = int(session_id.removeprefix(f"{self.name}:"))
        url = f"{self.settings.api_base.rstrip('/')}/bot{token}/sendMessage"
        response, answer = await post_json(http, url, {"chat_id": chat_id, "text": text}, what="sendMessage")
        if response.status_code == 429 or answer.get("error_code") == 429:
            asked = _object(answer.get("parameters")).get("retry_after") or response.headers.get("Retry-After")
            raise DeliveryRetry("sendMessage: 429 Too Many Requests", retry_after_s=seconds_or_default(asked))
        if not answer.get("ok"):
            raise DeliveryFailed(f"sendMessage: {answer.get('description') or f'HTTP {response.status_code}'}")


def _object(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one (a malformed field reads as missing)."""
    return value if isinstance(value, dict) else {}


async def telegram_webhook(request: Request) -> Response:
    """``POST /v1/webhooks/telegram``: 200 once the message is durable (or was seen before).

    A busy transcript (the write lock not had in time) or a concurrent delivery
    of the same update answers 429 with an integer ``Retry-After``: the only
    refusal Telegram honours; nothing was written, so its retry is processed.
    Other typed errors (bad secret or body) go to the app's handler.
    """
    try:
        worker, channel = channel_for(request, TelegramChannel)
        channel.check_secret(request)
        inbound = channel.inbound(json_object(await request.body()))
        if inbound is None:
            return JSONResponse({"ok": True, "ignored": "not a text message"})
        outcome = await worker.accept(inbound)
        if outcome is Acceptance.IN_PROGRESS:
            raise SessionBusy("this update is being accepted by another request right now",
                              retry_after_ms=IN_PROGRESS_RETRY_MS, session_id=inbound.session_id)
    except SessionBusy as busy:
        return problem_response(busy, 429)
    return JSONResponse({"ok": True, "accepted": outcome.value})
