"""Chat channels: the Telegram and Slack webhooks and the background worker that answers them.

The gateway (:func:`sessiongate.gateway._server.create_app`) mounts :func:`routes`;
:meth:`~sessiongate.gateway._context.Gateway.open` builds the :class:`ChannelWorker`
over :func:`configured_channels`, and the lifespan starts and stops it. A webhook
makes the inbound message durable and acknowledges; the worker (:mod:`.worker`)
runs the turns through the session lanes and delivers the replies, exactly once
per message. The types every channel shares are in :mod:`.base`, platform calls
in :mod:`.outbound`, the channels' own files in :mod:`.durable`.
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Route

from ..settings import GatewaySettings
from .base import Channel, ChannelNotConfigured
from .slack import SlackChannel, slack_webhook
from .telegram import TelegramChannel, telegram_webhook
from .worker import ChannelWorker

__all__ = ["ChannelNotConfigured", "ChannelWorker", "configured_channels", "routes"]

TELEGRAM_PATH = "/v1/webhooks/telegram"
SLACK_PATH = "/v1/webhooks/slack"


def routes() -> list[BaseRoute]:
    """The webhook routes (they answer 404 ``channel-not-configured`` for a channel not in the config)."""
    return [
        Route(TELEGRAM_PATH, telegram_webhook, methods=["POST"], name="telegram_webhook"),
        Route(SLACK_PATH, slack_webhook, methods=["POST"], name="slack_webhook"),
    ]


def configured_channels(settings: GatewaySettings) -> list[Channel]:
    """The channels that have a section in ``settings.channels``."""
    channels: list[Channel] = []
    if settings.channels.telegram is not None:
        channels.append(TelegramChannel(settings.channels.telegram))
    if settings.channels.slack is not None:
        channels.append(SlackChannel(settings.channels.slack))
    return channels
