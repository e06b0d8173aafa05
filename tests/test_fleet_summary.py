"""The whole-fleet summary (publisher/fleet_summary.py) and the rollout-progress rule (fleet.py).

Rules enforced here:
- SQLite's aggregate path (counts in SQL, buckets, short ordered lists) and the one-pass path any
  store uses give the same summary, on a fleet with every kind of agent;
- the summary covers the whole fleet: totals, versions, states, modes, silent, updates available,
  failures, containers to roll, and the lists (silent oldest first, failures newest first,
  containers by id; at most ATTENTION_ROWS each);
- progress per mode against the live release: on it, ahead (newer, no downgrade), in the wave
  (bucket below the percent, or below min_version), behind; a Kubernetes workload id uses the
  controller's rule; a cached pass renders a new percent exactly as a fresh pass would;
- the cache reads the fleet at most once per ttl.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.manifest import Manifest, Rollout, fnv1a32, rollout_bucket
from infra.reports.store import SQLiteStore
from infra.reports.validation import validate_event
from publisher import fleet
from publisher.fleet_summary import (
    ATTENTION_ROWS,
    SummaryCache,
    pass_in_store,
    pass_over_rows,
    summarize,
)

NOW = 1_771_185_600.0


def live(version: str = "0.1.44", percent: int = 30, **fields: Any) -> Manifest:
    at = datetime.fromtimestamp(NOW, UTC)
    return Manifest(
        serial=7,
        version=version,
        released_at=at,
        expires=at + timedelta(days=30),
        binaries={},
        rollout=Rollout(percent, version),
        **fields,
    )


def event(agent_id: str, state: str, **fields: Any) -> dict[str, Any]:
    base = {
        "event_id": str(uuid.uuid4()),
        "agent_id": agent_id,
        "stream": f"{int((NOW - 86400) * 1000):013x}0123456789abcdef",
        "seq": 1,
        "time": "2026-02-15T19:00:00Z",
        "state": state,
        "version": "0.1.43",
        "mode": "vm",
        "platform": "linux-amd64",
        "target_version": "0.1.44",
        "manifest_serial": 7,
    }
    return validate_event({**base, **fields}, 0)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = SQLiteStore(tmp_path / "r.db")
    kinds = [
        lambda i: event(f"vm-{i:03d}", "committed", version="0.1.44"),
        lambda i: event(f"vm-{i:03d}", "committed", version="v0.1.44"),  # the same version as a tag
        lambda i: event(
            f"vm-{i:03d}", "heartbeat", target_version=None, manifest_serial=None, last_result="x"
        ),
        lambda i: event(f"vm-{i:03d}", "downloading"),
        lambda i: event(f"vm-{i:03d}", "rolled_back", failed_state="watching", error=f"too_many_boots {i}"),
        lambda i: event(f"vm-{i:03d}", "failed", target_version=None, failed_state="checking", error="fetch"),
        lambda i: event(f"vm-{i:03d}", "committed", version="0.1.45", target_version="0.1.45"),  # ahead
        lambda i: event(f"vm-{i:03d}", "committed", version="0.1.40", target_version="0.1.40"),  # below min
        lambda i: event(
            f"ctr-{i:03d}", "update_available", mode="container", image="x/a:0.1.44", in_wave=True
        ),
        lambda i: event(
            f"k8s/c{i % 3}/ns/deployment/app-{i}", "update_available", mode="container", image="x/a:1"
        ),
    ]
    for i in range(300):
        received = NOW - (5 * 3600 if i % 17 == 0 else i)  # some silent, all at distinct times
        s.put_events([kinds[i % len(kinds)](i)], received)
    yield s
    s.close()


@pytest.mark.parametrize(
    "release",
    [
        live(),
        live(percent=0),
        live(percent=100, min_version="0.1.42"),
        live(version="0.1.45", downgrade=False),
        live(version="0.1.43", downgrade=True),
        None,
    ],
    ids=["30%", "halted", "min_version", "newer", "downgrade", "no-release"],
)
def test_sql_and_one_pass_agree(store: Any, release: Manifest | None) -> None:
    rows = summarize(pass_over_rows(store.scan_all(), now=NOW, live=release), release)
    sql = summarize(pass_in_store(store, now=NOW, live=release), release)
    assert sql == rows
    assert rows["total"] == 300 and sum(rows["by_version"].values()) == 300


def test_the_summary_counts_and_lists(store: Any) -> None:
    s = summarize(pass_in_store(store, now=NOW, live=live()), live())
    view = fleet.read_fleet(store, now=NOW)["agents"]
    assert s["stale"] == sum(a["stale"] for a in view) == 18
    assert s["update_available"] == sum(a["update_available"] for a in view)
    assert s["failures"] == sum(a["state"] in ("failed", "rolled_back") for a in view) == 60
    assert s["containers_to_roll"] == sum(a["update_available"] and a["mode"] == "container" for a in view)
    assert s["by_mode"] == {"vm": 240, "container": 60}
    silent = s["attention"]["stale"]
    assert len(silent) == 18 and [a["last_seen"] for a in silent] == sorted(a["last_seen"] for a in silent)
    failures = s["attention"]["failures"]
    assert len(failures) == ATTENTION_ROWS
    assert [a["last_change"] for a in failures] == sorted((a["last_change"] for a in failures), reverse=True)
    assert all(a["mode"] == "container" and a["update_available"] for a in s["attention"]["update_available"])
    rollout = s["rollout"]
    assert sum(rollout["vm"].values()) == 240 and sum(rollout["container"].values()) == 60
    assert rollout["vm"]["on_live"] == 60 and rollout["vm"]["ahead"] == 30


def test_a_new_percent_renders_from_the_cached_pass(store: Any) -> None:
    done = pass_in_store(store, now=NOW, live=live(percent=10))
    for percent in (0, 10, 50, 100):
        release = live(percent=percent)
        assert summarize(done, release) == summarize(pass_in_store(store, now=NOW, live=release), release)


@pytest.mark.parametrize(
    ("version", "bucket", "release", "expected"),
    [
        ("0.1.44", 99, live(percent=0), "on_live"),
        ("v0.1.44", 99, live(), "on_live"),
        ("0.1.45", 0, live(), "ahead"),
        ("0.1.45", 0, live(downgrade=True), "in_wave"),
        ("0.1.45", 50, live(downgrade=True), "behind"),
        ("0.1.43", 29, live(percent=30), "in_wave"),
        ("0.1.43", 30, live(percent=30), "behind"),
        ("0.1.43", 0, live(percent=0), "behind"),
        ("0.1.40", 99, live(percent=0, min_version="0.1.42"), "in_wave"),
    ],
)
def test_progress_position(version: str, bucket: int, release: Manifest, expected: str) -> None:
    assert fleet.progress_position(version, bucket, release) == expected


def test_wave_buckets_are_the_agents_and_the_controllers_rules() -> None:
    assert fleet.wave_bucket("host-01", "0.1.44") == rollout_bucket("host-01", "0.1.44")
    workload = "k8s/prod-eu/avika/deployment/edge"
    assert fleet.wave_bucket(workload, "0.1.44") == fnv1a32(b"0.1.44prod-eu/avika/edge") % 100


def test_the_cache_reads_once_per_ttl(store: Any) -> None:
    clock = [NOW]
    cache = SummaryCache(60, clock=lambda: clock[0])
    release = live()
    first = cache.summary(store, stale_after=fleet.DEFAULT_STALE_AFTER, live=release)
    clock[0] += 59
    halted = cache.summary(
        store, stale_after=fleet.DEFAULT_STALE_AFTER, live=replace(release, rollout=Rollout(0, "0.1.44"))
    )
    assert cache.passes == 1 and halted["rollout"]["percent"] == 0 and first["rollout"]["percent"] == 30
    assert halted["rollout"]["vm"]["in_wave"] < first["rollout"]["vm"]["in_wave"]
    clock[0] += 1
    cache.summary(store, stale_after=fleet.DEFAULT_STALE_AFTER, live=release)
    assert cache.passes == 2
    cache.summary(store, stale_after=timedelta(hours=1), live=release)  # another question, another pass
    assert cache.passes == 3
