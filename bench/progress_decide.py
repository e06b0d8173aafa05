#!/usr/bin/env python3
"""What one ``avika-publish progress`` decision costs as the fleet grows (publisher/plan.py).

    .venv/bin/python bench/progress_decide.py [--agents 1000,10000,100000] [--no-results]

``progress`` reads every agent's latest state once per run (the hourly job) to count the agents in
the current wave; this times the pure part on synthetic rows (``publisher.plan.decide``: the wave
count with each agent's FNV-1a bucket, then the canary rule), at a 10 % step with 10 % of the
fleet having committed. The reads themselves cost what ``avika-publish fleet`` costs (one scan of
the agents' state items, section 5). Prints figures, appends them to ``bench/RESULTS.md`` and
asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

from results import Report, append, command_line, load_average, machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.manifest import Binary, Manifest, Rollout, RolloutPlan  # noqa: E402
from publisher.plan import FleetFacts, decide  # noqa: E402


def fleet(size: int) -> FleetFacts:
    ids = [f"host-{i:06d}.dc{i % 7}.example.com" for i in range(size)]
    agents = [{"agent_id": a, "mode": "vm", "version": "0.1.43", "state": "checking"} for a in ids]
    outcomes = [{"agent_id": a, "state": "committed"} for a in ids[::10]]
    return FleetFacts(outcomes, agents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", default="1000,10000,100000", help="fleet sizes, comma-separated")
    parser.add_argument("--no-results", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    sizes = [int(n) for n in args.agents.split(",")]
    now = datetime.now(UTC).replace(microsecond=0)
    live = Manifest(
        serial=5,
        version="0.1.44",
        released_at=now,
        expires=now + timedelta(days=30),
        binaries={"linux-amd64": Binary("binaries/x", "a" * 64, 1)},
        rollout=Rollout(10, "0.1.44"),
        signed_at=now,
        rollout_plan=RolloutPlan((10, 50, 100), "2h", "0.05", 20),
    )
    machine_line = machine()
    report = Report()
    report(f"load average at start: {load_average()}")
    rows = []
    for size in sizes:
        facts = fleet(size)
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            decision = decide(live, [live], facts, now + timedelta(hours=3))
            best = min(best, time.perf_counter() - started)
        tracemalloc.start()
        decide(live, [live], facts, now + timedelta(hours=3))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append(
            (
                f"{size:,}",
                decision.action,
                f"{decision.in_wave:,}",
                f"{best * 1000:.0f} ms",
                f"{peak / 2**20:.1f} MiB",
            )
        )
    report.table(("agents", "action", "in the 10 % wave", "decide (best of 3)", "peak extra memory"), rows)
    report(f"load average at end: {load_average()}")
    if not args.no_results:
        append(
            report.lines, title="bench/progress_decide.py", command=command_line(), machine_line=machine_line
        )


if __name__ == "__main__":
    main()
