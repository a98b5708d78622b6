"""SessionGate benchmarks: busy-answer latency, middleware overhead, goodput on one session.

Every server is a separate uvicorn process (``python -m uvicorn --factory
tests.bench.bench_gate:<kind>_app``) so the httpx load generator in this
process does not share its interpreter. Each row compares with a baseline
measured in the same run:

(a) busy answer p50/p99 while a turn runs, vs the seed's handler that waits
    for the session's lock file up to 10 000 ms and then fails;
(b) capacity of a trivial endpoint (requests per server CPU-second, so a
    busy shared machine does not blur the ratio; median of short interleaved
    rounds, driven near saturation by a minimal keep-alive HTTP/1.1 client)
    bare vs behind SessionGate vs behind slowapi's ASGI middleware, plus the
    gate's own CPU per request in process;
(c) makespan of K clients x M messages on one session with model delay L,
    divided by K*M*L, clients honouring ``retryAfterMs`` vs retrying every 1 s.

``python -m tests.bench.bench_gate [--quick]`` prints the Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import Scope

from tests.bench.__main__ import print_table
from tests.support import REPO_ROOT, free_port, wait_until

SEED_WAIT_MS = 10_000  # the seed's hard-coded lock wait
HIGH_QUOTA = "1000000/minute"  # rate limiting stays on the path without ever refusing

# ---------------------------------------------------------------- the servers


async def _turn(request: Request) -> JSONResponse:
    await asyncio.sleep(int(request.query_params.get("ms", "0")) / 1000)
    return JSONResponse({"session": request.path_params["session"], "reply": "ok"})


async def _healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


_TURN_PATH = re.compile(r"/s/([^/]+)/turn")  # compiled once, as an application would


def _session_of(scope: Scope) -> str | None:
    match = _TURN_PATH.fullmatch(scope["path"])
    return match.group(1) if match else None


def _routes(turn=_turn) -> list[Route]:
    return [Route("/s/{session}/turn", turn, methods=["POST"]), Route("/healthz", _healthz)]


def bare_app() -> Starlette:
    return Starlette(routes=_routes())


def gate_app() -> Starlette:
    from sessiongate import SessionGate, Settings

    app = Starlette(routes=_routes())
    app.add_middleware(SessionGate, settings=Settings.load(), session_key=_session_of)
    return app


def slowapi_app() -> Starlette:
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.middleware import SlowAPIASGIMiddleware
    from slowapi.util import get_remote_address

    app = Starlette(routes=_routes())
    app.state.limiter = Limiter(key_func=get_remote_address, default_limits=[HIGH_QUOTA])
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
    app.add_middleware(SlowAPIASGIMiddleware)
    return app


def seed_app() -> Starlette:
    """The seed's behaviour: the session's lock file is held across the model call, waited for up to 10 s."""
    from filelock import AsyncFileLock, Timeout

    lock_dir = Path(os.environ["BENCH_LOCK_DIR"])
    wait_s = int(os.environ.get("BENCH_SEED_WAIT_MS", SEED_WAIT_MS)) / 1000

    async def locked_turn(request: Request) -> JSONResponse:
        lock = AsyncFileLock(lock_dir / f"{request.path_params['session']}.lock", timeout=wait_s)
        try:
            async with lock:
                return await _turn(request)
        except Timeout:
            return JSONResponse({"error": "session file locked"}, status_code=500)

    return Starlette(routes=_routes(locked_turn))


class Server:
    """One bench app in its own uvicorn process on 127.0.0.1."""

    def __init__(self, kind: str, env: dict[str, str], *, http: str = "auto") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "uvicorn", "--factory", f"tests.bench.bench_gate:{kind}_app",
                "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", "--no-access-log",
                "--http", http]
        self.process = subprocess.Popen(args, cwd=REPO_ROOT, env={**os.environ, **env})
        wait_until(self._up, timeout=20, interval=0.05, what=f"{kind} server")
        self.stats = psutil.Process(self.process.pid)

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"bench server exited with {self.process.returncode}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=0.5).status_code == 200
        except httpx.TransportError:
            return False

    def cpu_seconds(self) -> float:
        times = self.stats.cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@contextlib.contextmanager
def servers(specs: dict[str, tuple[str, dict[str, str]]], *, http: dict[str, str] | None = None,
            ) -> Iterator[dict[str, Server]]:
    """The servers of ``specs`` (name -> (kind, env)), each with its uvicorn ``--http`` from ``http`` (else auto)."""
    started: dict[str, Server] = {}
    try:
        for name, (kind, env) in specs.items():
            started[name] = Server(kind, env, http=(http or {}).get(name, "auto"))
        yield started
    finally:
        for server in started.values():
            server.stop()


def gate_env(
    data_dir: Path, *, backend: str = "file://", per_session: str = HIGH_QUOTA, **settings: object
) -> dict[str, str]:
    """SessionGate settings for a bench server, through the contract's environment overrides.

    ``perSender`` is always on (slowapi's one limit is per client address too);
    ``per_session=""`` leaves ``perSession`` off, for a like-for-like row against slowapi.
    """
    env = {
        "SESSIONGATE_DATA_DIR": str(data_dir),
        "SESSIONGATE_BACKEND__URL": backend,
        "SESSIONGATE_RATE_LIMITS__PER_SESSION": per_session,
        "SESSIONGATE_RATE_LIMITS__PER_SENDER": HIGH_QUOTA,
    }
    env.update({f"SESSIONGATE_{key.upper()}": str(value) for key, value in settings.items()})
    return env


# ---------------------------------------------------------------- measurements


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def _hold_turn(client: httpx.AsyncClient, ms: int) -> asyncio.Task:
    """Start a long turn on session ``bench`` and return once it holds the session."""
    turn = asyncio.create_task(client.post(f"/s/bench/turn?ms={ms}"))
    await asyncio.sleep(0.3)
    return turn


async def busy_latencies_gate(url: str, requests: int) -> tuple[list[float], list[float]]:
    """Busy answers while a turn runs, interleaved with a trivial GET on the same server: (busy, floor) in ms.

    The floor is what this client and server take for any request at all, so a
    p99 read against it separates the gate's cost from the machine's jitter.
    """
    async with httpx.AsyncClient(base_url=url, timeout=30) as holder, httpx.AsyncClient(base_url=url) as client:
        turn = await _hold_turn(holder, 60_000)
        await client.post("/s/bench/turn")  # warm the connection
        busy, floor = [], []
        for _ in range(requests):
            started = time.perf_counter()
            answer = await client.post("/s/bench/turn")
            busy.append((time.perf_counter() - started) * 1000)
            assert answer.status_code == 409, answer.text
            started = time.perf_counter()
            await client.get("/healthz")
            floor.append((time.perf_counter() - started) * 1000)
        turn.cancel()
    return busy, floor


async def busy_latencies_seed(url: str, requests: int, wait_ms: int) -> list[float]:
    """``requests`` concurrent messages against a held lock: each waits ``wait_ms``, then fails."""
    async with httpx.AsyncClient(base_url=url, timeout=wait_ms / 1000 + 30) as client:
        turn = await _hold_turn(client, wait_ms + 5_000)

        async def one() -> float:
            started = time.perf_counter()
            answer = await client.post("/s/bench/turn")
            assert answer.status_code == 500, answer.text
            return (time.perf_counter() - started) * 1000

        latencies = await asyncio.gather(*(one() for _ in range(requests)))
        turn.cancel()
    return list(latencies)


class _RawConnection:
    """One keep-alive HTTP/1.1 connection speaking just enough HTTP for a trivial endpoint.

    httpx spends about 0.5 ms of client CPU per request, so with it the server
    idles between requests and the capacity rows measure wake-ups; this client
    costs a few tens of µs, so the servers run near saturation.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> _RawConnection:
        host, port = url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def post(self, path: str) -> int:
        """POST ``path`` with an empty body; the response's status (its body is read and dropped)."""
        self.writer.write(f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = _CONTENT_LENGTH.search(head)
        assert length is not None, head
        await self.reader.readexactly(int(length.group(1)))
        return int(head[9:12])

    def close(self) -> None:
        self.writer.close()


_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")


async def load(server: Server, *, seconds: float, connections: int = 16) -> tuple[float, float]:
    """Closed-loop load on a trivial endpoint, one session per connection: (wall req/s, req per server CPU-s)."""
    done = 0
    deadline = time.monotonic() + seconds

    async def worker(connection: _RawConnection, number: int) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            status = await connection.post(f"/s/w{number}/turn")
            assert status == 200, status
            done += 1

    opened = [await _RawConnection.open(server.url) for _ in range(connections)]
    try:
        await asyncio.gather(*(connection.post(f"/s/w{n}/turn") for n, connection in enumerate(opened)))  # warm up
        cpu_before, started = server.cpu_seconds(), time.monotonic()
        await asyncio.gather(*(worker(connection, n) for n, connection in enumerate(opened)))
        wall, cpu = time.monotonic() - started, server.cpu_seconds() - cpu_before
    finally:
        for connection in opened:
            connection.close()
    return done / wall, done / max(cpu, 1e-9)


async def goodput(url: str, *, session: str, clients: int, messages: int, delay_ms: int, honour: bool) -> float:
    """Makespan of every client sending ``messages`` turns to one session, ÷ (clients·messages·delay)."""

    async def client_run(client: httpx.AsyncClient) -> None:
        for _ in range(messages):
            while True:
                answer = await client.post(f"/s/{session}/turn?ms={delay_ms}")
                if answer.status_code == 200:
                    break
                assert answer.status_code in (409, 429), answer.text
                await asyncio.sleep(answer.json()["retryAfterMs"] / 1000 if honour else 1.0)

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        started = time.monotonic()
        await asyncio.gather(*(client_run(client) for _ in range(clients)))
        makespan = time.monotonic() - started
    return makespan / (clients * messages * delay_ms / 1000)


def _row(name: str, value: float, unit: str, baseline: str | None, baseline_value: float | None,
         ratio: float | None, goal: str | None, met: bool | None) -> dict:
    def rounded(number: float | None) -> float | None:
        return None if number is None else round(number, 3)

    return {"name": name, "value": rounded(value), "unit": unit, "baseline": baseline,
            "baseline_value": rounded(baseline_value), "ratio": rounded(ratio), "goal": goal, "met": met}


def bench_busy_latency(tmp: Path, quick: bool) -> list[dict]:
    seed_wait = 1_000 if quick else SEED_WAIT_MS
    seed_env = {"BENCH_LOCK_DIR": str(tmp), "BENCH_SEED_WAIT_MS": str(seed_wait)}
    with servers({"gate": ("gate", gate_env(tmp / "busy")), "seed": ("seed", seed_env)}) as running:
        gate, floor = asyncio.run(busy_latencies_gate(running["gate"].url, 200 if quick else 1000))
        seed = asyncio.run(busy_latencies_seed(running["seed"].url, 4 if quick else 8, seed_wait))
    baseline = f"seed: wait {seed_wait} ms for the lock file, then fail"
    rows = []
    for label, fraction in (("p50", 0.5), ("p99", 0.99)):
        value, base = _percentile(gate, fraction), _percentile(seed, fraction)
        goal, met = ("p99 < 5 ms", value < 5) if label == "p99" else (None, None)
        rows.append(_row(f"busy answer latency {label} (409 while a turn runs)", value, "ms",
                         baseline, base, base / value, goal, met))
    for label, fraction in (("p50", 0.5), ("p99", 0.99)):
        value, base = _percentile(gate, fraction), _percentile(floor, fraction)
        rows.append(_row(f"busy answer latency {label} against the floor", value, "ms",
                         "GET /healthz, same client and server, interleaved", base, value / base, None, None))
    return rows


GATE_VARIANTS = {  # label -> (backend, perSession quota); perSender is always on
    "file backend, both rate limits": ("file://", HIGH_QUOTA),
    "memory backend, both rate limits": ("memory://", HIGH_QUOTA),
    "file backend, one rate limit (perSender, as slowapi)": ("file://", ""),
    "memory backend, one rate limit (perSender, as slowapi)": ("memory://", ""),
}


def bench_overhead(tmp: Path, quick: bool) -> list[dict]:
    specs = {"bare": ("bare", {}), "slowapi": ("slowapi", {})}
    for number, (label, (backend, per_session)) in enumerate(GATE_VARIANTS.items()):
        specs[label] = ("gate", gate_env(tmp / f"overhead-{number}", backend=backend, per_session=per_session))
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in specs}
    with servers(specs) as running:
        for _ in range(3 if quick else 7):  # short interleaved rounds, so a noisy neighbour hits every variant
            for name, server in running.items():
                rounds[name].append(asyncio.run(load(server, seconds=1.5)))
    best = {name: (statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs))
            for name, runs in rounds.items()}
    bare, slowapi = best["bare"][1], best["slowapi"][1]
    rows = []
    for name in GATE_VARIANTS:
        capacity = best[name][1]
        rows.append(_row(f"trivial endpoint behind SessionGate, {name}", capacity, "req/CPU-s",
                         "bare Starlette", bare, capacity / bare, "≥ 0.9 of bare", capacity / bare >= 0.9))
        rows.append(_row(f"SessionGate ({name}) vs slowapi ASGI middleware (one limit)", capacity, "req/CPU-s",
                         "slowapi", slowapi, capacity / slowapi, "> 1 (cheaper than slowapi)",
                         capacity > slowapi))
        rows.append(_row(f"server CPU per request added by SessionGate, {name}", 1e6 / capacity - 1e6 / bare,
                         "µs", None, None, None, None, None))
    rows.append(_row("trivial endpoint behind slowapi ASGI middleware", slowapi, "req/CPU-s",
                     "bare Starlette", bare, slowapi / bare, None, None))
    gate_wall, bare_wall = best["file backend, both rate limits"][0], best["bare"][0]
    rows.append(_row("wall-clock req/s, SessionGate file backend, both rate limits (16 keep-alive connections)",
                     gate_wall, "req/s",
                     "bare Starlette", bare_wall, gate_wall / bare_wall, None, None))
    return rows


HTTP_PARSERS = {  # label -> uvicorn --http
    "httptools (uvicorn's default)": "httptools",
    "httptools with the gateway's bounded head": "sessiongate.gateway._http:BoundedHttpToolsProtocol",
    "h11 (bounded head, pure Python)": "h11",
}


def bench_http_parsers(tmp: Path, quick: bool) -> list[dict]:
    """Capacity of bare Starlette under each HTTP parser: what bounding the request head costs."""
    rounds: dict[str, list[float]] = {name: [] for name in HTTP_PARSERS}
    with servers({name: ("bare", {}) for name in HTTP_PARSERS}, http=HTTP_PARSERS) as running:
        for _ in range(3 if quick else 7):
            for name, server in running.items():
                rounds[name].append(asyncio.run(load(server, seconds=1.5))[1])
    capacity = {name: statistics.median(runs) for name, runs in rounds.items()}
    plain = capacity["httptools (uvicorn's default)"]
    bounded = "httptools with the gateway's bounded head"
    return [_row(f"trivial endpoint, bare Starlette, {name}", capacity[name], "req/CPU-s",
                 "httptools (uvicorn's default)", plain, capacity[name] / plain,
                 *(("≥ 0.9 of httptools", capacity[name] / plain >= 0.9) if name == bounded else (None, None)))
            for name in list(HTTP_PARSERS)[1:]]


def bench_goodput(tmp: Path, quick: bool) -> list[dict]:
    clients, messages, delay_ms = 4, 3, 200
    specs = {
        "reject": ("gate", gate_env(tmp / "goodput-reject")),
        "queue": ("gate", gate_env(tmp / "goodput-queue", LANE__MODE="queue", LANE__QUEUE_CAP=clients)),
    }
    shape = dict(clients=clients, messages=messages, delay_ms=delay_ms)
    label = f"{clients} clients x {messages} msgs, L={delay_ms} ms"
    with servers(specs) as running:
        reject = running["reject"].url
        cold = asyncio.run(goodput(reject, session="cold", honour=True, **shape))
        # From here on the lane has turn-time history (any session's), as a running gateway does.
        honouring = asyncio.run(goodput(reject, session="warm", honour=True, **shape))
        every_second = asyncio.run(goodput(reject, session="every-second", honour=False, **shape))
        queued = asyncio.run(goodput(running["queue"].url, session="queued", honour=True, **shape))
    baseline = "clients retry every 1 s"
    unit = "makespan/(K·M·L)"
    return [
        _row(f"goodput one session, clients honour retryAfterMs ({label})", honouring, unit,
             baseline, every_second, every_second / honouring, "≤ 1.1", honouring <= 1.1),
        _row(f"goodput one session, honouring, cold start: no turn history ({label})", cold, unit,
             baseline, every_second, every_second / cold, None, None),
        _row(f"goodput one session, lane.mode=queue ({label})", queued, unit,
             baseline, every_second, every_second / queued, "≤ 1.1", queued <= 1.1),
    ]


def bench_gate_cost(tmp: Path, quick: bool) -> list[dict]:
    """CPU per request spent in the gate itself, in process (no HTTP, no uvicorn): where time goes."""
    from sessiongate import SessionGate, Settings

    async def trivial(scope: Scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        pass

    async def per_request_us(gate: SessionGate, requests: int, *, busy: bool) -> float:
        scopes = [{"type": "http", "method": "POST", "path": f"/s/{'busy' if busy else n % 16}/turn",
                   "headers": [], "client": ("127.0.0.1", 1)} for n in range(requests)]
        held = await gate.backend.acquire_lane("busy") if busy else None
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            for scope in scopes:
                await gate(scope, receive, send)
                await asyncio.sleep(0)  # let the event loop turn, as between requests of a server
            best = min(best, (time.process_time() - started) / requests * 1e6)
        if held is not None:
            await held.release()
        await gate.aclose()
        return best

    requests = 5_000 if quick else 20_000
    variants = {  # label -> (backend, perSession, perSender, busy)
        "admitted, memory backend, rate limits off": ("memory://", None, None, False),
        "admitted, memory backend, one rate limit (perSender)": ("memory://", None, HIGH_QUOTA, False),
        "admitted, memory backend, both rate limits on": ("memory://", HIGH_QUOTA, HIGH_QUOTA, False),
        "admitted, file backend, rate limits off": ("file://", None, None, False),
        "admitted, file backend, both rate limits on": ("file://", HIGH_QUOTA, HIGH_QUOTA, False),
        "busy answer (409), file backend, both rate limits on": ("file://", HIGH_QUOTA, HIGH_QUOTA, True),
    }
    rows = []
    for name, (backend, per_session, per_sender, busy) in variants.items():
        settings = Settings.load(env={}, overrides={
            "dataDir": str(tmp / "cost"), "backend": {"url": backend},
            "rateLimits": {"perSession": per_session, "perSender": per_sender}})
        gate = SessionGate(trivial, settings=settings, session_key=_session_of)
        cost = asyncio.run(per_request_us(gate, requests, busy=busy))
        rows.append(_row(f"gate CPU per request, in process: {name}", cost, "µs", None, None, None, None, None))
    return rows


def run(quick: bool = False) -> list[dict]:
    """Every SessionGate benchmark; ``ratio`` is the speed-up over the baseline (higher is better)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        return [*bench_busy_latency(root, quick), *bench_overhead(root, quick), *bench_http_parsers(root, quick),
                *bench_gate_cost(root, quick), *bench_goodput(root, quick)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs; the seed baseline waits 1 s, not 10 s")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    rows = run(quick=args.quick)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
