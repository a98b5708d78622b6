"""Bounded waiting, shared by the lane and write-lock strategies.

Storages only offer non-blocking attempts, so every wait is a loop of tries.
Waiters in this process are woken at once when a local holder lets go
(:class:`Wakeups`); holders in other processes are noticed by polling with a
capped exponential backoff (:class:`Backoff`). A held lease shows life through
one timer per event loop (:class:`Heartbeats`), so a stalled loop stops
beating and its leases go stale, as the contract wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from starlette.types import Message, Receive

__all__ = ["SMOOTHING", "Backoff", "Beating", "Departure", "Heartbeats", "Wakeups", "moving_average"]

logger = logging.getLogger("sessiongate.locks")

SMOOTHING = 0.3  # weight of the newest sample in the moving averages behind retry estimates


def moving_average(average: float | None, sample: float) -> float:
    """The exponentially weighted moving average after ``sample`` (``sample`` itself if there was none)."""
    return sample if average is None else average + SMOOTHING * (sample - average)


class Backoff:
    """Polling intervals: ``first`` seconds, doubling up to ``cap``."""

    def __init__(self, first: float = 0.001, cap: float = 0.025) -> None:
        self._next = first
        self._cap = cap

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._cap, self._next * 2)
        return delay


class _Waiting:
    __slots__ = ("event", "waiters")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.waiters = 0


class Wakeups:
    """Per-key wake-up calls for waiters in this process (one event loop)."""

    def __init__(self) -> None:
        self._by_key: dict[str, _Waiting] = {}

    async def wait(self, key: str, timeout: float) -> None:
        """Return on :meth:`notify` of ``key`` or after ``timeout`` seconds, whichever is first."""
        if timeout <= 0:
            return
        waiting = self._by_key.get(key)
        if waiting is None:
            waiting = self._by_key[key] = _Waiting()
        waiting.waiters += 1
        try:
            async with asyncio.timeout(timeout):
                await waiting.event.wait()
        except TimeoutError:
            pass
        finally:
            waiting.waiters -= 1
            if waiting.waiters == 0 and self._by_key.get(key) is waiting:
                del self._by_key[key]

    def notify(self, key: str) -> None:
        """Wake every current waiter of ``key``; later waiters wait for the next call."""
        waiting = self._by_key.pop(key, None)
        if waiting is not None:
            waiting.event.set()


class Departure:
    """Notices, while a request waits for its lane, that its client went away (``http.disconnect``).

    A waiter whose client has gone must give up its place at once, or abandoned
    requests hold the queue and later run turns nobody reads. Watching starts
    with the first wait (:meth:`watch`), so a request admitted at once costs no
    task. Messages read while watching (the body, if the app had not read it)
    are kept for the app: use :meth:`stop`'s ``receive`` afterwards.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._kept: list[Message] = []
        self._task: asyncio.Task[None] | None = None
        self.gone = False

    def watch(self, on_gone: Callable[[], None]) -> None:
        """Start watching (once); ``on_gone`` is called when the client leaves, to wake the waiter."""
        if self._task is None:
            self._task = asyncio.create_task(self._watch(on_gone))

    async def _watch(self, on_gone: Callable[[], None]) -> None:
        while True:
            message = await self._receive()
            self._kept.append(message)
            if message["type"] == "http.disconnect":
                self.gone = True
                on_gone()
                return

    async def stop(self) -> Receive:
        """Stop watching; the ``receive`` to use from now on (kept messages first)."""
        if self._task is None:
            return self._receive
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        kept, receive = self._kept, self._receive

        async def receive_kept_first() -> Message:
            return kept.pop(0) if kept else await receive()

        return receive_kept_first


async def _renewed(renew: Callable[[], Awaitable[bool]]) -> bool:
    """One beat: ``False`` only when the lease was taken over; a failing storage is logged and counts as alive."""
    try:
        return await renew()
    except Exception:  # the storage is unreachable: we cannot know, try again later
        logger.warning("lease heartbeat failed; retrying", exc_info=True)
        return True


Beating = dict[object, tuple[Callable[[], Awaitable[bool]], Callable[[], None]]]


class Heartbeats:
    """Renews every added lease each ``interval`` seconds, on one timer per event loop.

    For leases taken and given back many times a second (lanes, write locks): adding and
    discarding one is a dict operation, not a timer handle scheduled and
    cancelled per grant. A lease added between two beats is renewed at the
    next one, so no lease goes longer than ``interval`` without a renewal.
    The timer stops once a beat finds nothing to renew. ``renew`` returning
    ``False`` (taken over) calls ``on_lost`` and drops the lease.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._by_loop: dict[asyncio.AbstractEventLoop, Beating] = {}
        self._running: set[asyncio.Task[None]] = set()  # beats in progress (the loop keeps only weak references)

    @classmethod
    def for_stale_ms(cls, stale_ms: int) -> Heartbeats:
        """Three beats per ``stale_ms``: a late beat or two never makes a live holder look stale."""
        return cls(stale_ms / 3000)

    def add(self, key: object, renew: Callable[[], Awaitable[bool]], on_lost: Callable[[], None]) -> Beating:
        """Start renewing ``key``'s lease; returns the set to :meth:`discard` it from later."""
        loop = asyncio.get_running_loop()
        beating = self._by_loop.get(loop)
        if beating is None:
            beating = self._by_loop[loop] = {}
            loop.call_later(self.interval, self._fire, loop)
        beating[key] = (renew, on_lost)
        return beating

    @staticmethod
    def discard(beating: Beating, key: object) -> None:
        beating.pop(key, None)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        beating = self._by_loop[loop]
        if not beating:
            del self._by_loop[loop]
            return
        task = loop.create_task(self._beat(loop, beating))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _beat(self, loop: asyncio.AbstractEventLoop, beating: Beating) -> None:
        members = list(beating.items())
        results = await asyncio.gather(*(_renewed(renew) for _, (renew, _) in members))
        for (key, entry), alive in zip(members, results):
            if not alive and beating.get(key) is entry:  # still held: it was taken over
                del beating[key]
                entry[1]()
        loop.call_later(self.interval, self._fire, loop)
