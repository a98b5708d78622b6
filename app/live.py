"""Running turns as event streams: watch them, cancel them, from this process or another.

A turn of the messages API runs in a task the gateway owns, not in its
request: the request hands its lane over (``sessiongate.take_lane``) and only
*follows* the turn's events. So a client that goes away stops reading, not
the turn: the reply is still stored, and the lane is released by the turn
task itself once the turn has stored what it keeps, right before its last
event (so whoever reads that event may send the next message at once, as the
gate releases before a response's last bytes). Every turn's events (``turn``, ``delta``…,
then ``done`` or ``error``) are kept in one in-memory buffer shared by every
follower, so a watcher that comes late replays them from the first.

Other processes (``--workers N``, other instances) reach a turn through the
backend's record storage, which every backend shares among the processes that
share its locks (files for ``file://``, Redis for ``redis://``): while a turn
runs, its process names it there and reads its control record every
:data:`POLL_S` (a remote watcher adds it, a remote cancel sets it); while
someone elsewhere watches, the buffer is mirrored there too, and the watcher
polls the mirror as often. Polling,
not pub/sub, because it works the same on every backend with the storage
interface as it is; the price is up to :data:`POLL_S` of lag for remote
watchers and remote cancels (local ones act at once). ``memory://`` is one
process, so nothing is mirrored.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sessiongate import (
    REQUEST_ID,
    Backend,
    BackendUnavailable,
    LaneGrant,
    RunningTurn,
    SessionGateError,
    TurnCancelled,
    problem_body,
    problem_status,
)

from .paths import current_turn_path
from .turns import Record, TurnResult, TurnRunner

__all__ = ["LiveTurn", "LiveTurns", "TurnEvent"]

log = logging.getLogger("sessiongate.turns")

POLL_S = 0.05  # control checks and event mirroring of a running turn, remote watcher polls
TURN_RECORD_TTL_MS = 3_000  # a dead owner's turn stops being named this long after its last refresh
TURN_RECORD_REFRESH_S = 1.0
FINISHED_EVENTS_TTL_MS = 10_000  # a remote watcher reads the end of a turn within this
SHUTDOWN_WAIT_S = 5.0


@dataclass(frozen=True)
class TurnEvent:
    """One server-sent event of a turn; ``seq`` is its place in the turn (the SSE ``id``)."""

    seq: int
    name: str
    data: dict[str, Any]

    def encode(self) -> bytes:
        return f"id: {self.seq}\nevent: {self.name}\ndata: {json.dumps(self.data)}\n\n".encode()


class LiveTurn:
    """One running turn: its event buffer, its cancel switch and its outcome."""

    def __init__(self, session_id: str, users: Sequence[Record]) -> None:
        self.session_id = session_id
        self.users = list(users)
        self.turn_id = f"turn_{uuid.uuid4().hex}"
        self.message_id = self.users[-1]["id"]
        self.events: list[TurnEvent] = []
        self.cancelled = asyncio.Event()
        self.named = False  # named as running for other processes (LiveTurns._mirror)
        self.watched = False  # another process watches or cancels it: its events are mirrored
        self.outcome: asyncio.Future[TurnResult] = asyncio.get_running_loop().create_future()
        self._changed = asyncio.Event()
        self.publish("turn", {"turnId": self.turn_id, "messageId": self.message_id})

    @property
    def finished(self) -> bool:
        return self.outcome.done()

    def publish(self, name: str, data: dict[str, Any]) -> None:
        self.events.append(TurnEvent(len(self.events), name, data))
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def delta(self, text: str) -> None:
        self.publish("delta", {"text": text})

    def cancel(self) -> None:
        self.cancelled.set()

    def finish(self, result: TurnResult) -> None:
        """``done`` with the stored reply, or ``error`` ``turn-cancelled`` if the turn was interrupted."""
        if result.reply.get("interrupted"):
            self.fail(TurnCancelled(
                f"the turn {self.turn_id} was cancelled; the message and the partial reply are stored",
                session_id=self.session_id,
            ))
            return
        reply = result.reply
        self.publish("done", {"id": reply["id"], "text": reply["text"], "provider": reply.get("provider")})
        self.outcome.set_result(result)

    async def result(self) -> TurnResult:
        """Wait for the turn's outcome; a waiter cancelled meanwhile (its request went away) leaves it intact."""
        return await asyncio.shield(self.outcome)

    def fail(self, error: SessionGateError, status: int | None = None) -> None:
        self.publish("error", problem_body(error, status or error.default_status))
        self.outcome.set_exception(error)
        self.outcome.exception()  # retrieved: a turn nobody awaits (its client left) is not an asyncio warning

    async def follow(self) -> AsyncIterator[TurnEvent]:
        """Every event from the first, then each new one as it comes, until the last."""
        seen = 0
        while True:
            changed = self._changed
            while seen < len(self.events):
                yield self.events[seen]
                seen += 1
            if self.finished:
                return
            await changed.wait()

    async def deltas(self) -> AsyncIterator[str]:
        """The reply's pieces; raises the turn's error (e.g. ``TurnCancelled``) after the last one."""
        async for event in self.follow():
            if event.name == "delta":
                yield event.data["text"]
        await self.outcome


class LiveTurns:
    """This process's running turns (at most one per session) and the way to other processes' ones.

    Also the gate's :class:`sessiongate.TurnControl`: busy answers name the
    running turn, and ``lane.mode = interrupt`` cancels it.
    """

    def __init__(self, backend: Backend) -> None:
        self._records = backend.records
        self._settings = backend.settings
        self.shared = not backend.settings.backend.url.startswith("memory:")
        self._local: dict[str, LiveTurn] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.owner = f"{os.uname().nodename}:{os.getpid()}"

    def start(
        self,
        runner: TurnRunner,
        grant: LaneGrant,
        session_id: str,
        users: Sequence[Record],
        *,
        first_provider: str | None = None,
    ) -> LiveTurn:
        """Run a turn of ``users`` under ``grant`` in a task of its own; the task releases ``grant``.

        ``first_provider`` (a provider id) is tried before the configured order.
        """
        turn = LiveTurn(session_id, users)
        self._local[session_id] = turn
        task = asyncio.get_running_loop().create_task(self._run(runner, grant, turn, first_provider))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return turn

    async def _run(self, runner: TurnRunner, grant: LaneGrant, turn: LiveTurn, first_provider: str | None) -> None:
        """Run the turn; give the lane back *before* its last event, so the reader of that event may send the
        next message at once (as the gate does before a response's last bytes)."""
        stop_mirror = asyncio.Event()
        mirror = asyncio.get_running_loop().create_task(self._mirror(turn, stop_mirror)) if self.shared else None
        try:
            end = await self._outcome(runner, grant, turn, first_provider)
            if mirror is not None:
                stop_mirror.set()
                await mirror  # not cancelled: a Redis command cut off mid-flight could leave its connection unusable
                if turn.named:  # no longer named as running: a successor's record is never deleted
                    await _logging_outage(self._unname(turn), "unname the turn")
        finally:
            if self._local.get(turn.session_id) is turn:
                del self._local[turn.session_id]
            await grant.release()
        end()
        if turn.watched:  # the end, for watchers in other processes
            await _logging_outage(self._put_events(turn, finished=True, ttl_ms=FINISHED_EVENTS_TTL_MS),
                                  "mirror the end of the turn")

    async def _outcome(
        self, runner: TurnRunner, grant: LaneGrant, turn: LiveTurn, first_provider: str | None
    ) -> Callable[[], None]:
        """Run the turn (it appends what it keeps); return how to publish its end."""
        try:
            result = await runner.stream_turn(grant, turn.session_id, turn.users, turn.delta, turn.cancelled,
                                              first_provider=first_provider)
        except SessionGateError as error:
            return functools.partial(turn.fail, error, problem_status(error, self._settings))
        except Exception:
            log.exception("turn %s of session %r failed", turn.turn_id, turn.session_id)
            fault = SessionGateError(f"unexpected error; logged with request id {REQUEST_ID.get()}")
            return functools.partial(turn.fail, fault)
        return functools.partial(turn.finish, result)

    def current(self, session_id: str) -> LiveTurn | None:
        """The turn this process runs for ``session_id``, if any."""
        return self._local.get(session_id)

    async def running(self, session_id: str) -> RunningTurn | None:
        turn_id = await self._running_turn_id(session_id)
        return None if turn_id is None else RunningTurn(turn_id, current_turn_path(session_id))

    async def _running_turn_id(self, session_id: str) -> str | None:
        local = self._local.get(session_id)
        if local is not None:
            return local.turn_id
        if not self.shared:
            return None
        record = await self._records.get(_turn_key(session_id))
        return None if record is None else record["turnId"]

    async def cancel(self, session_id: str) -> bool:
        """Cancel the session's running turn, here or (through the records) in its own process."""
        local = self._local.get(session_id)
        if local is not None:
            local.cancel()
            return True
        turn_id = await self._running_turn_id(session_id)
        if turn_id is None:
            return False
        await self._records.put(_control_key(turn_id), {"cancel": True}, ttl_ms=FINISHED_EVENTS_TTL_MS)
        return True

    async def watch(self, session_id: str) -> AsyncIterator[TurnEvent] | None:
        """The running turn's events from its first (``None`` if no turn runs)."""
        local = self._local.get(session_id)
        if local is not None:
            return local.follow()
        turn_id = await self._running_turn_id(session_id)
        if turn_id is None:
            return None
        await self._records.add(_control_key(turn_id), {"cancel": False}, ttl_ms=FINISHED_EVENTS_TTL_MS)  # watch it
        return self._follow_remote(session_id, turn_id)

    async def _follow_remote(self, session_id: str, turn_id: str) -> AsyncIterator[TurnEvent]:
        seen = 0
        while True:  # its reader may go away at any await: a storage command is never cut off (shield)
            mirrored = await asyncio.shield(self._records.get(_events_key(turn_id)))
            if mirrored is not None:
                for seq, (name, data) in enumerate(mirrored["events"][seen:], start=seen):
                    yield TurnEvent(seq, name, data)
                seen = len(mirrored["events"])
                if mirrored["finished"]:
                    return
            elif await asyncio.shield(self._running_turn_id(session_id)) != turn_id:
                return  # its process went away before mirroring an end
            await asyncio.sleep(POLL_S)

    async def _mirror(self, turn: LiveTurn, stop: asyncio.Event) -> None:
        """While ``turn`` runs: name it for other processes, and act on their watch or cancel requests.

        Every :data:`POLL_S` one read of the turn's control record (a watcher
        adds it, a ``DELETE`` sets ``cancel``); the events are written only
        while someone elsewhere watches. It starts one :data:`POLL_S` into the
        turn: the first delta never waits for a file or Redis write.
        """
        mirrored = 0
        named_at = 0.0
        while not await _set_within(stop, POLL_S):
            try:
                if time.monotonic() - named_at >= TURN_RECORD_REFRESH_S:
                    turn.named = True
                    await self._records.put(_turn_key(turn.session_id), {"turnId": turn.turn_id, "owner": self.owner},
                                            ttl_ms=TURN_RECORD_TTL_MS)
                    named_at = time.monotonic()
                control = await self._records.get(_control_key(turn.turn_id))
                if control is not None:
                    turn.watched = True
                    if control.get("cancel"):
                        turn.cancel()
                if turn.watched and len(turn.events) != mirrored:
                    await self._put_events(turn, finished=False, ttl_ms=TURN_RECORD_TTL_MS + FINISHED_EVENTS_TTL_MS)
                    mirrored = len(turn.events)
            except BackendUnavailable:  # the turn goes on; other processes see it again when the backend is back
                log.warning("turn %s: the backend is unreachable; not mirrored for other processes", turn.turn_id)

    async def _unname(self, turn: LiveTurn) -> None:
        """Stop naming the turn as running; a watcher that came since the last poll still gets its end."""
        await self._records.delete(_turn_key(turn.session_id))
        if not turn.watched and await self._records.get(_control_key(turn.turn_id)) is not None:
            turn.watched = True

    async def _put_events(self, turn: LiveTurn, *, finished: bool, ttl_ms: int) -> None:
        events = [[event.name, event.data] for event in turn.events]
        await self._records.put(_events_key(turn.turn_id), {"events": events, "finished": finished}, ttl_ms=ttl_ms)

    async def aclose(self) -> None:
        """Shutdown: cancel every running turn (each stores what it has) and wait for them, bounded."""
        for turn in list(self._local.values()):
            turn.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=SHUTDOWN_WAIT_S)


async def _set_within(event: asyncio.Event, seconds: float) -> bool:
    """Whether ``event`` is set within ``seconds``."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def _logging_outage(step: Awaitable[None], what: str) -> None:
    """A clean-up step of a finished turn: an unreachable backend is logged (records expire), never raised."""
    try:
        await step
    except BackendUnavailable:
        log.warning("could not %s: the backend is unreachable (its record expires)", what)


def _turn_key(session_id: str) -> str:
    return f"turn:{session_id}"


def _events_key(turn_id: str) -> str:
    return f"turn-events:{turn_id}"


def _control_key(turn_id: str) -> str:
    return f"turn-control:{turn_id}"
