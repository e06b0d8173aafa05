#!/usr/bin/env python3
"""The operator API at fleet scale (DESIGN section 9). Prints figures; asserts nothing.

    .venv/bin/python bench/console.py [--agents 100000] [--dynamodb-agents 3000] [--runs 15] [--no-results]

1. SQLite, ``--agents`` agents (a realistic mix: committed, heartbeats, containers with an update,
   rollbacks, downloads, 2 % silent), filled through ``ReportStore.put_events`` (the endpoint's own
   write path, with ``synchronous=OFF`` for the fill only). Then ``avika-publish serve --console``
   (the real server, in a thread) answers over HTTP on 127.0.0.1: ``/v1/fleet`` first page (500),
   filtered pages, a 304 poll, ``/v1/agents/{id}`` and ``/v1/releases``; median and worst of
   ``--runs``. Also the whole-fleet summary pass alone and ``fleet --json`` (every agent).
2. DynamoDB under moto (in-process), ``--dynamodb-agents`` agents: the items and bytes one poll reads
   (counted from the Query answers), how many whole-fleet passes 12 polls over one minute make
   (the summary is cached for 60 s), and the read units per summary refresh extrapolated to
   ``--agents`` from the measured item size (eventually consistent Query: 0.5 RCU per 4 KiB).
   moto's speed says nothing about DynamoDB's, so only counts and sizes are reported for it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from results import Report, append, command_line, load_average

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from infra.reports.console_api import ConsoleAPI, Request  # noqa: E402
from infra.reports.console_auth import Principal  # noqa: E402
from infra.reports.store import ReportStore, SQLiteStore  # noqa: E402
from infra.reports.validation import validate_event  # noqa: E402
from publisher import fleet, fleet_summary  # noqa: E402

READ_SECRET = "bench-read-secret-0123456789"
TOKENS = f"bench:read:{READ_SECRET}"
SECRET = "bench-fleet-secret-0123456789"
RCU_BYTES = 4096


def agent_events(n: int, now: float) -> tuple[list[dict[str, Any]], float]:
    """One event for agent ``n`` and the time it is received (2 % of agents went silent hours ago)."""
    agent_id = f"host-{n:06d}.dc{n % 7}"
    stream = f"{int((now - 86400) * 1000):013x}{n:016x}"
    base = {
        "event_id": str(uuid.uuid4()),
        "agent_id": agent_id,
        "stream": stream,
        "seq": 7,
        "time": "2026-02-15T20:00:00Z",
        "version": "0.1.44",
        "mode": "vm",
        "platform": "linux-amd64",
        "target_version": "0.1.44",
        "manifest_serial": 42,
    }
    kind = n % 100
    if kind < 55:
        event = {**base, "state": "committed"}
    elif kind < 75:
        event = {
            **base,
            "state": "heartbeat",
            "version": "0.1.43",
            "target_version": None,
            "manifest_serial": None,
            "last_result": "not_in_wave",
            "uptime_s": 3600,
        }
    elif kind < 85:
        event = {
            **base,
            "state": "update_available",
            "version": "0.1.43",
            "mode": "container",
            "image": "ghcr.io/avika/agent:0.1.44",
            "in_wave": True,
            "agent_id": f"k8s/c{n % 5}/ns/deployment/a{n}",
        }
    elif kind < 90:
        event = {
            **base,
            "state": "rolled_back",
            "version": "0.1.43",
            "failed_state": "watching",
            "error": "too_many_boots: 4 boots without a commit",
        }
    elif kind < 98:
        event = {**base, "state": "downloading", "version": "0.1.43"}
    else:
        return [{**base, "state": "committed"}], now - 6 * 3600
    return [event], now


def fill_sqlite(path: Path, agents: int, now: float) -> float:
    store = SQLiteStore(path)
    store._db.execute("PRAGMA synchronous=OFF")  # the fill only; the server reopens with FULL
    started = time.perf_counter()
    batch: list[dict[str, Any]] = []
    old: list[dict[str, Any]] = []
    for n in range(agents):
        events, received = agent_events(n, now)
        (batch if received == now else old).extend(validate_event(e, 0) for e in events)
        if len(batch) >= 500:
            store.put_events(batch, now)
            batch = []
    if batch:
        store.put_events(batch, now)
    for i in range(0, len(old), 500):
        store.put_events(old[i : i + 500], now - 6 * 3600)
    store.close()
    return time.perf_counter() - started


def timings(fn: Any, runs: int) -> tuple[float, float]:
    values = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        values.append(time.perf_counter() - started)
    return statistics.median(values), max(values)


def ms(pair: tuple[float, float]) -> str:
    return f"{pair[0] * 1000:,.0f} ms (worst {pair[1] * 1000:,.0f} ms)"


def release_store(tmp: Path) -> tuple[Path, Path]:
    from publisher import release as publishing
    from publisher.signing import load_key_file, write_new_key
    from publisher.stores import DirStore

    key = tmp / "key.pem"
    write_new_key(key)
    binary = tmp / "agent"
    binary.write_bytes(os.urandom(4096))
    root = tmp / "updates"
    root.mkdir()
    spec = publishing.ReleaseSpec(
        version="0.1.44", binaries={"linux-amd64": binary}, rollout_percent=50, init=True
    )
    publishing.release(DirStore(root), [load_key_file(key)], spec)
    return root, key


def bench_sqlite(out: Report, agents: int, runs: int, tmp: Path) -> None:
    from publisher.console_app import make_console
    from publisher.serve import make_server

    now = time.time()
    db = tmp / "reports.db"
    fill = fill_sqlite(db, agents, now)
    out(
        f"SQLite: {agents:,} agents filled through put_events in {fill:.1f} s; "
        f"database {db.stat().st_size / 1e6:.0f} MB"
    )
    root, key = release_store(tmp)
    console = make_console(f"sqlite:///{db}", str(root), key_files=[str(key)], tokens=TOKENS)
    server = make_server(root, port=0, reports_url=f"sqlite:///{db}", fleet_secret=SECRET, console=console)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    session = requests.Session()
    headers = {"Authorization": f"Bearer {READ_SECRET}"}

    def get(path: str, extra: dict[str, str] | None = None) -> requests.Response:
        answer = session.get(f"{server.url}{path}", headers={**headers, **(extra or {})}, timeout=120)
        if answer.status_code not in (200, 304):
            raise SystemExit(f"{path}: {answer.status_code} {answer.text[:200]}")
        return answer

    try:
        first = get("/v1/fleet")
        body = first.json()
        tag = first.headers["ETag"]
        rows = [
            [
                "`GET /v1/fleet` (first page, 500 agents + summary + release)",
                ms(timings(lambda: get("/v1/fleet"), runs)),
            ],
            [
                "same, `If-None-Match` answered 304",
                ms(timings(lambda: get("/v1/fleet", {"If-None-Match": tag}), runs)),
            ],
            [
                "`?state=rolled_back` (5 % of agents)",
                ms(timings(lambda: get("/v1/fleet?state=rolled_back"), runs)),
            ],
            ["`?stale=true` (2 %)", ms(timings(lambda: get("/v1/fleet?stale=true"), runs))],
            [
                "`?update_available=true&mode=container`",
                ms(timings(lambda: get("/v1/fleet?update_available=true&mode=container"), runs)),
            ],
            [
                "`?version=0.1.43&limit=5000`",
                ms(timings(lambda: get("/v1/fleet?version=0.1.43&limit=5000"), runs)),
            ],
            ["next page (`cursor`)", ms(timings(lambda: get(f"/v1/fleet?cursor={body['next']}"), runs))],
            [
                "`GET /v1/agents/host-000001.dc1`",
                ms(timings(lambda: get("/v1/agents/host-000001.dc1"), runs)),
            ],
            [
                "`GET /v1/releases` (history, canary over the live version, audit)",
                ms(timings(lambda: get("/v1/releases"), runs)),
            ],
        ]
        store = SQLiteStore(db)
        rows.append(
            [
                "whole-fleet summary pass alone (in process)",
                ms(
                    timings(
                        lambda: fleet_summary.fleet_pass(store, now=time.time(), live=None), max(3, runs // 3)
                    )
                ),
            ]
        )
        rows.append(
            [
                "`fleet --json` read (every agent, in process)",
                ms(timings(lambda: fleet.read_fleet(store, now=time.time()), max(3, runs // 3))),
            ]
        )
        store.close()
        out(
            f"HTTP on 127.0.0.1 (`serve --console`, real server), {runs} runs each; "
            f"page of {len(body['agents'])} agents, summary total {body['summary']['total']:,}, "
            f"first page {len(first.content) / 1e3:.0f} kB:"
        )
        out()
        out.table(["request", "median (worst)"], rows)
    finally:
        session.close()
        server.shutdown()
        server.server_close()
        console.api.reports.close()
        if server.reports is not None:
            server.reports.store.close()


def item_bytes(item: dict[str, Any]) -> int:
    """DynamoDB's item size: attribute names plus values (numbers approximated by their digits)."""
    total = 0
    for name, value in item.items():
        (kind, v), *_ = value.items()
        total += len(name.encode()) + (1 if kind in ("BOOL", "NULL") else len(str(v).encode()))
    return total


def bench_dynamodb(out: Report, agents: int, extrapolate: int) -> None:
    from moto import mock_aws

    sys.path.insert(0, str(ROOT / "tests"))
    from reports_fixtures import AWS_ENV, create_table

    for name, value in AWS_ENV.items():
        os.environ[name] = value
    os.environ.pop("AWS_ENDPOINT_URL", None)
    with mock_aws():
        create_table("bench")
        store = ReportStore.from_url("dynamodb://bench")
        now = time.time()
        started = time.perf_counter()
        batch: list[dict[str, Any]] = []
        for n in range(agents):
            events, received = agent_events(n, now)
            store.put_events([validate_event(e, 0) for e in events], received)
        del batch
        fill = time.perf_counter() - started
        read = {"items": 0, "bytes": 0, "queries": 0}

        def count(parsed: dict[str, Any], **_: Any) -> None:
            items = parsed.get("Items", [])
            read["queries"] += 1
            read["items"] += len(items)
            read["bytes"] += sum(item_bytes(i) for i in items)

        store.client.meta.events.register("after-call.dynamodb.Query", count)
        clock = [now]
        api = ConsoleAPI(store, None, clock=lambda: clock[0])
        viewer = Principal("bench", frozenset({"read"}))
        polls = []
        for _ in range(12):  # one minute of a console polling every 5 s
            read.update(items=0, bytes=0, queries=0)
            answer = api.respond(Request("GET", "/v1/fleet", "", {}), viewer)
            assert answer.status == 200, answer.body
            polls.append(dict(read))
            clock[0] += 5
        first, later = polls[0], polls[1:]
        passes = api.summaries.passes
        clock[0] += 60
        read.update(items=0, bytes=0, queries=0)
        api.respond(Request("GET", "/v1/fleet", "", {}), viewer)
        refresh = dict(read)
        per_item = (first["bytes"] - later[0]["bytes"]) / max(1, first["items"] - later[0]["items"])
        full_rcu = extrapolate * per_item / RCU_BYTES * 0.5
        page_rcu = later[0]["bytes"] / RCU_BYTES * 0.5
        out(
            f"DynamoDB (moto, in process): {agents:,} agents written through put_events in {fill:.0f} s "
            "(moto's pace, not DynamoDB's)."
        )
        out()
        hourly = 60 * full_rcu + 720 * page_rcu
        out.table(
            ["figure", "value"],
            [
                [
                    "first poll: items read (page + summary pass)",
                    f"{first['items']:,} ({first['queries']} queries)",
                ],
                ["later polls in the minute: items read (page only)", f"{later[0]['items']:,}"],
                ["whole-fleet passes in 12 polls over 60 s", str(passes)],
                ["poll after the minute: items read (summary again)", f"{refresh['items']:,}"],
                ["mean STATE item size", f"{per_item:,.0f} bytes"],
                [f"RCU per summary refresh at {extrapolate:,} agents", f"{full_rcu:,.0f}"],
                ["RCU per poll (a 500-agent page)", f"{page_rcu:,.0f}"],
                [f"RCU per open console per hour at {extrapolate:,} agents", f"{hourly:,.0f}"],
            ],
        )
        json.dumps(refresh)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=100_000)
    parser.add_argument("--dynamodb-agents", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    out = Report()
    load_at_start = load_average()
    with tempfile.TemporaryDirectory(prefix="avika-bench-console-") as tmp:
        bench_sqlite(out, args.agents, args.runs, Path(tmp))
        out()
        bench_dynamodb(out, args.dynamodb_agents, args.agents)
    out()
    out(f"Load average at the start / the end: {load_at_start} / {load_average()}")
    if not args.no_results:
        append(out.lines, title="bench/console.py", command=command_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
