"""The :class:`Gateway`: everything routes and background workers share, built once per process.

Created in the app's lifespan (so every uvicorn worker has its own) and kept
at ``app.state.gateway``; a route reaches it as ``request.app.state.gateway``.
:meth:`Gateway.open` builds all of it in one go, so no part is ever missing or
swapped later; the lifespan only starts and stops the background tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from sessiongate import Backend, TranscriptStore, open_transcripts

from .channels import ChannelWorker, configured_channels
from .collect import Inbox
from .live import LiveTurns
from .providers import Failover, build_failover
from .settings import GatewaySettings
from .turns import TurnRunner

__all__ = ["Gateway"]

OUTBOUND_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Gateway:
    settings: GatewaySettings
    backend: Backend  # lanes, write locks, fences, records (shared with SessionGate)
    store: TranscriptStore
    providers: Failover
    turns: TurnRunner
    live: LiveTurns  # the messages API's running turns (watch, cancel); also the gate's TurnControl
    inbox: Inbox  # lane.mode = collect: messages waiting for the next turn
    http: httpx.AsyncClient  # outbound calls of channels (Telegram sendMessage, Slack chat.postMessage)
    channels: ChannelWorker  # started and stopped by the lifespan

    @classmethod
    def open(
        cls,
        settings: GatewaySettings,
        backend: Backend,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        live: LiveTurns | None = None,
    ) -> Gateway:
        """Build the gateway over ``backend``; ``transport`` (tests) is used for every outbound httpx call."""
        store = open_transcripts(backend, settings)
        providers = build_failover(settings, transport=transport)
        turns = TurnRunner(store, providers, max_messages=settings.history.max_messages)
        live = live or LiveTurns(backend)
        http = httpx.AsyncClient(transport=transport, timeout=OUTBOUND_TIMEOUT_S)
        channels = ChannelWorker(
            configured_channels(settings), settings=settings, backend=backend, store=store, turns=turns, http=http
        )
        return cls(
            settings=settings,
            backend=backend,
            store=store,
            providers=providers,
            turns=turns,
            live=live,
            inbox=Inbox(backend, live, turns),
            http=http,
            channels=channels,
        )

    async def aclose(self) -> None:
        """Finish the running turns, close the outbound clients; the lifespan has stopped :attr:`channels` before."""
        await self.live.aclose()
        await self.http.aclose()
        await self.providers.aclose()
