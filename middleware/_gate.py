"""SessionGate: the ASGI middleware that turns session contention into fast, typed answers.

A chat gateway must run one turn per conversation at a time. Waiting for a
lock inside the handler makes a second message hang, then fail as if the model
were down. SessionGate decides *before* the endpoint runs, in the contract's
order: body validation (a hook), rate limits, then the ``Idempotency-Key``,
then the session's lane. A request that cannot run now gets a problem+json
answer with ``Retry-After`` at once; an admitted one holds the lane until its
response is complete, the client goes away, or the endpoint raises, whichever
comes first, unless the endpoint :func:`take_lane` takes it (a turn that
outlives its request: a streamed reply keeps running when the client goes
away, and releases the lane itself). A request whose client goes away while
it waits for the lane gives up its place and never runs.

The gate reads what it needs once (session id, Idempotency-Key, the body when
a parser or the key asks for it) and hands it on in the scope as an
:class:`Admission`, so nothing after it parses the request again.

The app may tell the gate about its turns (``turns``, a :class:`TurnControl`):
a busy answer then names the running turn, ``lane.mode = interrupt`` cancels it
and queues the new message, and ``collect`` admits a message for a busy
session *without* a lane (``Admission.grant`` is ``None``): the app answers it
with the next turn. Without ``turns`` both modes wait in the queue.

As in Starlette's GZip middleware, per-request state lives in a
:class:`_Responder`, never on the shared middleware instance.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._backend import Backend, open_backend
from ._config import Settings
from ._errors import ClientGone, PayloadTooLarge, RunningTurn, SessionBusy, SessionGateError
from ._idempotency import Claim, Idempotency, StoredAnswer, idempotency_key, is_retryable_status
from ._ids import validate_session_id
from ._metrics import CONTENTION_ANSWERS
from ._problem import error_format_of, problem_status, send_problem
from ._ratelimit import RateLimits
from ._waiting import Departure

if TYPE_CHECKING:
    from ._lanes import LaneGrant

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "Admission",
    "BodyParser",
    "SessionGate",
    "SessionKey",
    "admission_of",
    "client_address",
    "lane_of",
    "parsed_body",
    "read_body",
    "replaying",
]

SessionKey = Callable[[Scope], "str | None"]
#: ``body_parser(scope)``: the parser of this request's body (``None``: the gate reads no body for it).
#: The parser raises a :class:`SessionGateError` for a bad body; what it returns is :func:`parsed_body`.
BodyParser = Callable[[Scope], "Callable[[bytes], object] | None"]
DEFAULT_MAX_BODY_BYTES = 1_048_576
_ADMISSION = "sessiongate.admission"
_BODY = "sessiongate.body"
REPLAYED_HEADER = (b"idempotent-replayed", b"true")


class _Verdict(enum.Enum):
    ADMITTED = "admitted"  # holds the lane: run the app
    NOT_GATED = "not gated"  # not a session request: pass it through untouched
    ANSWERED = "answered"  # answered by the gate (replay), or the client left


@dataclass(slots=True)
class Admission:
    """What the gate read of an admitted request, handed on so nothing after it reads it again."""

    session_id: str  # validated
    idempotency_key: str | None  # as the gate read it: quotes and blanks stripped
    body: object  # what the body parser returned (``None`` without one)
    grant: LaneGrant | None  # the session's lane, held until the response is complete (None: see take_lane, collect)
    # the status a streamed answer really ended with (an error event inside a 200 stream): the Idempotency-Key's
    # answer is kept or dropped by it, so a retry runs again after a retryable failure as it would after that status
    ended_with: int | None = None


def admission_of(scope: Scope) -> Admission | None:
    """The :class:`Admission` SessionGate put on an admitted request (``None`` for the rest)."""
    state = scope.get("state")
    return state.get(_ADMISSION) if state else None


def lane_of(scope: Scope) -> LaneGrant | None:
    """The lane grant SessionGate put on an admitted request."""
    admission = admission_of(scope)
    return admission.grant if admission is not None else None


def parsed_body(scope: Scope) -> object:
    """What the gate's body parser made of this request's body (``None`` if it parsed none).

    Set before ``session_key`` is called, so a session may be named in the body.
    """
    state = scope.get("state")
    return state.get(_BODY) if state else None


def take_lane(scope: Scope) -> LaneGrant | None:
    """Take the request's lane grant out of the gate's hands: the caller must release it.

    For work that outlives the response (a turn that keeps running after its
    client went away); the gate then only settles the Idempotency-Key claim.
    """
    admission = admission_of(scope)
    if admission is None:
        return None
    grant, admission.grant = admission.grant, None
    return grant


class TurnControl(Protocol):
    """What the app tells the gate about its running turns (this process's or another's)."""

    async def running(self, session_id: str) -> RunningTurn | None:
        """The turn that runs for ``session_id`` now, if any (named in busy answers)."""

    async def cancel(self, session_id: str) -> bool:
        """Cancel the running turn (its lane is freed soon after); ``False`` if none ran."""


@functools.cache
def _answers(problem_type: str) -> Any:
    """The contention-answer counter of one answer type (``labels()`` looked up once per type)."""
    return CONTENTION_ANSWERS.labels(type=problem_type)


def client_address(scope: Scope) -> str | None:
    """The default sender key: the client's IP address."""
    client = scope.get("client")
    return client[0] if client else None


class SessionGate:
    """Pure ASGI middleware: body hook → rate limits → Idempotency-Key → session lane, then the app.

    ``session_key(scope)`` names the session of a request (``None``: not a
    session request, passed through untouched). ``sender_key(scope)`` names
    the sender for ``rateLimits.perSender`` (default: the client address).
    ``body_parser(scope)`` may return a parser for the request's body: the
    gate then reads the body (up to ``max_body_bytes``) before ``session_key``,
    refuses a bad one with the parser's error, and keeps the result for
    :func:`parsed_body`. Without ``backend`` one is opened from ``settings``
    on first use and closed at lifespan shutdown.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: Settings | None = None,
        backend: Backend | None = None,
        session_key: SessionKey,
        sender_key: SessionKey | None = None,
        turns: TurnControl | None = None,
        body_parser: BodyParser | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.app = app
        self.turns = turns
        self.settings = settings or (backend.settings if backend is not None else Settings())
        self.session_key = session_key
        self.sender_key = sender_key or client_address
        self.body_parser = body_parser
        self.max_body_bytes = max_body_bytes
        self.rate_limits = RateLimits(self.settings)
        self._backend = backend
        self._owns_backend = backend is None
        self._idempotency: Idempotency | None = None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = open_backend(self.settings)
        return self._backend

    @property
    def idempotency(self) -> Idempotency:
        if self._idempotency is None:
            self._idempotency = Idempotency(
                self.backend.records,
                ttl_ms=self.settings.idempotency.ttl_ms,
                estimate_retry_after_ms=self.backend.lanes.estimate_retry_after_ms,
            )
        return self._idempotency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                send = self._closing_on_shutdown(send)
            await self.app(scope, receive, send)
            return
        responder = _Responder(self, scope, receive, send)
        try:
            verdict = await self._admit(responder)
        except SessionGateError as error:
            await responder.abandon_claim()
            await self._refuse(scope, send, error)
            return
        except ClientGone:  # left while waiting for the lane: its place is given up, its turn never runs
            await responder.abandon_claim()
            return
        except BaseException:
            await responder.abandon_claim()
            raise
        if verdict is _Verdict.ADMITTED:
            await responder.run()
        elif verdict is _Verdict.NOT_GATED:
            await self.app(scope, responder.receive, send)

    async def _admit(self, responder: _Responder) -> _Verdict:
        """Run the checks in the contract's order; raise the answer to a request that may not run."""
        scope = responder.scope
        parse = self.body_parser(scope) if self.body_parser is not None else None
        if parse is not None:
            body = await responder.read_body(self.max_body_bytes)
            if body is None:
                return _Verdict.ANSWERED  # the client went away while sending its body: nobody to answer
            scope.setdefault("state", {})[_BODY] = parse(body)
        session_id = self.session_key(scope)
        if session_id is None:
            return _Verdict.NOT_GATED
        validate_session_id(session_id)
        if self.rate_limits.enabled:
            await self.rate_limits.hit(session_id=session_id, sender=self.sender_key(scope))
        key = idempotency_key(scope)
        if key is not None:
            body = responder.body if responder.body is not None else await responder.read_body(self.max_body_bytes)
            if body is None:
                return _Verdict.ANSWERED
            outcome = await self.idempotency.begin(session_id, scope, key, body)
            if isinstance(outcome, StoredAnswer):
                _answers("idempotent-replayed").inc()
                await _replay(responder.send, outcome)
                return _Verdict.ANSWERED
            responder.claim = outcome
        departure = Departure(responder.receive)
        try:
            grant = responder.grant = await self._acquire_lane(session_id, departure)
        finally:
            responder.receive = await departure.stop()
        if departure.gone:  # left just as the lane came free: nobody would read the turn
            await responder.release_lane()
            raise ClientGone(session_id)
        scope.setdefault("state", {})[_ADMISSION] = Admission(session_id, key, parsed_body(scope), grant)
        return _Verdict.ADMITTED

    async def _acquire_lane(self, session_id: str, departure: Departure) -> LaneGrant | None:
        """The lane per ``lane.mode``; ``None`` admits a ``collect`` message to wait for the next turn."""
        lanes = self.backend.lanes
        mode = self.settings.lane.mode
        if mode in ("interrupt", "collect") and self.turns is None:
            return await lanes.acquire(session_id, queued=True, departure=departure)
        # interrupt and collect act on a busy lane at once: waiting lane.maxWaitMs for it would let a message
        # that came during a turn run after it as its own turn (not interrupting it, not collected)
        wait_ms = 0 if mode in ("interrupt", "collect") else None
        try:
            return await lanes.acquire(session_id, departure=departure, max_wait_ms=wait_ms)
        except SessionBusy as busy:
            if self.turns is None:
                raise
            if mode == "collect":
                return None
            if mode == "interrupt":
                await self.turns.cancel(session_id)
                return await lanes.acquire(session_id, queued=True, departure=departure)
            busy.running_turn = await self.turns.running(session_id)
            raise

    async def _refuse(self, scope: Scope, send: Send, error: SessionGateError) -> None:
        _answers(error.problem_type).inc()
        await send_problem(send, error, problem_status(error, self.settings), error_format_of(scope))

    def _closing_on_shutdown(self, send: Send) -> Send:
        async def send_closing_backend(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await self.aclose()
            await send(message)

        return send_closing_backend

    async def aclose(self) -> None:
        """Close what this gate opened: its backend (if it opened it) and the rate-limit storage."""
        await self.rate_limits.aclose()
        if self._owns_backend and self._backend is not None:
            backend, self._backend, self._idempotency = self._backend, None, None
            await backend.aclose()


async def read_body(receive: Receive, *, max_bytes: int | None = None) -> bytes | None:
    """The whole request body, or ``None`` if the client went away first; over ``max_bytes`` is PayloadTooLarge."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise PayloadTooLarge.over_limit(max_bytes)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands ``body`` over once, then waits on the real one (for ``http.disconnect``)."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


async def _replay(send: Send, answer: StoredAnswer) -> None:
    await send({"type": "http.response.start", "status": answer.status, "headers": [*answer.headers, REPLAYED_HEADER]})
    await send({"type": "http.response.body", "body": answer.body, "more_body": False})


class _Responder:
    """One admitted request: holds its lane (and Idempotency-Key claim) and lets go exactly once."""

    __slots__ = (
        "gate", "scope", "receive", "send", "body", "grant", "claim", "_status", "_headers", "_body", "_finished"
    )

    def __init__(self, gate: SessionGate, scope: Scope, receive: Receive, send: Send) -> None:
        self.gate = gate
        self.scope = scope
        self.receive = receive
        self.send = send
        self.body: bytes | None = None
        self.grant: LaneGrant | None = None
        self.claim: Claim | None = None
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._finished = False

    async def read_body(self, max_bytes: int) -> bytes | None:
        """Read the whole body once and replay it to the app; ``None`` if the client went away first."""
        body = await read_body(self.receive, max_bytes=max_bytes)
        if body is not None:
            self.body = body
            self.receive = replaying(body, self.receive)
        return body

    async def run(self) -> None:
        """Call the app with the lane held; let go when the response is done, the client leaves, or it raises."""
        try:
            await self.gate.app(self.scope, self._receive, self._send)
        finally:
            if not self._finished:
                await self._finish(complete=False)

    async def _receive(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.disconnect":
            await self.release_lane()
        return message

    async def _send(self, message: Message) -> None:
        if self.claim is not None:
            self._keep_for_replay(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False) and not self._finished:
            await self._finish(complete=True)  # before the last bytes leave: the next turn may start at once
        await self.send(message)

    def _keep_for_replay(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._status = message["status"]
            self._headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            self._body.append(message.get("body", b""))

    async def _finish(self, *, complete: bool) -> None:
        """Keep or drop the Idempotency-Key claim, then release the lane (each once)."""
        if self._finished:
            return
        self._finished = True
        if self.claim is None:  # the common case: no Idempotency-Key
            await self.release_lane()
            return
        try:
            if complete:
                await self._complete_claim()
            else:
                await self.abandon_claim()
        finally:
            await self.release_lane()

    async def _complete_claim(self) -> None:
        admission = admission_of(self.scope)
        if admission is not None and admission.ended_with is not None and is_retryable_status(admission.ended_with):
            await self.abandon_claim()
            return
        claim, self.claim = self.claim, None
        if claim is not None:
            await claim.complete(StoredAnswer(self._status, self._headers, b"".join(self._body)))

    async def abandon_claim(self) -> None:
        claim, self.claim = self.claim, None
        if claim is not None:
            await claim.abandon()

    async def release_lane(self) -> None:
        grant, self.grant = self.grant, None
        if grant is not None and lane_of(self.scope) is grant:  # not if the app took it (take_lane)
            await grant.release()
