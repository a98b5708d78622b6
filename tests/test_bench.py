"""The benchmark harness itself: its raw HTTP client and its load loop work against a real bench server."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.bench.bench_gate import Server, _RawConnection, gate_env, load


def test_raw_client_and_load_loop_against_a_real_gate_server(tmp_path: Path) -> None:
    server = Server("gate", gate_env(tmp_path / "data", backend="memory://"))
    try:
        async def one_post_each() -> list[int]:
            connection = await _RawConnection.open(server.url)
            try:
                return [await connection.post("/s/a/turn"), await connection.post("/s/a/turn")]  # keep-alive
            finally:
                connection.close()

        assert asyncio.run(one_post_each()) == [200, 200]
        wall_per_s, per_cpu_s = asyncio.run(load(server, seconds=0.3, connections=2))
        assert wall_per_s > 10 and per_cpu_s > 10
    finally:
        server.stop()
