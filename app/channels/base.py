"""What every chat channel is made of: the :class:`Channel` interface and the values and errors around it.

Why it exists: the webhooks (Telegram, Slack), the worker that runs their
turns and the spool that keeps their messages all speak these few types; kept
apart from any of them, a new channel needs only this module to plug in.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

from sessiongate import SessionGateError

__all__ = [
    "Acceptance",
    "Channel",
    "ChannelNotConfigured",
    "DeliveryFailed",
    "DeliveryRetry",
    "Inbound",
]


class ChannelNotConfigured(SessionGateError):
    """A webhook was called for a channel whose config section (or secret) is not set."""

    problem_type = "channel-not-configured"
    default_status = 404
    title = "Channel not configured"


class DeliveryRetry(Exception):
    """A transient delivery failure (rate limit, 5xx, network): try again after ``retry_after_s``."""

    def __init__(self, detail: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class DeliveryFailed(Exception):
    """A permanent delivery failure (bad token, unknown chat): retrying would not help."""


class Channel(ABC):
    """One chat platform: how to order its messages and how to send a reply."""

    name: ClassVar[str]

    def owns(self, session_id: str) -> bool:
        return session_id.startswith(f"{self.name}:")

    def order_key(self, record: dict[str, Any]) -> int:
        """Sort key among a session's pending messages; equal keys keep transcript order."""
        return 0

    def parts(self, text: str) -> list[str]:
        """A reply as the messages the platform takes, each sent (and retried) on its own."""
        return [text]

    @abstractmethod
    async def send(self, http: httpx.AsyncClient, session_id: str, text: str) -> None:
        """Deliver one part to the chat behind ``session_id``; raise DeliveryRetry / DeliveryFailed."""


@dataclass(frozen=True)
class Inbound:
    """An inbound chat message on its way into a transcript."""

    session_id: str
    record: dict[str, Any]  # the user record: role, text, channel, externalId, ...
    dedupe_key: str  # the platform's event id, as a backend record key


class Acceptance(str, enum.Enum):
    NEW = "new"  # appended now
    DUPLICATE = "duplicate"  # already in the transcript (a platform retry)
    IN_PROGRESS = "in-progress"  # the same event is being accepted by another request right now
