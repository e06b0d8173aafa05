"""A rollout plan with real agents: a release climbs by itself, a bad one stops itself (DESIGN section 6).

Four real ``avika-agent run`` processes (development builds, ``tests/agent_harness.py``) poll a
directory store served by ``publisher.serve`` and report through its endpoint into SQLite. A
thread runs the real ``avika-publish progress`` process in a loop, as the hourly job would, only
faster. Nobody else signs anything after each release.

- 1.1.0 released with the plan 25, 50, 100 (soak 2 s) reaches 100 % by itself: ``progress``
  advances each step only after its soak, the first wave's agent committed before 50 % was
  signed, and every agent commits 1.1.0;
- 1.2.0 (crashes at start) with the same plan halts itself at its first step: the canaries'
  watchdogs roll it back, ``progress`` exits 5 (``halted_now``) and re-signs at 0; no serial of
  1.2.0 is ever above 25 %, no agent outside the first wave tries it, every agent runs 1.1.0.

The agent ids are chosen for their buckets (fnv1a32(version + id) % 100) so that each wave holds
a different agent.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.manifest import rollout_bucket
from infra.reports.auth import make_token
from infra.reports.store import ReportStore
from publisher.archive import read_store
from publisher.plan import plan_from_options
from publisher.release import ReleaseSpec, release
from publisher.serve import make_server
from publisher.signing import load_signers, write_new_key
from publisher.stores import DirStore
from tests.agent_harness import PLATFORM, Host, dev_binary, wait_for
from tests.publisher_fixtures import proc_env

pytestmark = pytest.mark.slow

SECRET = "progress-e2e-fleet-secret-0123456789"
OLD, GOOD, BAD = "1.0.0", "1.1.0", "1.2.0"
PLAN = "25,50,100"
SOAK = 2


def pick_ids() -> dict[str, str]:
    """One agent per wave of GOOD (below 25, 25-49, two at 50 or above); only the first is in BAD's
    25 % wave."""
    wanted = {
        "first": (0, 25, True),
        "second": (25, 50, False),
        "third": (50, 100, False),
        "fourth": (50, 100, False),
    }
    found: dict[str, str] = {}
    for i in range(10_000):
        agent_id = f"agent-{i}"
        good, bad = rollout_bucket(agent_id, GOOD), rollout_bucket(agent_id, BAD)
        for role, (low, high, canary) in wanted.items():
            if (
                role not in found
                and low <= good < high
                and (bad < 25) == canary
                and agent_id not in found.values()
            ):
                found[role] = agent_id
                break
        if len(found) == len(wanted):
            return found
    raise AssertionError("no agent ids with those buckets")


@dataclass
class Loop:
    """``avika-publish progress`` run again and again (a real process each time), as a scheduler would."""

    argv: list[str]
    runs: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)

    def run(self) -> None:
        while not self.stop.is_set():
            done = subprocess.run(self.argv, capture_output=True, text=True, env=proc_env(), timeout=120)
            if done.returncode not in (0, 4, 5):
                self.errors.append(f"exit {done.returncode}: {done.stderr}")
            else:
                self.runs.append((done.returncode, json.loads(done.stdout)))
            self.stop.wait(0.5)

    def actions(self, version: str) -> list[tuple[int, str, int]]:
        return [(code, r["action"], r["percent"]) for code, r in self.runs if r["version"] == version]


@contextlib.contextmanager
def fleet(tmp_path: Path) -> Iterator[tuple[Any, DirStore, Path, str, dict[str, Host]]]:
    root = tmp_path / "www"
    (root / "updates").mkdir(parents=True)
    db = tmp_path / "reports.db"
    server = make_server(root, "127.0.0.1", 0, reports_url=f"sqlite:///{db}", fleet_secret=SECRET)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    key = tmp_path / "signing.pem"
    public = write_new_key(key)
    hosts: dict[str, Host] = {}
    try:
        for role, agent_id in pick_ids().items():
            host = Host(tmp_path / role, server.url + "/updates")
            host.env_extra.update(
                AGENT_ID=agent_id, UPDATE_REPORT_URL=None, UPDATE_REPORT_TOKEN=make_token(SECRET, agent_id)
            )  # type: ignore[arg-type]
            host.install(OLD, public.b64)
            hosts[role] = host
        yield server, DirStore(root / "updates"), key, public.b64, hosts
    finally:
        for host in hosts.values():
            host.kill_all()
        server.shutdown()
        server.server_close()
        if server.reports is not None:
            server.reports.store.close()


def publish(
    tmp_path: Path, store: DirStore, key: Path, server: Any, version: str, data: bytes, plan: bool
) -> None:
    path = tmp_path / "builds" / version / "avika-agent"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    spec = ReleaseSpec(
        version,
        {PLATFORM: path},
        rollout_percent=25 if plan else 100,
        reports_url=server.url + "/v1/reports",
        init=True,
        rollout_plan=plan_from_options(PLAN, f"{SOAK}s") if plan else None,
    )
    release(store, load_signers([str(key)], []), spec)


def serials(store: DirStore, key: Path, version: str) -> list[tuple[int, int, Any]]:
    """(serial, percent, signed_at) of every verified serial of ``version``, oldest first."""
    view = read_store(store, [load_signers([str(key)], [])[0].public_key])
    found = {m.serial: m for m in (e.manifest for e in view.verified) if m and m.version == version}
    return [
        (m.serial, m.rollout.percent, m.signed_at) for m in sorted(found.values(), key=lambda m: m.serial)
    ]


def committed_at(db: Path, agent_id: str, version: str) -> str | None:
    store = ReportStore.from_url(f"sqlite:///{db}")
    try:
        for event in store.agent_events(agent_id):
            if event["state"] == "committed" and event.get("target_version") == version:
                return event["received_at"]
    finally:
        store.close()
    return None


def test_a_plan_climbs_by_itself_and_a_bad_release_halts_itself_at_its_first_step(tmp_path: Path) -> None:
    with fleet(tmp_path) as (server, store, key, keys, hosts):
        db = tmp_path / "reports.db"
        publish(
            tmp_path,
            store,
            key,
            server,
            OLD,
            (tmp_path / "first" / "bin" / "avika-agent").read_bytes(),
            False,
        )
        for host in hosts.values():
            host.start()
        loop = Loop([sys.executable, "-m", "publisher.cli", "progress", "--json", "--reports", f"sqlite:///{db}",
                     "--key", str(key), "--store", str(store.root)])  # fmt: skip
        runner = threading.Thread(target=loop.run, daemon=True)
        runner.start()
        try:
            good = dev_binary(tmp_path / "rel" / "good", GOOD, keys)
            publish(tmp_path, store, key, server, GOOD, good, True)
            wait_for(
                lambda: all(h.converged(good, GOOD) for h in hosts.values()), 90, f"every agent on {GOOD}"
            )
            wait_for(
                lambda: loop.actions(GOOD) and loop.actions(GOOD)[-1][1] == "complete",
                60,
                "progress: complete",
            )
            steps = serials(store, key, GOOD)
            assert [percent for _, percent, _ in steps] == [25, 50, 100]  # nobody else signed anything
            for (_, _, began), (_, _, following) in itertools.pairwise(steps):
                assert (following - began).total_seconds() >= SOAK  # each step soaked first
            codes = {action: code for code, action, _ in loop.actions(GOOD)}
            assert codes["advanced"] == 0 and codes.get("halted_now") is None
            # the first wave (one agent: one ended attempt needed) committed before 50 % was signed
            signed = steps[1][2].strftime("%Y-%m-%dT%H:%M:%S")
            assert (committed_at(db, hosts["first"].env()["AGENT_ID"], GOOD) or "~")[:19] <= signed

            bad = dev_binary(tmp_path / "rel" / "bad", BAD, keys, "crash")
            publish(tmp_path, store, key, server, BAD, bad, True)
            canary = hosts["first"]
            wait_for(
                lambda: (5, "halted_now", 0) in loop.actions(BAD), 90, f"progress to halt {BAD} (exit 5)"
            )
            assert [p for _, p, _ in serials(store, key, BAD)] == [25, 0]
            wait_for(
                lambda: canary.running_version() == GOOD and canary.pending() is None,
                60,
                "the canary restored",
            )
            assert "rolled_back" in canary.chain(BAD)
            loop_runs = len(loop.actions(BAD))
            wait_for(lambda: len(loop.actions(BAD)) >= loop_runs + 2, 60, "two more progress runs")
            assert loop.actions(BAD)[-1] == (0, "halted", 0)  # halted stays halted: nothing signed
            assert [p for _, p, _ in serials(store, key, BAD)] == [25, 0]
            for role, host in hosts.items():
                assert host.target.read_bytes() == good and host.running_version() == GOOD, role
                if role != "first":
                    assert BAD not in {e.get("target_version") for e in host.events()}, role
            assert not loop.errors, loop.errors
        finally:
            loop.stop.set()
            runner.join(timeout=130)
