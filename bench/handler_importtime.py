"""Cold-start and throughput figures for the reports endpoint. Prints figures; asserts nothing.

1. Import cost of the Lambda entry module (`python -X importtime -c "import infra.reports.handler"`),
   net of the interpreter's own start-up imports, and the deferred cost of boto3 that the first
   AWS-backed request pays.
2. Events per second through `ReportsEndpoint` into SQLite (bounded: 2,000 events), in 20-event
   batches and in single-event posts (an agent reporting one state change at a time).

Run from the repository root: `.venv/bin/python bench/handler_importtime.py`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infra.reports.auth import make_token  # noqa: E402
from infra.reports.core import ReportsEndpoint  # noqa: E402
from infra.reports.store import SQLiteStore  # noqa: E402

LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")
SECRET = "bench-fleet-secret-0123456789"


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


def main() -> None:
    baseline, _ = best_of(3, "pass")
    total, top = best_of(3, "import infra.reports.handler")
    boto_total, boto_top = best_of(3, "import boto3")
    print(f"import infra.reports.handler: {total / 1000:.1f} ms total self time of all imports")
    print(f"  interpreter start-up imports alone: {baseline / 1000:.1f} ms")
    print(f"  net cost of the handler module:     {(total - baseline) / 1000:.1f} ms")
    print(f"  cumulative of the handler's import:  {top.get('infra.reports.handler', 0) / 1000:.1f} ms")
    print(f"deferred to the first AWS request: import boto3 {boto_top.get('boto3', 0) / 1000:.1f} ms")
    print(f"  (boto3 run total {boto_total / 1000:.1f} ms)")
    print(f"SQLite core, 2000 events in 20-event batches: {events_per_second(2000, 20):,.0f} events/s")
    print(f"SQLite core, 500 single-event posts:          {events_per_second(500, 1):,.0f} events/s")


if __name__ == "__main__":
    main()
