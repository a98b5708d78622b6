"""A bounded soak against real gateway processes, and the audit of what it left on disk.

Clients send uniquely numbered messages, each with an ``Idempotency-Key`` that
stays the same across retries; they honour ``retryAfterMs`` on 409/429/503 and
move to another gateway when one stops answering. A chaos task may ``kill -9``
or ``SIGSTOP`` gateways meanwhile. The audit then reads the JSONL transcripts
straight from the data dir: every line valid, every acknowledged message there
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
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support import GatewayProcess

RETRYABLE = {409, 429, 503}


@dataclass
class SoakReport:
    sent: int = 0
    acknowledged: dict[str, tuple[str, int]] = field(default_factory=dict)  # text -> (session, seq)
    order: dict[tuple[int, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    transport_errors: int = 0
    chaos_events: list[str] = field(default_factory=list)
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


async def _chaos(gateways: list[GatewayProcess], report: SoakReport, stop_at: float, pause_s: float) -> None:
    """Every few seconds: kill -9 and restart a gateway, or SIGSTOP it past staleMs and SIGCONT it."""
    rng = random.Random(7)
    while time.monotonic() < stop_at - 4:
        await asyncio.sleep(rng.uniform(2.0, 4.0))
        victim = rng.choice(gateways)
        if rng.random() < 0.5:
            report.chaos_events.append(f"kill -9 {victim.port}")
            victim.signal(signal.SIGKILL)
            await asyncio.to_thread(victim.process.wait)
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            await asyncio.to_thread(victim.start)
        else:
            report.chaos_events.append(f"SIGSTOP {victim.port} {pause_s:.1f}s")
            victim.signal(signal.SIGSTOP)
            await asyncio.sleep(pause_s)
            victim.signal(signal.SIGCONT)


async def run_soak(
    gateways: list[GatewayProcess],
    *,
    sessions: int = 8,
    clients: int = 32,
    seconds: float = 30.0,
    chaos: bool = False,
    pause_s: float = 3.0,
    grace: float = 20.0,
) -> SoakReport:
    """Drive ``clients`` concurrent clients over ``sessions`` sessions for ``seconds``."""
    report = SoakReport()
    session_ids = [f"soak-{n}" for n in range(sessions)]
    stop_at = time.monotonic() + seconds
    timeout = httpx.Timeout(5.0, connect=1.0)
    http_clients = [httpx.AsyncClient(base_url=g.url, timeout=timeout) for g in gateways]
    try:
        tasks = [_client(i, session_ids, http_clients, report, stop_at, grace) for i in range(clients)]
        if chaos:
            tasks.append(_chaos(gateways, report, stop_at, pause_s))
        await asyncio.gather(*tasks)
    finally:
        for client in http_clients:
            await client.aclose()
    return report


def audit(data_dir: Path, report: SoakReport) -> AuditResult:
    """Check the transcripts on disk against what the clients were told."""
    result = AuditResult()
    seen: dict[str, int] = defaultdict(int)
    positions: dict[str, tuple[str, int]] = {}
    answered: set[str] = set()
    user_ids: dict[str, str] = {}
    for path in sorted((data_dir / "sessions").glob("*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            result.lines += 1
            try:
                record = json.loads(line)
                assert isinstance(record, dict) and {"id", "role", "text", "at"} <= record.keys()
            except (json.JSONDecodeError, AssertionError):
                result.invalid_lines.append(f"{path.name}:{number + 1}: {line[:120]}")
                continue
            if record["role"] == "user":
                seen[record["text"]] += 1
                positions[record["text"]] = (path.name, number)
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
