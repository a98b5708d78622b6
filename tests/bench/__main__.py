"""``python -m tests.bench``: every benchmark in one run, one table.

Each benchmark module exposes ``run(quick) -> list[row]``; a row holds the
measured value, the baseline measured in the same run, their ratio and the
goal. Ratios are what to read: these machines are noisy, so absolute numbers
move between runs while side-by-side ratios hold.

``--quick`` (under a minute) checks correctness only: a short soak of two
gateway processes, audited for lost or duplicated messages.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import psutil

BENCHMARKS = [
    "tests.bench.bench_gate",
    "tests.bench.bench_locks",
    "tests.bench.bench_redis",
    "tests.bench.bench_redis_transcripts",
    "tests.bench.bench_memory",
    "tests.bench.bench_clients",
    "tests.bench.bench_history",
    "tests.bench.bench_stream",
]


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def print_table(rows: list[dict]) -> None:
    print("| benchmark | value | unit | baseline (same run) | baseline value | ratio | goal | met |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        met = {True: "yes", False: "NO", None: ""}[row.get("met")]
        print(
            f"| {row['name']} | {_cell(row['value'])} | {row.get('unit', '')} | {row.get('baseline') or ''} "
            f"| {_cell(row.get('baseline_value'))} | {_cell(row.get('ratio'))} | {row.get('goal') or ''} | {met} |"
        )


def machine() -> str:
    memory = psutil.virtual_memory().total / 2**30
    return f"{platform.machine()}, {psutil.cpu_count()} cores, {memory:.0f} GiB, Python {platform.python_version()}"


def quick_correctness() -> list[dict]:
    """Two gateways, 16 clients, 4 sessions, 15 s: nothing lost, nothing duplicated."""
    from tests.chaos.soak import audit, file_transcripts, run_soak
    from tests.support import NO_RATE_LIMITS, GatewayProcess

    config = {
        "providers": [{"id": "echo", "type": "echo", "delayMs": 10}],
        "rateLimits": NO_RATE_LIMITS,
    }
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        gateways = [GatewayProcess(data_dir, config).start() for _ in range(2)]
        try:
            report = asyncio.run(run_soak(gateways, sessions=4, clients=16, seconds=15, grace=10))
        finally:
            for gateway in gateways:
                gateway.stop()
        result = audit(file_transcripts(data_dir), report)
    return [
        {
            "name": "quick soak: acknowledged messages lost / duplicated / out of order",
            "value": f"{len(result.missing)} / {len(result.duplicated)} / {len(result.out_of_order)}",
            "unit": f"of {len(report.acknowledged)} acked",
            "baseline": None,
            "baseline_value": None,
            "ratio": None,
            "goal": "0 / 0 / 0",
            "met": result.ok and not report.five_hundreds,
        }
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="correctness only, under a minute")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--only", action="append", help="run only these modules (e.g. bench_locks)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    rows: list[dict] = []
    if args.quick:
        rows.extend(quick_correctness())
    else:
        for module_name in BENCHMARKS:
            if args.only and module_name.rsplit(".", 1)[1] not in args.only:
                continue
            print(f"running {module_name} ...", file=sys.stderr, flush=True)
            rows.extend(importlib.import_module(module_name).run(quick=False))
    print(f"\nMachine: {machine()}; took {time.monotonic() - started:.0f} s\n")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2, default=str))
    return 0 if all(row.get("met", True) is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
