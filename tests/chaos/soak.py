"""A bounded soak against real gateway processes, and the audit of what it left on disk.

Clients send uniquely numbered messages, each with an ``Idempotency-Key`` that
stays the same across retries; they honour ``retryAfterMs`` on 409/429/503 and
move to another gateway when one stops answering. A chaos task may ``kill -9``
or ``SIGSTOP`` gateways (or ``kill -9`` Redis) meanwhile. The audit then reads
the transcripts straight from where they are kept (the JSONL files of a data
dir, or the Redis streams): every record valid, every acknowledged message there
exactly once with its reply, no message twice, and each client's acknowledged
messages in the order it sent them. Used by ``tests/chaos`` and by the
``--quick`` correctness run of ``python -m tests.bench``.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from sessiongate.transcripts.redis import TranscriptKeys
from tests.support import GatewayProcess, metric_value, scrape_metrics

RETRYABLE = {409, 429, 503}
FENCING_REFUSALS_METRIC = "sessiongate_fencing_refusals_total"


@dataclass
class SoakReport:
    sent: int = 0
    acknowledged: dict[str, tuple[str, int]] = field(default_factory=dict)  # text -> (session, seq)
    order: dict[tuple[int, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    transport_errors: int = 0
    chaos_events: list[str] = field(default_factory=list)
    late_writes_refused: int = 0  # fencing refusals a SIGSTOPped gateway counted once it ran again
    five_hundreds: list[str] = field(default_factory=list)


@dataclass
class AuditResult:
    lines: int = 0
    invalid_lines: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)
    out_of_order: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.invalid_lines or self.missing or self.duplicated or self.unanswered or self.out_of_order)

    def summary(self) -> str:
        return (
            f"lines={self.lines} invalid={len(self.invalid_lines)} missing={len(self.missing)} "
            f"duplicated={len(self.duplicated)} unanswered={len(self.unanswered)} "
            f"out_of_order={len(self.out_of_order)}"
        )


async def _send_one(
    clients: list[httpx.AsyncClient], session_id: str, text: str, report: SoakReport, deadline: float
) -> bool:
    """Send one message until acknowledged or past ``deadline``; same Idempotency-Key every attempt."""
    key = uuid.uuid4().hex
    attempt = 0
    while time.monotonic() < deadline:
        client = clients[attempt % len(clients)] if attempt else random.choice(clients)
        attempt += 1
        try:
            response = await client.post(
                f"/v1/sessions/{session_id}/messages",
                json={"text": text, "sender": text.split("-")[0]},
                headers={"Idempotency-Key": key},
            )
        except httpx.TransportError:
            report.transport_errors += 1
            await asyncio.sleep(random.uniform(0.05, 0.3))
            continue
        report.statuses[response.status_code] += 1
        if response.status_code == 200:
            return True
        if response.status_code >= 500 and response.status_code != 503:
            report.five_hundreds.append(f"{response.status_code} {response.text[:200]}")
        if response.status_code in RETRYABLE:
            retry_ms = response.json().get("retryAfterMs", 1000)
            await asyncio.sleep(random.uniform(0, min(retry_ms, 2000) / 1000) + 0.005)
            continue
        raise AssertionError(f"unexpected answer {response.status_code}: {response.text[:300]}")
    return False


async def _client(
    index: int, sessions: list[str], clients: list[httpx.AsyncClient], report: SoakReport, stop_at: float, grace: float
) -> None:
    seq = 0
    while time.monotonic() < stop_at:
        session_id = random.choice(sessions)
        seq += 1
        text = f"c{index}-m{seq}"
        report.sent += 1
        if await _send_one(clients, session_id, text, report, deadline=stop_at + grace):
            report.acknowledged[text] = (session_id, seq)
            report.order[(index, session_id)].append(text)


Chaos = Callable[[SoakReport, float], Awaitable[None]]


def gateway_chaos(gateways: list[GatewayProcess], pause_s: float) -> Chaos:
    """Every few seconds: kill -9 and restart a gateway, or SIGSTOP it for ``pause_s`` (past staleMs) and SIGCONT it."""

    async def chaos(report: SoakReport, stop_at: float) -> None:
        await _gateway_chaos(gateways, report, stop_at, pause_s)

    return chaos


async def _fencing_refusals(gateway: GatewayProcess) -> float:
    _, samples = await asyncio.to_thread(scrape_metrics, gateway.url)
    return metric_value(samples, FENCING_REFUSALS_METRIC)


async def _gateway_chaos(gateways: list[GatewayProcess], report: SoakReport, stop_at: float, pause_s: float) -> None:
    rng = random.Random(7)
    kill = False  # alternate, SIGSTOP first: every soak has both, however short
    while time.monotonic() < stop_at - 4:
        await asyncio.sleep(rng.uniform(2.0, 4.0))
        victim = rng.choice(gateways)
        if kill:
            report.chaos_events.append(f"kill -9 {victim.port}")
            victim.signal(signal.SIGKILL)
            await asyncio.to_thread(victim.process.wait)
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            await asyncio.to_thread(victim.start)
        else:
            report.chaos_events.append(f"SIGSTOP {victim.port} {pause_s:.1f}s")
            refused = await _fencing_refusals(victim)
            victim.signal(signal.SIGSTOP)
            await asyncio.sleep(pause_s)
            victim.signal(signal.SIGCONT)
            await asyncio.sleep(1.0)  # its turns that were under way try to append now
            report.late_writes_refused += int(await _fencing_refusals(victim) - refused)
        kill = not kill


async def run_soak(
    gateways: list[GatewayProcess],
    *,
    sessions: int = 8,
    clients: int = 32,
    seconds: float = 30.0,
    chaos: Chaos | None = None,
    grace: float = 20.0,
    request_timeout_s: float = 5.0,
) -> SoakReport:
    """Drive ``clients`` concurrent clients over ``sessions`` sessions for ``seconds``.

    A client gives up on an answer after ``request_timeout_s`` and retries on the
    other gateway: shorter than a SIGSTOP, that is what takes a frozen turn's lane over.
    """
    report = SoakReport()
    session_ids = [f"soak-{n}" for n in range(sessions)]
    stop_at = time.monotonic() + seconds
    timeout = httpx.Timeout(request_timeout_s, connect=1.0)
    http_clients = [httpx.AsyncClient(base_url=g.url, timeout=timeout) for g in gateways]
    try:
        tasks = [_client(i, session_ids, http_clients, report, stop_at, grace) for i in range(clients)]
        if chaos is not None:
            tasks.append(chaos(report, stop_at))
        await asyncio.gather(*tasks)
    finally:
        for client in http_clients:
            await client.aclose()
    return report


Transcripts = Iterator[tuple[str, list[str]]]


def file_transcripts(data_dir: Path) -> Transcripts:
    """``(name, JSON lines)`` of every JSONL transcript in ``data_dir``."""
    for path in sorted((data_dir / "sessions").glob("*.jsonl")):
        yield path.name, path.read_text(encoding="utf-8").splitlines()


def redis_transcripts(url: str, key_prefix: str) -> Transcripts:
    """``(stream key, JSON records)`` of every transcript stream under ``key_prefix`` in the Redis at ``url``."""
    keys = TranscriptKeys(key_prefix)
    with redis.Redis.from_url(url, decode_responses=True) as client:
        for key in sorted(client.scan_iter(match=keys.stream_pattern(), _type="stream")):
            yield key, [fields["r"] for _, fields in client.xrange(key)]


def audit(transcripts: Transcripts, report: SoakReport) -> AuditResult:
    """Check the stored transcripts (:func:`file_transcripts`, :func:`redis_transcripts`) against what the clients were told."""
    result = AuditResult()
    seen: dict[str, int] = defaultdict(int)
    positions: dict[str, tuple[str, int]] = {}
    answered: set[str] = set()
    user_ids: dict[str, str] = {}
    for name, lines in transcripts:
        for number, line in enumerate(lines):
            result.lines += 1
            try:
                record = json.loads(line)
                assert isinstance(record, dict) and {"id", "role", "text", "at"} <= record.keys()
            except (json.JSONDecodeError, AssertionError):
                result.invalid_lines.append(f"{name}:{number + 1}: {line[:120]}")
                continue
            if record["role"] == "user":
                seen[record["text"]] += 1
                positions[record["text"]] = (name, number)
                user_ids[record["id"]] = record["text"]
            elif record["role"] == "assistant" and record.get("replyTo") in user_ids:
                answered.add(user_ids[record["replyTo"]])
    result.duplicated = sorted(text for text, count in seen.items() if count > 1)
    for text in report.acknowledged:
        if seen.get(text, 0) == 0:
            result.missing.append(text)
        elif text not in answered:
            result.unanswered.append(text)
    for (client, session_id), texts in report.order.items():
        lines = [positions[text][1] for text in texts if text in positions]
        if lines != sorted(lines):
            result.out_of_order.append(f"client {client} in {session_id}: {texts}")
    return result
