"""Session lanes: one turn per session at a time, across every process sharing the storage.

A lane is held for a whole turn (the model call included), unlike the write
lock. ``lane.mode = reject`` answers a second message at once (after
``lane.maxWaitMs``) with :class:`SessionBusy`; ``queue`` lines messages up in
the session's FIFO (storage tickets, so the order holds across processes) up
to ``lane.queueCap`` and ``lane.queueWaitMs``. ``interrupt`` and ``collect``
need the app's turns (cancel one, merge waiting messages): the gate and the
app build them on these two ways of waiting.

Busy answers must be cheap: a session held by this process is answered from
in-process state without touching the storage, and never from the transcript.
Their ``retry_after_ms`` predicts when the session frees up from an EWMA of
turn durations (per session, falling back to all sessions).
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict

from ._config import Settings
from ._errors import ClientGone, QueueFull, SessionBusy
from ._metrics import LANE_WAIT_SECONDS, QUEUE_DEPTH, TURN_SECONDS, count_takeover
from ._waiting import Backoff, Departure, Heartbeats, Wakeups, moving_average
from .storage import Holder, LeaseKind, LeaseStorage, StoredLease, Ticket

__all__ = ["LaneGrant", "Lanes", "TurnDurations"]


class TurnDurations:
    """Exponentially weighted moving averages of turn durations, per session and overall.

    Before any turn has finished there is nothing to average: a turn that has
    run ``elapsed`` ms is then expected to run about as long again (at least
    :data:`DEFAULT_MS` more), but never past ``longest_ms`` (the embedding app
    knows it: e.g. its model call's timeout), so a slow first turn does not
    make its waiters poll every few hundred milliseconds.
    """

    DEFAULT_MS = 1000.0
    MAX_SESSIONS = 10_000  # least recently finished sessions are forgotten first

    def __init__(self, longest_ms: float | None = None) -> None:
        self._per_session: OrderedDict[str, float] = OrderedDict()
        self._overall: float | None = None
        self.longest_ms = longest_ms

    def observe(self, session_id: str, duration_ms: float) -> None:
        self._per_session[session_id] = moving_average(self._per_session.pop(session_id, None), duration_ms)
        if len(self._per_session) > self.MAX_SESSIONS:
            self._per_session.popitem(last=False)
        self._overall = moving_average(self._overall, duration_ms)

    def expected_ms(self, session_id: str, elapsed_ms: float = 0.0) -> float:
        """The whole expected duration of the session's turn that has run ``elapsed_ms`` so far."""
        expected = self._per_session.get(session_id, self._overall)
        if expected is not None:
            return expected
        guess = elapsed_ms + max(elapsed_ms, self.DEFAULT_MS)
        return guess if self.longest_ms is None else max(1.0, min(guess, self.longest_ms))


class LaneGrant:
    """The right to run one turn of ``session_id``; give it back with :meth:`release`.

    ``fence`` is the grant's fencing token (pass it to ``TranscriptStore.append``).
    ``lost`` turns ``True`` when the heartbeat finds the lease taken over by
    another holder (this one was stale); its later writes will be fenced out.
    """

    def __init__(self, lanes: Lanes, session_id: str, lease: StoredLease) -> None:
        self.session_id = session_id
        self.fence = lease.holder.fence
        self.started_at = time.monotonic()
        self.lost = False
        self._lanes = lanes
        self._lease = lease
        self._released = False
        self._beating = lanes.heartbeats.add(self, lease.renew, self._mark_lost)

    def _mark_lost(self) -> None:
        self.lost = True

    @property
    def released(self) -> bool:
        return self._released

    async def release(self) -> None:
        """Give the lane back (idempotent); records the turn's duration for Retry-After estimates."""
        if self._released:
            return
        self._released = True
        Heartbeats.discard(self._beating, self)
        await self._lanes._finish(self, self._lease)

    async def __aenter__(self) -> LaneGrant:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.release()

    def __repr__(self) -> str:
        return f"<LaneGrant {self.session_id!r} fence={self.fence} lost={self.lost}>"


class Lanes:
    """The lane strategy over any :class:`LeaseStorage`."""

    def __init__(
        self,
        storage: LeaseStorage,
        settings: Settings,
        heartbeats: Heartbeats | None = None,
        *,
        longest_turn_ms: float | None = None,
    ) -> None:
        self._storage = storage
        self._settings = settings.lane
        self.stale_ms = settings.session_write_lock.stale_ms
        self._held: dict[str, LaneGrant] = {}  # sessions whose turn runs in this process
        self._wakeups = Wakeups()
        self.durations = TurnDurations(longest_turn_ms)
        self.heartbeats = heartbeats or Heartbeats.for_stale_ms(self.stale_ms)  # one timer renews every lane held here

    async def acquire(
        self,
        session_id: str,
        *,
        max_wait_ms: int | None = None,
        queued: bool | None = None,
        departure: Departure | None = None,
    ) -> LaneGrant:
        """The session's lane; raises SessionBusy (or QueueFull when queued) when not had in time.

        ``queued`` waits in the session's FIFO (default: ``lane.mode == "queue"``);
        the gate queues an ``interrupt`` message after cancelling the running turn.
        With ``departure`` (the waiting request's client), a wait ends with
        :class:`ClientGone` as soon as the client leaves: its queue place is
        given up at once and its turn never runs.
        """
        asked_at = time.monotonic()
        if self._settings.mode == "queue" if queued is None else queued:
            wait_ms = self._settings.queue_wait_ms if max_wait_ms is None else max_wait_ms
            return await self._acquire_queued(session_id, asked_at, asked_at + wait_ms / 1000, departure)
        grant, holder = await self._try(session_id, asked_at)  # the common case: free at once
        if grant is not None:
            return grant
        wait_ms = self._settings.max_wait_ms if max_wait_ms is None else max_wait_ms
        return await self._acquire_direct(session_id, asked_at, asked_at + wait_ms / 1000, holder, departure)

    async def _try(self, session_id: str, asked_at: float) -> tuple[LaneGrant | None, Holder | None]:
        """The lane, or ``None`` and who holds it (when the storage saw that while refusing)."""
        if session_id in self._held:  # answered from memory: this process runs its turn
            return None, None
        lease, holder = await self._storage.try_acquire_or_holder(LeaseKind.LANE, session_id, stale_ms=self.stale_ms)
        if lease is None:
            return None, holder
        LANE_WAIT_SECONDS.observe(time.monotonic() - asked_at)
        count_takeover(lease)
        grant = self._held[session_id] = LaneGrant(self, session_id, lease)
        return grant, None

    async def _wait(
        self, session_id: str, deadline: float, backoff: Backoff, departure: Departure | None
    ) -> bool:
        """Sleep until a local release or the next poll; ``False`` once the deadline has passed.

        Raises :class:`ClientGone` when ``departure`` says the client left (before or during the sleep).
        """
        if departure is not None:
            departure.watch(functools.partial(self._wakeups.notify, session_id))  # from the first wait on
            if departure.gone:
                raise ClientGone(session_id)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if session_id not in self._held:  # the holder is elsewhere: poll
            remaining = min(remaining, backoff.next_delay())
        await self._wakeups.wait(session_id, remaining)
        if departure is not None and departure.gone:
            raise ClientGone(session_id)
        return True

    async def _acquire_direct(
        self, session_id: str, asked_at: float, deadline: float, holder: Holder | None, departure: Departure | None
    ) -> LaneGrant:
        """Wait and retry after a first try found the lane taken (by ``holder``, if the storage said)."""
        backoff = Backoff()
        while await self._wait(session_id, deadline, backoff, departure):
            grant, holder = await self._try(session_id, asked_at)
            if grant is not None:
                return grant
        raise await self._busy(session_id, holder=holder)

    async def _acquire_queued(
        self, session_id: str, asked_at: float, deadline: float, departure: Departure | None
    ) -> LaneGrant:
        cap = self._settings.queue_cap
        ticket = await self._storage.enqueue(session_id, cap=cap, stale_ms=self.stale_ms)
        if ticket is None:
            raise QueueFull(
                session_id, queue_cap=cap, retry_after_ms=await self._estimate(session_id, cap)
            )
        QUEUE_DEPTH.inc()
        try:
            return await self._wait_in_queue(ticket, asked_at, deadline, departure)
        finally:
            QUEUE_DEPTH.dec()
            await self._storage.leave_queue(ticket)
            self._wakeups.notify(session_id)  # the next local waiter may now be at the head

    async def _wait_in_queue(
        self, ticket: Ticket, asked_at: float, deadline: float, departure: Departure | None
    ) -> LaneGrant:
        session_id = ticket.session_id
        backoff = Backoff()
        renew_every = self.heartbeats.interval
        renew_at = time.monotonic() + renew_every
        while True:
            position = await self._storage.queue_position(ticket, stale_ms=self.stale_ms)
            if position == 0:
                grant, _ = await self._try(session_id, asked_at)
                if grant is not None:
                    return grant
            if time.monotonic() >= renew_at:
                await self._storage.renew_ticket(ticket)
                renew_at = time.monotonic() + renew_every
            if not await self._wait(session_id, deadline, backoff, departure):
                raise await self._busy(session_id, position)

    async def _busy(self, session_id: str, queue_position: int = 0, *, holder: Holder | None = None) -> SessionBusy:
        return SessionBusy(
            f"session {session_id!r} has a turn in progress",
            retry_after_ms=await self._estimate(session_id, queue_position, holder),
            session_id=session_id,
        )

    async def _estimate(self, session_id: str, queue_position: int, holder: Holder | None = None) -> int:
        """Retry-After for a busy answer; the holder's start comes from memory, ``holder`` or the storage."""
        if session_id in self._held:
            return self.estimate_retry_after_ms(session_id, queue_position)
        if holder is None:
            holder = await self._storage.holder(LeaseKind.LANE, session_id)
        elapsed_ms = 0.0 if holder is None else max(0.0, (time.time() - holder.since) * 1000)
        return self.estimate_retry_after_ms(session_id, queue_position, elapsed_ms=elapsed_ms)

    def estimate_retry_after_ms(
        self, session_id: str, queue_position: int = 0, *, elapsed_ms: float | None = None
    ) -> int:
        """When the session should be free for one more turn, in ms (at least 1).

        Expected turn time minus the current turn's elapsed time (``elapsed_ms``,
        else from this process's own holder), plus one expected turn per
        message ahead in the queue. A turn running over its expectation is
        given a tenth of it, not zero, so clients do not hammer.
        """
        if elapsed_ms is None:
            grant = self._held.get(session_id)
            elapsed_ms = 0.0 if grant is None else (time.monotonic() - grant.started_at) * 1000
        expected = self.durations.expected_ms(session_id, elapsed_ms)
        remaining = max(expected - elapsed_ms, expected / 10, 1.0)
        return max(1, round(remaining + queue_position * expected))

    async def _finish(self, grant: LaneGrant, lease: StoredLease) -> None:
        duration = time.monotonic() - grant.started_at
        TURN_SECONDS.observe(duration)
        self.durations.observe(grant.session_id, duration * 1000)
        if self._held.get(grant.session_id) is grant:
            del self._held[grant.session_id]
        try:
            await lease.release()
        finally:
            self._wakeups.notify(grant.session_id)

    async def aclose(self) -> None:
        """Give back every lane this process still holds (shutdown)."""
        for grant in list(self._held.values()):
            await grant.release()
