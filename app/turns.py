"""The turn runner: one user message in, one reply out, with the transcript lock held as briefly as possible.

This is the point of sessiongate. The transcript write lock guards only the
file: it is held to read (and repair) the transcript, released, and held again
to append; never across the model call, which may take a minute. One turn per
session at a time comes from the session's *lane*, held by the caller (the
gate for the HTTP API, the channel worker for webhooks) with its heartbeat
running. The append carries the lane's fencing token: a turn whose lane was
taken over meanwhile (it went silent for ``staleMs``) cannot write, and ends as
``session-busy``, never as a model failure.

One entry point serves both callers: :meth:`TurnRunner.run_turn` with
``already_stored=False`` (HTTP API: the user message and the reply are
appended together, so a failed turn leaves no trace) or ``already_stored=True``
(channels: the inbound message was appended durably before the webhook's 2xx;
only the reply is appended, with ``replyTo``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sessiongate import (
    IdempotencyKeyReused,
    LaneGrant,
    LockedTranscript,
    SessionBusy,
    TranscriptStore,
    new_record_id,
    utc_now,
)

from .providers import ChatMessage, Failover, Usage

__all__ = [
    "LOST_LANE_RETRY_AFTER_MS",
    "Record",
    "TurnResult",
    "TurnRunner",
    "answered_earlier",
    "chat_messages",
    "ensure_lane_held",
    "history_up_to",
    "interrupted_reply",
    "new_record",
    "usage_record",
    "user_record",
]

Record = dict[str, Any]
LOST_LANE_RETRY_AFTER_MS = 1_000

def new_record(role: str, text: str, **fields: Any) -> Record:
    """A transcript record: ``id``, ``role``, ``text``, ``at`` plus the given fields that are not ``None``."""
    record: Record = {"id": new_record_id(), "role": role, "text": text, "at": utc_now()}
    record.update({name: value for name, value in fields.items() if value is not None})
    return record

def user_record(
    text: str,
    *,
    sender: str | None = None,
    channel: str | None = None,
    idempotency_key: str | None = None,
) -> Record:
    """The record of a user message sent to the messages API.

    ``idempotencyKey`` is kept in the transcript so that a retry whose first
    attempt was appended by a process that died before answering finds its
    answer there (see :func:`answered_earlier`).
    """
    return new_record(
        "user", text, sender=sender, channel=channel, idempotencyKey=idempotency_key
    )

async def answered_earlier(transcript: LockedTranscript, user: Record) -> tuple[Record, Record] | None:
    """The stored (user, reply) pair of an earlier attempt with the same ``idempotencyKey``, if any.

    The gate's idempotency records answer most retries; this covers the one
    case they cannot: the turn was appended, then its process died before the
    answer was recorded or sent. Two index lookups, however long the
    transcript. Raises ``IdempotencyKeyReused`` if the key came with another text.
    """
    key = user.get("idempotencyKey")
    if key is None:
        return None
    earlier = await transcript.find("idempotencyKey", key)
    if earlier is None or earlier.get("role") != "user":
        return None
    if earlier["text"] != user["text"]:
        raise IdempotencyKeyReused("this Idempotency-Key was already used in this session for a different message")
    answered_by = earlier.get("answeredBy")  # one of several messages a collect turn answered
    reply = await (transcript.find("id", answered_by) if answered_by else transcript.find("replyTo", earlier["id"]))
    return None if reply is None or reply.get("role") != "assistant" else (earlier, reply)

def usage_record(usage: Usage | None) -> Record | None:
    """The token usage a reply record keeps (camelCase, as every transcript field), if the provider gave it."""
    if usage is None:
        return None
    return {"promptTokens": usage.prompt_tokens, "completionTokens": usage.completion_tokens,
            "totalTokens": usage.total_tokens}

def chat_messages(records: Sequence[Record]) -> list[ChatMessage]:
    """Transcript records as the model sees them (oldest first)."""
    return [{"role": r["role"], "content": r["text"]} for r in records if r.get("role") in ("user", "assistant")]

def history_up_to(transcript: Sequence[Record], user: Record, limit: int) -> list[Record]:
    """The newest ``limit`` records up to and including the stored ``user`` record (later ones get their own turns)."""
    for position, record in enumerate(transcript):
        if record.get("id") == user["id"]:
            return list(transcript[max(0, position + 1 - limit): position + 1])
    raise ValueError(f"user record {user['id']!r} is not in the transcript (already_stored=True)")

@dataclass(frozen=True)
class TurnResult:
    user: Record
    reply: Record

    @property
    def provider(self) -> str:
        return self.reply["provider"]

def ensure_lane_held(grant: LaneGrant) -> None:
    """Raise ``session-busy`` if the lane was taken over (this turn may no longer write)."""
    if grant.lost:
        raise SessionBusy(
            f"the turn for session {grant.session_id!r} lost its lane (silent for longer than staleMs)",
            retry_after_ms=LOST_LANE_RETRY_AFTER_MS,
            session_id=grant.session_id,
        )

def interrupted_reply(pieces: Sequence[str], provider: str | None, users: Sequence[Record]) -> Record:
    """What a cancelled turn stores: the reply so far, marked ``interrupted``."""
    return new_record(
        "assistant", "".join(pieces), provider=provider, replyTo=users[-1]["id"],
        channel=users[-1].get("channel"), interrupted=True,
    )


class TurnRunner:
    """Runs turns against one transcript store and one provider list."""

    def __init__(self, store: TranscriptStore, providers: Failover, *, max_messages: int) -> None:
        self.store = store
        self.providers = providers
        self.max_messages = max_messages  # history.maxMessages: the newest records the model gets

    async def run_turn(
        self,
        grant: LaneGrant,
        session_id: str,
        user: Record,
        *,
        already_stored: bool = False,
        transcript: Sequence[Record] | None = None,
        first_provider: str | None = None,
    ) -> TurnResult:
        """Read → model call (no lock) → append with ``grant.fence``; the caller holds ``grant`` throughout.

        The model gets the newest ``history.maxMessages`` records (the new
        message included); only those are read from the transcript.
        ``first_provider`` (a provider id) is tried before the configured order.

        Raises ``AllProvidersFailed`` (502) when every provider failed, and
        ``SessionBusy`` (``FencedOut``, ``LockTimeout`` or a lost lane) when
        the turn may not write; nothing is appended then.
        """
        if grant.session_id != session_id:
            raise ValueError(f"lane grant is for {grant.session_id!r}, not {session_id!r}")
        if transcript is not None:  # a channel worker passes the transcript it read under this same lane
            history = history_up_to(transcript, user, self.max_messages)
        else:
            async with self.store.locked(session_id) as stored_transcript:  # for the reads only
                if not already_stored and (stored := await answered_earlier(stored_transcript, user)) is not None:
                    return TurnResult(user=stored[0], reply=stored[1])
                if already_stored:
                    history = await stored_transcript.tail(self.max_messages, through=user["id"])
                else:
                    history = [*await stored_transcript.tail(self.max_messages - 1), user]
        ensure_lane_held(grant)
        completion = await self.providers.complete(
            chat_messages(history), session_id=session_id, first=first_provider
        )
        ensure_lane_held(grant)
        reply = new_record(
            "assistant", completion.text, provider=completion.provider, replyTo=user["id"], channel=user.get("channel"),
            usage=usage_record(completion.usage),
        )
        await self.store.append(session_id, [reply] if already_stored else [user, reply], fence=grant.fence)
        return TurnResult(user=user, reply=reply)

    async def stream_turn(
        self,
        grant: LaneGrant,
        session_id: str,
        users: Sequence[Record],
        on_delta: Callable[[str], None],
        cancelled: asyncio.Event,
        *,
        first_provider: str | None = None,
    ) -> TurnResult:
        """:meth:`run_turn` for API messages, streamed: ``on_delta(piece)`` as the model produces the reply.

        ``users`` are appended together, in order, with the one reply (a
        ``collect`` turn answers several). When ``cancelled`` is set before
        the reply is complete, the model call is stopped (its upstream request
        closed) and the messages are stored with the partial reply marked
        ``interrupted``; the result then has ``interrupted`` set. A provider
        failure stores nothing. A retry of one message with its
        Idempotency-Key gets the stored reply as one piece.
        """
        async with self.store.locked(session_id) as stored_transcript:  # for the reads only
            if len(users) == 1 and (stored := await answered_earlier(stored_transcript, users[0])) is not None:
                on_delta(stored[1]["text"])
                return TurnResult(user=stored[0], reply=stored[1])
            room = self.max_messages - len(users)
            history = [*(await stored_transcript.tail(room) if room > 0 else []), *users][-self.max_messages:]
        ensure_lane_held(grant)
        pieces: list[str] = []
        provider: str | None = None
        usage: Usage | None = None

        async def call_model() -> None:
            nonlocal provider, usage
            stream = self.providers.stream(
                chat_messages(history), session_id=session_id, first=first_provider
            )
            async with contextlib.aclosing(stream):
                async for delta in stream:
                    provider = delta.provider
                    usage = delta.usage or usage
                    if delta.text:
                        pieces.append(delta.text)
                        on_delta(delta.text)

        finished = not cancelled.is_set() and await _unless_cancelled(call_model(), cancelled)
        ensure_lane_held(grant)
        reply = (
            new_record("assistant", "".join(pieces), provider=provider, replyTo=users[-1]["id"],
                       channel=users[-1].get("channel"), usage=usage_record(usage))
            if finished else interrupted_reply(pieces, provider, users)
        )
        if len(users) > 1:
            reply["answers"] = [user["id"] for user in users]
            for answered in users[:-1]:  # the reply's replyTo names the last: a retry of another finds it here
                answered["answeredBy"] = reply["id"]
        await self.store.append(session_id, [*users, reply], fence=grant.fence)
        return TurnResult(user=users[-1], reply=reply)


async def _unless_cancelled(work: Any, cancelled: asyncio.Event) -> bool:
    """Run ``work`` until it ends (``True``) or ``cancelled`` is set first (``False``: ``work`` is stopped)."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(cancelled.wait())
    try:
        await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return not task.cancelled() and task.result() is None
