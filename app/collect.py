"""``lane.mode = collect``: messages that arrive while a turn runs are answered together by one next turn.

The gate admits a message for a busy session without a lane. It joins the
session's *inbox*, a record in the backend's record storage (so every process
sharing the backend sees it), changed only under the session's transcript
write lock and capped at ``lane.queueCap`` (``queue-full``). Then it waits for
the lane. Whichever waiting message gets the lane first *collects*: it waits
until ``lane.debounceMs`` passed since the newest message joined, takes the
whole inbox, and runs one turn of all those messages (appended in arrival
order, one model call); the others find their message taken and wait for the
answer record the collecting turn writes for each of them when it ends. A
message that gets the lane at once (no turn ran) takes the inbox too, ahead of
itself.

Every waiting request gets the same reply, as JSON or, when it asked for a
stream, as ``turn``, one ``delta`` and ``done`` once the turn is over (the
collecting request streams it as it comes).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from sessiongate import Backend, LaneGrant, QueueFull, SessionBusy, SessionGateError

from .live import POLL_S, LiveTurn, LiveTurns
from .turns import Record, TurnRunner

__all__ = ["Inbox"]

ANSWER_TTL_MS = 600_000


class Inbox:
    """The waiting messages of ``collect`` sessions, and the answers of the turns that took them."""

    def __init__(self, backend: Backend, live: LiveTurns, runner: TurnRunner) -> None:
        self._backend = backend
        self._records = backend.records
        self._lane = backend.settings.lane
        self._live = live
        self._runner = runner

    async def start_turn(self, grant: LaneGrant, session_id: str, user: Record | None = None) -> LiveTurn:
        """Run one turn of every waiting message (and ``user``, last) under ``grant``; answers them when it ends."""
        entries = await self._take(session_id)
        users = [entry["user"] for entry in entries] + ([user] if user is not None else [])
        turn = self._live.start(self._runner, grant, session_id, users)
        for entry in entries:
            await self._records.put(_answer_key(entry["id"]), {"turnId": turn.turn_id}, ttl_ms=ANSWER_TTL_MS)
        if entries:
            asyncio.get_running_loop().create_task(self._answer_when_done(turn, entries))
        return turn

    async def wait(self, session_id: str, user: Record) -> LiveTurn | Record:
        """Join the inbox and wait: the turn to follow (this message collects) or the reply another turn gave.

        Raises ``QueueFull`` when the inbox is full, ``SessionBusy`` when no
        turn took the message within ``lane.queueWaitMs`` (it is withdrawn),
        and the collecting turn's error if it failed.
        """
        entry_id = await self._join(session_id, user)
        deadline = time.monotonic() + self._lane.queue_wait_ms / 1000
        while True:
            answer = await self._records.get(_answer_key(entry_id))
            if answer is not None and "reply" in answer:
                return {**answer["reply"], "turnId": answer["turnId"]}
            if answer is not None and "error" in answer:
                raise _AnsweredWithError(answer["error"])
            if answer is not None:
                await asyncio.sleep(POLL_S)  # taken: its turn runs
                continue
            try:
                grant = await self._backend.acquire_lane(session_id, max_wait_ms=round(POLL_S * 1000))
            except SessionBusy:
                if time.monotonic() >= deadline and await self._withdraw(session_id, entry_id):
                    raise
                continue
            turn = await self._collect(grant, session_id, entry_id)
            if turn is not None:
                return turn

    async def _collect(self, grant: LaneGrant, session_id: str, entry_id: str) -> LiveTurn | None:
        """With the lane: after the debounce, one turn of the whole inbox (``None``: it was answered meanwhile)."""
        try:
            while (quiet_s := await self._quiet_for(session_id)) > 0:
                await asyncio.sleep(quiet_s)
            if await self._records.get(_answer_key(entry_id)) is not None:
                await grant.release()
                return None
            return await self.start_turn(grant, session_id)
        except BaseException:
            await grant.release()
            raise

    async def _quiet_for(self, session_id: str) -> float:
        """Seconds left until ``lane.debounceMs`` passed since the newest message joined."""
        inbox = await self._records.get(_inbox_key(session_id))
        if inbox is None:
            return 0.0
        return inbox["lastAt"] + self._lane.debounce_ms / 1000 - time.time()

    async def _join(self, session_id: str, user: Record) -> str:
        entry_id = uuid.uuid4().hex
        async with self._backend.write_lock(session_id):
            inbox = await self._records.get(_inbox_key(session_id)) or {"entries": []}
            if len(inbox["entries"]) >= self._lane.queue_cap:
                raise QueueFull(session_id, queue_cap=self._lane.queue_cap,
                                retry_after_ms=self._backend.lanes.estimate_retry_after_ms(session_id))
            inbox["entries"].append({"id": entry_id, "user": user})
            inbox["lastAt"] = time.time()
            await self._records.put(_inbox_key(session_id), inbox, ttl_ms=self._inbox_ttl_ms())
        return entry_id

    async def _take(self, session_id: str) -> list[dict[str, Any]]:
        async with self._backend.write_lock(session_id):
            inbox = await self._records.get(_inbox_key(session_id))
            if inbox is not None:
                await self._records.delete(_inbox_key(session_id))
        return [] if inbox is None else inbox["entries"]

    async def _withdraw(self, session_id: str, entry_id: str) -> bool:
        """Remove a message nobody took; ``False`` if a turn took it meanwhile."""
        async with self._backend.write_lock(session_id):
            inbox = await self._records.get(_inbox_key(session_id)) or {"entries": []}
            kept = [entry for entry in inbox["entries"] if entry["id"] != entry_id]
            if len(kept) == len(inbox["entries"]):
                return False
            await self._records.put(_inbox_key(session_id), {**inbox, "entries": kept}, ttl_ms=self._inbox_ttl_ms())
        return True

    async def _answer_when_done(self, turn: LiveTurn, entries: list[dict[str, Any]]) -> None:
        try:
            result = await turn.result()
        except SessionGateError:
            error_event = turn.events[-1].data
            answer: dict[str, Any] = {"turnId": turn.turn_id, "error": error_event}
        else:
            answer = {"turnId": turn.turn_id, "reply": result.reply}
        for entry in entries:
            await self._records.put(_answer_key(entry["id"]), answer, ttl_ms=ANSWER_TTL_MS)

    def _inbox_ttl_ms(self) -> int:
        return self._lane.queue_wait_ms + ANSWER_TTL_MS


class _AnsweredWithError(SessionGateError):
    """The collecting turn failed: its problem, passed on as is to every message it took."""

    def __init__(self, problem: dict[str, Any]) -> None:
        super().__init__(problem.get("detail", "the turn failed"), session_id=problem.get("sessionId"))
        self.problem_type = str(problem["type"]).rsplit("/", 1)[-1]  # type: ignore[misc]  # the turn's, per instance
        self.title = problem.get("title", "Error")  # type: ignore[misc]
        self.default_status = int(problem.get("status", 500))  # type: ignore[misc]


def _inbox_key(session_id: str) -> str:
    return f"collect-inbox:{session_id}"


def _answer_key(entry_id: str) -> str:
    return f"collect-answer:{entry_id}"
