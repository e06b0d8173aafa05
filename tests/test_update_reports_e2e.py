"""Reports end to end: real agents updating against ``publisher.serve`` and its SQLite endpoint.

Real ``avika-agent run`` processes (development builds, ``tests/agent_harness.py``) update from a
release published by ``publisher.release`` into a directory served by
``publisher.serve.make_server`` (127.0.0.1, port 0), whose ``POST /v1/reports`` stores into SQLite
(DESIGN section 5). Each agent reports with its enrolment token (``infra.reports.auth.make_token``);
the endpoint is found through the manifest's ``reports_url`` or ``UPDATE_REPORT_URL``.

What must hold (DESIGN sections 4 and 5):
- a VM update's lifecycle chain (update_available, downloading, verifying, staged, restarting,
  watching, committed) reaches the store exactly once per state, in order, in one stream across the
  exec (the queue outlives the process);
- the new version commits only once a report was delivered: while the endpoint refuses, it keeps
  watching although its health window passed and its checks succeed;
- a version that crashes at start is rolled back by the watchdog, and the store holds its
  ``rolled_back`` (failed_state, ``too_many_boots``) once, in the same stream, from the old version;
- a container agent reports one ``update_available`` with the image and ``in_wave``; its target is
  never touched;
- ``avika-publish fleet --json`` over the same store shows each agent as it ended: the VM committed
  on the new version, the container on the old one with an update available;
- an agent with nothing to report sends a ``heartbeat`` after ``UPDATE_HEARTBEAT_INTERVAL`` of
  silence (version, mode, platform, ``last_result`` = its last check's reason, ``uptime_s``); the
  endpoint accepts each one and the agent's ``last_seen`` moves, while the agent itself stays put
  (no other event, no install attempt, the target untouched). What the endpoint then records
  beyond ``last_seen`` (no event item, no state change) is the endpoint's own test's business.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from infra.reports.auth import make_token
from infra.reports.store import ReportStore
from publisher.release import ReleaseSpec, release
from publisher.resign import resign
from publisher.serve import UpdateServer, make_server
from publisher.stores import DirStore
from tests.agent_harness import COMMITTED_CHAIN, PLATFORM, Host, dev_binary, keys_of, new_signer, wait_for

pytestmark = pytest.mark.slow

SECRET = "reports-e2e-fleet-secret-0123456789"
IMAGE = "hellodk/avika-agent:1.1.0"
CHAIN = COMMITTED_CHAIN


@dataclass
class ReportsSite:
    """A directory store served with the reports endpoint; ``store`` reads what the endpoint wrote."""

    tmp: Path
    server: UpdateServer
    updates: DirStore
    signer: Any
    store: ReportStore
    reports_db: str

    @property
    def update_server(self) -> str:
        return self.server.url + "/updates"

    @property
    def reports_url(self) -> str:
        return self.server.url + "/v1/reports"

    def release(self, version: str, data: bytes) -> int:
        path = self.tmp / "builds" / version / f"avika-agent-{PLATFORM}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        spec = ReleaseSpec(version, {PLATFORM: path}, image=IMAGE, reports_url=self.reports_url, init=True)
        return release(self.updates, [self.signer], spec).manifest.serial

    def resign(self) -> int:
        return resign(self.updates, [self.signer]).manifest.serial

    def fleet(self) -> dict[str, Any]:
        """What an operator sees: the real ``avika-publish fleet --json`` over the same store."""
        done = subprocess.run(
            [sys.executable, "-m", "publisher.cli", "fleet", "--reports", self.reports_db, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def events(self, agent_id: str) -> list[dict[str, Any]]:
        """The agent's stored events in queue order (stream, seq)."""
        return sorted(self.store.agent_events(agent_id), key=lambda e: (e["stream"], e["seq"]))

    @contextlib.contextmanager
    def reports_refused(self) -> Iterator[None]:
        """``POST /v1/reports`` answers 404 (endpoint unplugged): the agent keeps and retries."""
        endpoint, self.server.reports = self.server.reports, None
        try:
            yield
        finally:
            self.server.reports = endpoint


@contextlib.contextmanager
def reports_site(tmp_path: Path) -> Iterator[ReportsSite]:
    root = tmp_path / "www"
    (root / "updates").mkdir(parents=True)
    db = f"sqlite:///{tmp_path / 'reports.db'}"
    server = make_server(root, "127.0.0.1", 0, reports_url=db, fleet_secret=SECRET)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    store = ReportStore.from_url(db)
    endpoint = server.reports
    try:
        yield ReportsSite(tmp_path, server, DirStore(root / "updates"), new_signer(), store, db)
    finally:
        server.shutdown()
        server.server_close()
        store.close()
        if endpoint is not None:
            endpoint.store.close()


class Arrivals:
    """In front of the real endpoint: every event it was sent, with the status it answered."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.store = real.store
        self.seen: list[tuple[int, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def handle(self, method: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        answer = self.real.handle(method, headers, body)
        with contextlib.suppress(ValueError, KeyError, TypeError), self._lock:
            self.seen += [(answer[0], event) for event in json.loads(body)["events"]]
        return answer

    def events(self, agent_id: str) -> list[tuple[int, dict[str, Any]]]:
        with self._lock:
            return [(status, e) for status, e in self.seen if e.get("agent_id") == agent_id]


def enrolled_host(site: ReportsSite, tmp_path: Path, **env: str | None) -> Host:
    """A host whose agent reports with its token (``UPDATE_REPORT_URL`` unset: the manifest's)."""
    host = Host(tmp_path / "h", site.update_server)
    host.env_extra.update(
        UPDATE_REPORT_URL=None, UPDATE_REPORT_TOKEN=make_token(SECRET, agent_id(host)), **env
    )  # type: ignore[arg-type]
    return host


def agent_id(host: Host) -> str:
    return host.env()["AGENT_ID"]


def states(events: list[dict[str, Any]]) -> list[str]:
    return [e["state"] for e in events]


def test_a_vm_update_reaches_the_store_once_per_state_and_commits_only_after_a_delivery(tmp_path):
    with reports_site(tmp_path) as site:
        host = enrolled_host(site, tmp_path)
        keys = keys_of(site.signer)
        old = host.install("1.0.0", keys)
        new = dev_binary(tmp_path / "rel" / "avika-agent", "1.1.0", keys)
        site.release("1.1.0", new)
        me = agent_id(host)
        try:
            with site.reports_refused():
                proc = host.start()
                watched = wait_for(
                    lambda: (p := host.pending()) and p["boots"] == 1 and p, 30, "the new version on watch"
                )
                assert host.agent_record()["pid"] == proc.pid  # exec'd: the same process
                # Health window 1 s, a check every 1 s: only the delivered report is missing.
                wait_for(lambda: host.state().get("last_check", "") > watched["swapped_at"], 10, "a check")
                time.sleep(3)
                assert host.pending() == watched, "committed (or rolled back) without a delivered report"
                assert "committed" not in host.chain("1.1.0") and site.store.agent_events(me) == []
            wait_for(lambda: host.converged(new, "1.1.0"), 60, "the commit once reports are delivered")
            stored = wait_for(lambda: (e := site.events(me)) and e[-1]["state"] == "committed" and e, 30,
                              "the commit's report")  # fmt: skip
            assert states(stored) == CHAIN  # each state exactly once, in order
            assert {e["stream"] for e in stored} == {stored[0]["stream"]}  # one queue across the exec
            assert [e["seq"] for e in stored] == list(range(1, len(CHAIN) + 1))  # nothing lost or resent
            assert {e["target_version"] for e in stored} == {"1.1.0"}
            assert [e["version"] for e in stored] == ["1.0.0"] * 5 + ["1.1.0"] * 2
            assert {(e["mode"], e["platform"], e["manifest_serial"]) for e in stored} == {("vm", PLATFORM, 1)}
            assert site.store.agent(me)["state"] == "committed"
            assert [o["state"] for o in site.store.version_outcomes("1.1.0")] == ["committed"]
            assert host.backup.read_bytes() == old
            fleet = site.fleet()
            row = next(a for a in fleet["agents"] if a["agent_id"] == me)
            assert (row["mode"], row["version"], row["state"], row["target_version"]) == (
                "vm",
                "1.1.0",
                "committed",
                "1.1.0",
            )
            assert row["update_available"] is False and row["last_error"] is None
            assert fleet["versions"] == {"1.1.0": 1}
        finally:
            host.kill_all()


def test_a_version_that_crashes_at_start_is_reported_rolled_back_once(tmp_path):
    with reports_site(tmp_path) as site:
        host = enrolled_host(site, tmp_path)
        keys = keys_of(site.signer)
        old = host.install("1.0.0", keys)
        bad = dev_binary(tmp_path / "rel" / "avika-agent", "1.1.0", keys, "crash")
        site.release("1.1.0", bad)
        me = agent_id(host)
        host.start()
        try:
            wait_for(lambda: host.running_version() == "1.0.0" and host.pending() is None
                     and "rolled_back" in host.chain("1.1.0"), 30, "the rollback")  # fmt: skip
            stored = wait_for(lambda: (e := site.events(me)) and "rolled_back" in states(e) and e, 30,
                              "the rollback's report")  # fmt: skip
            time.sleep(1.5)  # the restored agent keeps checking: the bad version is never retried
            stored = site.events(me)
            assert states(stored) == [*CHAIN[:5], "rolled_back"]
            assert [e["seq"] for e in stored] == list(range(1, 7)) and len({e["stream"] for e in stored}) == 1
            rolled = stored[-1]
            assert rolled["target_version"] == "1.1.0" and rolled["version"] == "1.0.0"
            assert rolled["failed_state"] in ("restarting", "watching")
            assert rolled["error"].split(":")[0] in ("too_many_boots", "died_before_commit"), rolled
            assert site.store.agent(me)["state"] == "rolled_back"
            assert [o["state"] for o in site.store.version_outcomes("1.1.0")] == ["rolled_back"]
            assert host.target.read_bytes() == old
        finally:
            host.kill_all()


def test_a_container_agent_reports_update_available_once_and_never_touches_the_target(tmp_path):
    with reports_site(tmp_path) as site:
        host = enrolled_host(site, tmp_path, DEPLOYMENT_MODE="container")
        host.env_extra["UPDATE_REPORT_URL"] = site.reports_url  # configured, not from the manifest
        keys = keys_of(site.signer)
        old = host.install("1.0.0", keys)
        before = host.target.stat()
        site.release("1.1.0", dev_binary(tmp_path / "rel" / "avika-agent", "1.1.0", keys))
        me = agent_id(host)
        host.start()
        try:
            wait_for(lambda: site.events(me), 30, "the report")
            serial = site.resign()  # more checks of the same release: no second report
            wait_for(lambda: host.state().get("highest_serial") == serial, 15, "the re-signed manifest")
            time.sleep(1.5)
            stored = site.events(me)
            assert len(stored) == 1, stored
            event = stored[0]
            assert (event["state"], event["image"], event["in_wave"]) == ("update_available", IMAGE, True)
            assert (event["mode"], event["target_version"], event["version"]) == (
                "container",
                "1.1.0",
                "1.0.0",
            )
            assert site.store.version_outcomes("1.1.0") == []  # not an install attempt
            assert site.store.agent(me)["state"] == "update_available"
            (row,) = site.fleet()["agents"]
            assert (row["agent_id"], row["mode"], row["version"], row["state"]) == (
                me,
                "container",
                "1.0.0",
                "update_available",
            )
            assert row["update_available"] is True and row["target_version"] == "1.1.0"
            assert host.target.read_bytes() == old and host.target.stat().st_mtime_ns == before.st_mtime_ns
            assert not host.backup.exists() and host.stray_files() == [] and host.pending() is None
        finally:
            host.kill_all()


def test_a_quiet_agent_sends_heartbeats_that_reach_the_endpoint_while_it_stays_put(tmp_path):
    with reports_site(tmp_path) as site:
        arrivals = Arrivals(site.server.reports)
        site.server.reports = arrivals  # type: ignore[assignment]
        host = enrolled_host(site, tmp_path, DEPLOYMENT_MODE="container", UPDATE_HEARTBEAT_INTERVAL="1s")
        host.env_extra["UPDATE_REPORT_URL"] = site.reports_url
        keys = keys_of(site.signer)
        old = host.install("1.0.0", keys)
        site.release("1.1.0", dev_binary(tmp_path / "rel" / "avika-agent", "1.1.0", keys))
        me = agent_id(host)
        host.start()
        try:
            first = wait_for(lambda: site.store.agent(me), 30, "the first report")
            assert first["state"] == "update_available"
            seen = wait_for(
                lambda: (
                    (e := arrivals.events(me)) and sum(x["state"] == "heartbeat" for _, x in e) >= 3 and e
                ),
                60,
                "three heartbeats at the endpoint",
            )
            # The endpoint keeps the agent's last_seen moving (its own bookkeeping: any event counts).
            wait_for(lambda: site.store.agent(me)["last_seen"] > first["last_seen"], 30, "last_seen to move")
            assert {status for status, _ in seen} == {202}
            events = [e for _, e in seen]
            assert [e["state"] for e in events] == ["update_available"] + ["heartbeat"] * (len(events) - 1)
            beats = events[1:]
            assert {(e["version"], e["mode"], e["platform"]) for e in beats} == {
                ("1.0.0", "container", PLATFORM)
            }
            assert {(e["target_version"], e["manifest_serial"]) for e in beats} == {(None, None)}
            assert {e["last_result"] for e in beats} == {"container"}  # the last check's decision reason
            uptimes = [e["uptime_s"] for e in beats]
            assert all(isinstance(u, int) for u in uptimes) and uptimes == sorted(uptimes) and uptimes[0] >= 1
            assert {e["stream"] for e in events} == {events[0]["stream"]}  # one queue, numbered on
            assert [e["seq"] for e in events] == sorted({e["seq"] for e in events})
            # The agent stays put: nothing but heartbeats after its one report, no attempt anywhere.
            assert host.chain("1.1.0") == ["update_available"]
            assert site.store.version_outcomes("1.1.0") == [] and host.pending() is None
            assert host.target.read_bytes() == old and not host.backup.exists()
        finally:
            host.kill_all()
