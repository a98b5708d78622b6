"""The :class:`Gateway`: everything routes and background workers share, built once per process.

Created in the app's lifespan (so every uvicorn worker has its own) and kept
at ``sessiongate.gateway.state.gateway``; a route reaches it as ``request.app.state.gateway``,
a channel worker gets it passed to ``start(gateway)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from sessiongate import Backend, TranscriptStore, open_transcripts

from .providers import Failover, build_failover
from .settings import GatewaySettings
from .turns import TurnRunner

if TYPE_CHECKING:
    from .channels import ChannelWorker

OUTBOUND_TIMEOUT_S = 10.0


@dataclass
class Gateway:
    settings: GatewaySettings
    backend: Backend  # lanes, write locks, fences, records (shared with SessionGate)
    store: TranscriptStore
    providers: Failover
    turns: TurnRunner
    http: httpx.AsyncClient  # outbound calls of channels (Telegram sendMessage, Slack chat.postMessage)
    channels: ChannelWorker | None = None  # set by app.channels.start() in the lifespan

    @classmethod
    def open(
        cls, settings: GatewaySettings, backend: Backend, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> Gateway:
        """Build the gateway over ``backend``; ``transport`` (tests) is used for every outbound httpx call."""
        store = open_transcripts(backend, settings)
        providers = build_failover(settings, transport=transport)
        return cls(
            settings=settings,
            backend=backend,
            store=store,
            providers=providers,
            turns=TurnRunner(store, providers, max_messages=settings.history.max_messages),
            http=httpx.AsyncClient(transport=transport, timeout=OUTBOUND_TIMEOUT_S),
        )

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.providers.aclose()
