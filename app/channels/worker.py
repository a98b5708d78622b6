"""Durable inbound, per-session background turns and once-only delivery, shared by every chat channel.

Why it exists: a chat platform retries a webhook until it gets a 2xx and
wants that 2xx fast, but a turn (a model call) takes seconds. So a webhook
only makes the inbound message durable, as a user record in the session's
transcript, and acknowledges (:meth:`ChannelWorker.accept`). Everything slow
happens here, in one background task per session:

1. take the session's lane (one turn per session, across processes and hosts);
2. read the transcript and pick the next piece of work: a reply written but
   not yet delivered, else the oldest user message of the channel (in the
   channel's order, e.g. Telegram's ``update_id``) that has no reply yet;
3. run that turn and deliver its reply (or deliver the pending reply), move
   the session's delivery cursor past it, release the lane, and start again
   until nothing is left.

The transcript is the queue: a restart loses nothing, because
:meth:`ChannelWorker.recover` looks at every channel session on start. The
check "does this user message already have a reply?" is made under the lane,
so two gateway processes never run the same message twice.

Exactly-once boundary: inbound messages are deduplicated (event id record +
``externalId`` in the transcript), turns run once (reply check under the
lane), replies are delivered at least once and, unless the process dies
between the platform accepting a reply and the delivery cursor being
written, exactly once.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from starlette.requests import Request

from sessiongate import Backend, LaneGrant, RetryableError, SessionBusy, TranscriptStore

from .._logging import SESSION_ID
from .._metrics import CHANNEL_DELIVERIES, CHANNEL_MESSAGES
from ..settings import GatewaySettings
from ..turns import TurnRunner
from .base import Acceptance, Channel, ChannelNotConfigured, DeliveryFailed, DeliveryRetry, Inbound
from .durable import DeliveryCursors, Spool
from .outbound import MAX_RETRY_AFTER_S, send_with_retries

__all__ = ["ChannelWorker", "channel_for"]

logger = logging.getLogger("sessiongate.channels")

DEDUPE_TTL_MS = 7 * 86_400_000  # a platform's retries stop long before this (Telegram: 24 h)
CLAIM_MARGIN_MS = 3_000  # an accept claim outlives the write-lock wait by this much (and a crash by no more)
LANE_WAIT_MS = 5_000  # one try for the lane, before backing off and trying again
TURN_ATTEMPTS = 3
MAX_TASK_FAILURES = 5
IDLE_BACKOFF_S = 1.0
SPOOL_TASK = "(spool)"  # task keys that are not valid session ids, so they never collide with one
RECOVERY_TASK = "(recovery)"

C = TypeVar("C", bound=Channel)


class ChannelWorker:
    """Accepts inbound messages durably and runs each channel session's turns in the background."""

    def __init__(
        self,
        channels: Iterable[Channel],
        *,
        settings: GatewaySettings,
        backend: Backend,
        store: TranscriptStore,
        turns: TurnRunner,
        http: httpx.AsyncClient,
    ) -> None:
        self._channels = list(channels)
        self._backend = backend
        self._store = store
        self._turns = turns
        self._http = http
        self._running = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()
        self._given_up: set[str] = set()  # user record ids whose turn failed TURN_ATTEMPTS times
        channels_dir = Path(settings.data_dir) / "channels"
        self._spool = Spool(channels_dir / "spool")
        self._cursors = DeliveryCursors(channels_dir / "delivered")
        self._claim_ttl_ms = settings.session_write_lock.timeout_ms + CLAIM_MARGIN_MS

    # -- inbound ---------------------------------------------------------------------------

    async def accept(self, inbound: Inbound) -> Acceptance:
        """Make ``inbound`` durable in its transcript, once, then schedule its turn.

        Safe at every crash point: the dedupe record is written only after the
        append, and the append is skipped when the transcript already holds the
        ``externalId`` (a crash between the two). A short claim record keeps two
        concurrent deliveries of one event from both appending. Raises
        ``LockTimeout`` when the write lock is not had in time (nothing written).
        """
        outcome = await self._accept(inbound)
        CHANNEL_MESSAGES.labels(channel=inbound.record["channel"], outcome=outcome.value).inc()
        return outcome

    async def _accept(self, inbound: Inbound) -> Acceptance:
        records = self._backend.records
        if await records.get(inbound.dedupe_key) is not None:
            return Acceptance.DUPLICATE
        claim_key = f"{inbound.dedupe_key}:claim"
        if not await records.add(claim_key, {"pid": os.getpid()}, ttl_ms=self._claim_ttl_ms):
            return Acceptance.IN_PROGRESS
        try:
            if await self._in_transcript(inbound):
                outcome = Acceptance.DUPLICATE
            else:
                await self._store.append(inbound.session_id, [inbound.record], fence=None)
                outcome = Acceptance.NEW
            await records.put(inbound.dedupe_key, {"at": time.time()}, ttl_ms=DEDUPE_TTL_MS)
        finally:
            await records.delete(claim_key)
        self.kick(inbound.session_id)
        return outcome

    async def accept_later(self, inbound: Inbound) -> None:
        """Keep ``inbound`` durably in the local spool; a background task appends it when it can."""
        await asyncio.to_thread(self._spool.put, inbound)
        CHANNEL_MESSAGES.labels(channel=inbound.record["channel"], outcome="spooled").inc()
        self.kick(SPOOL_TASK)

    async def _in_transcript(self, inbound: Inbound) -> bool:
        found = await self._store.find(inbound.session_id, "externalId", str(inbound.record["externalId"]))
        return found is not None

    # -- background tasks ------------------------------------------------------------------

    def kick(self, session_id: str) -> None:
        """Make sure the session's task runs (again) soon."""
        if session_id in self._tasks:
            self._dirty.add(session_id)
            return
        run = self._drain_spool() if session_id == SPOOL_TASK else self._run_session(session_id)
        self._spawn(session_id, run)

    def _spawn(self, key: str, run: Coroutine[Any, Any, None]) -> None:
        # a fresh context: the task outlives the request that kicked it, and must not log its request id
        self._tasks[key] = asyncio.create_task(run, name=f"channel {key}", context=contextvars.Context())

    @property
    def running(self) -> bool:
        """Between :meth:`start` and :meth:`aclose`: only then may a webhook hand it work."""
        return self._running

    def start(self) -> None:
        """Resume, in the background, what a previous run left: spooled messages, then channel sessions with work."""
        self._running = True
        self.kick(SPOOL_TASK)
        self._spawn(RECOVERY_TASK, self._recover())

    async def _recover(self) -> None:
        """Kick every channel session with an unanswered message or an undelivered reply."""
        try:
            resumed = 0
            for session_id in await self._store.session_ids():
                channel = self._channel_of(session_id)
                if channel is None:
                    continue
                transcript = await self._store.read_unlocked(session_id)
                if await self._next_work(channel, session_id, transcript) != (None, None):
                    self.kick(session_id)
                    resumed += 1
            logger.info("channel recovery: %d sessions with pending work resumed", resumed)
        finally:
            self._tasks.pop(RECOVERY_TASK, None)

    async def aclose(self) -> None:
        """Cancel the background tasks; their unfinished work is picked up on the next start."""
        self._running = False
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _until_done(self, key: str, step: Callable[[], Awaitable[bool]]) -> None:
        """Run ``step()`` until it reports no work and no kick came meanwhile; back off when busy.

        An unexpected error is retried a few times, then the task ends (logged);
        the work stays in the transcript for the next kick or start.
        """
        failures = 0
        try:
            while True:
                self._dirty.discard(key)
                try:
                    worked = await step()
                except RetryableError as busy:  # lane or lock busy, queue full, backend down
                    await asyncio.sleep(min(MAX_RETRY_AFTER_S, busy.retry_after_ms / 1000))
                    continue
                except Exception:
                    failures += 1
                    logger.exception("channel task %s failed (%d in a row)", key, failures)
                    if failures >= MAX_TASK_FAILURES:
                        return
                    await asyncio.sleep(IDLE_BACKOFF_S * failures)
                    continue
                failures = 0
                if not worked and key not in self._dirty:
                    return
        finally:
            self._tasks.pop(key, None)

    async def _run_session(self, session_id: str) -> None:
        SESSION_ID.set(session_id)  # this task's log lines name their session
        await self._until_done(session_id, lambda: self._step(session_id))

    async def _step(self, session_id: str) -> bool:
        """Under the session's lane: deliver one pending reply or run one pending turn."""
        channel = self._channel_of(session_id)
        assert channel is not None
        grant = await self._backend.acquire_lane(session_id, max_wait_ms=LANE_WAIT_MS)
        try:
            transcript = await self._store.read(session_id)
            reply, user = await self._next_work(channel, session_id, transcript)
            if user is not None:
                reply = await self._run_turn(session_id, user, grant, transcript)
            if reply is None:
                return user is not None
            await self._deliver(channel, session_id, reply)
            return True
        finally:
            await grant.release()

    async def _run_turn(
        self, session_id: str, user: dict[str, Any], grant: LaneGrant, transcript: list[dict[str, Any]]
    ) -> dict[str, Any] | None:
        """The turn for a stored user record; ``None`` when it failed (retried up to TURN_ATTEMPTS)."""
        for attempt in range(1, TURN_ATTEMPTS + 1):
            try:
                result = await self._turns.run_turn(
                    grant, session_id, user, already_stored=True, transcript=transcript
                )
                return result.reply
            except SessionBusy:
                raise  # lane lost or write lock busy: the task backs off and retries the whole step
            except Exception as exc:
                logger.warning("turn for %s message %s failed (attempt %d): %s", session_id, user["id"], attempt, exc)
                await asyncio.sleep(IDLE_BACKOFF_S * attempt)
        logger.error("giving up on %s message %s until the next start", session_id, user["id"])
        self._given_up.add(user["id"])
        return None

    async def _next_work(
        self, channel: Channel, session_id: str, transcript: list[dict[str, Any]]
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """``(reply to deliver, None)``, else ``(None, user message to answer)``, else ``(None, None)``."""
        reply = await self._undelivered_reply(channel, session_id, transcript)
        return (reply, None) if reply is not None else (None, self._next_unreplied(channel, transcript))

    def _next_unreplied(self, channel: Channel, transcript: list[dict[str, Any]]) -> dict[str, Any] | None:
        replied = {record.get("replyTo") for record in transcript if record.get("role") == "assistant"}
        pending = [
            record for record in transcript
            if record.get("role") == "user" and record.get("channel") == channel.name
            and record["id"] not in replied and record["id"] not in self._given_up
        ]
        return min(pending, key=channel.order_key) if pending else None

    async def _undelivered_reply(
        self, channel: Channel, session_id: str, transcript: list[dict[str, Any]]
    ) -> dict[str, Any] | None:
        """The oldest reply to a channel message after the session's delivery cursor.

        Replies are appended and delivered in order under the lane, so every
        reply after the cursor (the newest one handed to the platform) is pending.
        """
        channel_users = {
            record["id"] for record in transcript
            if record.get("role") == "user" and record.get("channel") == channel.name
        }
        replies = [
            record for record in transcript
            if record.get("role") == "assistant" and record.get("replyTo") in channel_users
        ]
        cursor = await asyncio.to_thread(self._cursors.get, session_id)
        done = next((index + 1 for index, reply in enumerate(replies) if reply["id"] == cursor), 0)
        return replies[done] if done < len(replies) else None

    async def _deliver(self, channel: Channel, session_id: str, reply: dict[str, Any]) -> None:
        """Send ``reply`` with bounded retries honouring the platform's retry-after, then move the cursor."""
        try:
            await send_with_retries(channel, self._http, session_id, reply["text"])
            state: dict[str, Any] = {"status": "sent"}
            logger.info("reply %s to %s delivered", reply["id"], session_id)
        except (DeliveryRetry, DeliveryFailed) as exc:
            logger.error("reply %s to %s not delivered: %s", reply["id"], session_id, exc)
            state = {"status": "failed", "reason": str(exc)}
        CHANNEL_DELIVERIES.labels(channel=channel.name, outcome=state["status"]).inc()
        await asyncio.to_thread(self._cursors.put, session_id, {"replyId": reply["id"], **state, "at": time.time()})

    async def _drain_spool(self) -> None:
        await self._until_done(SPOOL_TASK, self._drain_spool_once)

    async def _drain_spool_once(self) -> bool:
        """Append every spooled message; a message that cannot be appended yet stays for the next round."""
        entries = await asyncio.to_thread(self._spool.entries)
        for path, inbound in entries:
            if await self._accept(inbound) is Acceptance.IN_PROGRESS:  # counted once already, as "spooled"
                await asyncio.sleep(IDLE_BACKOFF_S)
                return True
            await asyncio.to_thread(self._spool.remove, path)
        return False

    def _channel_of(self, session_id: str) -> Channel | None:
        return next((channel for channel in self._channels if channel.owns(session_id)), None)

    def channel(self, kind: type[C]) -> C:
        """The configured channel of ``kind``; raises ChannelNotConfigured."""
        found = next((channel for channel in self._channels if isinstance(channel, kind)), None)
        if found is None:
            raise ChannelNotConfigured(f"channels.{kind.name} is not configured")
        return found


def channel_for(request: Request, kind: type[C]) -> tuple[ChannelWorker, C]:
    """The channel worker of the gateway serving ``request``, and its channel of ``kind``."""
    worker: ChannelWorker = request.app.state.gateway.channels
    if not worker.running:
        raise ChannelNotConfigured("the channel worker is not running")
    return worker, worker.channel(kind)
