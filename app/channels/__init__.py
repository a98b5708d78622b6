"""Chat channels: the Telegram and Slack webhooks and the background worker that answers them.

The gateway (:func:`app._server.create_app`) mounts :func:`routes` and calls
:func:`start` / :func:`stop` in its lifespan. A webhook makes the inbound
message durable and acknowledges; the worker (:mod:`.worker`) runs the turns
through the session lanes and delivers the replies, exactly once per message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import BaseRoute, Route

from ..settings import GatewaySettings
from .slack import SlackChannel, slack_webhook
from .telegram import TelegramChannel, telegram_webhook
from .worker import Channel, ChannelNotConfigured, ChannelWorker

if TYPE_CHECKING:
    from sessiongate.gateway._context import Gateway

__all__ = ["ChannelNotConfigured", "ChannelWorker", "configured_channels", "routes", "start", "stop"]

TELEGRAM_PATH = "/v1/webhooks/telegram"
SLACK_PATH = "/v1/webhooks/slack"


def routes() -> list[BaseRoute]:
    """The webhook routes (they answer 404 ``channel-not-configured`` for a channel not in the config)."""
    return [
        Route(TELEGRAM_PATH, telegram_webhook, methods=["POST"], name="telegram_webhook"),
        Route(SLACK_PATH, slack_webhook, methods=["POST"], name="slack_webhook"),
    ]


def configured_channels(settings: GatewaySettings) -> list[Channel]:
    channels: list[Channel] = []
    if settings.channels.telegram is not None:
        channels.append(TelegramChannel(settings.channels.telegram))
    if settings.channels.slack is not None:
        channels.append(SlackChannel(settings.channels.slack))
    return channels


async def start(gateway: Gateway) -> None:
    """Start the channel worker and resume the work a previous run left (unreplied, undelivered, spooled)."""
    worker = ChannelWorker(gateway, configured_channels(gateway.settings))
    gateway.channels = worker
    worker.start()


async def stop(gateway: Gateway) -> None:
    """Stop the worker; unfinished work stays in the transcripts for the next start."""
    if gateway.channels is not None:
        await gateway.channels.aclose()
        gateway.channels = None
