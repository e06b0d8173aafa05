"""Cold-start and throughput figures for the reports endpoint. Prints figures; asserts nothing.

1. Import cost of the Lambda entry module (`python -X importtime -c "import infra.reports.handler"`),
   net of the interpreter's own start-up imports, and the deferred cost of boto3 that the first
   AWS-backed request pays; what the first operator-API request adds on top (`console_lambda`:
   the publisher, cryptography, packaging), which the reports route never imports; and whether
   the reports route's import set holds any of those (it must not).
2. Events per second through `ReportsEndpoint` into SQLite (bounded: 5,000 events), in 100-event
   batches (the agent's batch size), 20-event batches and single-event posts (one state change
   at a time).

Run from the repository root: `.venv/bin/python bench/handler_importtime.py [--no-results]`; the figures
are appended to `bench/RESULTS.md` unless `--no-results` is given.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from results import Report, append, command_line, load_average

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infra.reports.auth import make_token  # noqa: E402
from infra.reports.core import ReportsEndpoint  # noqa: E402
from infra.reports.store import SQLiteStore  # noqa: E402

LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")
SECRET = "bench-fleet-secret-0123456789"
RUNS = 3
HANDLER = "infra.reports.handler"
CONSOLE = "infra.reports.console_lambda"
HEAVY = ("publisher", "cryptography", "packaging", "boto3", "botocore")


def import_times(code: str) -> tuple[int, dict[str, int]]:
    """(sum of self µs over every import, cumulative µs per top-level import) for `python -c code`."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    total, top = 0, {}
    for line in proc.stderr.splitlines():
        m = LINE.match(line)
        if m:
            total += int(m.group(1))
            if len(m.group(3)) == 1:  # one space of indent: imported directly by the -c code or site
                top[m.group(4)] = int(m.group(2))
    return total, top


def best_of(runs: int, code: str) -> tuple[int, dict[str, int]]:
    return min((import_times(code) for _ in range(runs)), key=lambda r: r[0])


def events_per_second(total: int, batch: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(f"{tmp}/bench.db")
        endpoint = ReportsEndpoint(store, [SECRET.encode()])
        agent_id = "bench-agent"
        headers = {"Authorization": f"Bearer {make_token(SECRET, agent_id)}"}
        stream = f"{int(time.time() * 1000):013x}0123456789abcdef"
        bodies = []
        for start in range(0, total, batch):
            events = [
                {
                    "event_id": str(uuid.uuid4()),
                    "agent_id": agent_id,
                    "stream": stream,
                    "seq": seq,
                    "time": "2026-02-15T20:00:00Z",
                    "state": "downloading",
                    "version": "0.1.43",
                    "mode": "vm",
                    "platform": "linux-amd64",
                    "target_version": "0.1.44",
                    "manifest_serial": 42,
                }
                for seq in range(start + 1, min(start + batch, total) + 1)
            ]
            bodies.append(json.dumps({"events": events}).encode())
        started = time.perf_counter()
        for body in bodies:
            status, _, _ = endpoint.handle("POST", headers, body)
            if status != 202:
                raise SystemExit(f"unexpected status {status}")
        elapsed = time.perf_counter() - started
        store.close()
    return total / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    out = Report()
    load_at_start = load_average()
    baseline, _ = best_of(RUNS, "pass")
    total, top = best_of(RUNS, f"import {HANDLER}")
    boto_total, boto_top = best_of(RUNS, "import boto3")
    console_total, _ = best_of(RUNS, f"import {HANDLER}, {CONSOLE}")
    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys, {HANDLER}; print(' '.join(sorted(sys.modules)))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY or m == CONSOLE)
    full = events_per_second(5000, 100)
    batched, single = events_per_second(2000, 20), events_per_second(500, 1)
    out(f"Import times: `python -X importtime`, best of {RUNS} runs each.")
    out()
    out.table(
        ["figure", "value"],
        [
            [f"import {HANDLER}: self time of all imports", f"{total / 1000:.1f} ms"],
            ["interpreter start-up imports alone (`-c pass`)", f"{baseline / 1000:.1f} ms"],
            ["net cost of the handler module (the difference)", f"{(total - baseline) / 1000:.1f} ms"],
            ["cumulative time of the handler's own import", f"{top.get(HANDLER, 0) / 1000:.1f} ms"],
            ["import boto3, deferred to the first AWS request", f"{boto_top.get('boto3', 0) / 1000:.1f} ms"],
            [
                "first operator-API request adds (console_lambda, publisher, cryptography)",
                f"{(console_total - total) / 1000:.1f} ms",
            ],
            [f"modules the reports route imports: of {', '.join(HEAVY)}", ", ".join(heavy) or "none"],
            ["import boto3: self time of all imports in that run", f"{boto_total / 1000:.1f} ms"],
            ["SQLite core, 5000 events in 100-event batches", f"{full:,.0f} events/s"],
            ["SQLite core, 2000 events in 20-event batches", f"{batched:,.0f} events/s"],
            ["SQLite core, 500 single-event posts", f"{single:,.0f} events/s"],
        ],
    )
    out()
    out(f"Load average at the start / the end: {load_at_start} / {load_average()}")
    if not args.no_results:
        append(out.lines, title="bench/handler_importtime.py", command=command_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
