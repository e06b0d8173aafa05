"""Liveness end to end (DESIGN sections 5 and 6): a real agent process, its real heartbeats, the
real ``serve`` endpoint and the real ``avika-publish fleet``.

Rules enforced here:
- a quiet agent's heartbeats move ``last_seen`` while its state (``update_available``) and its
  ``last_change`` stay put, and show the last check's result (``last_result``);
- heartbeats never enter the history: ``fleet AGENT_ID`` lists the one state change only;
- an agent that stops goes silent: ``stale`` once ``last_seen`` is older than ``--stale-after``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from infra.reports.auth import make_token
from infra.reports.store import ReportStore
from publisher.release import ReleaseSpec, release
from publisher.serve import make_server
from publisher.stores import DirStore
from tests.agent_harness import PLATFORM, Host, dev_binary, keys_of, new_signer, wait_for

pytestmark = pytest.mark.slow

SECRET = "liveness-e2e-fleet-secret-0123456789"


def fleet(db: str, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "publisher.cli", "fleet", "--reports", db, "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_quiet_agents_heartbeats_keep_it_alive_and_out_of_history(tmp_path: Path) -> None:
    root = tmp_path / "www"
    (root / "updates").mkdir(parents=True)
    db = f"sqlite:///{tmp_path / 'reports.db'}"
    server = make_server(root, "127.0.0.1", 0, reports_url=db, fleet_secret=SECRET)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    store = ReportStore.from_url(db)
    host = Host(tmp_path / "h", server.url + "/updates")
    me = host.env()["AGENT_ID"]
    host.env_extra.update(
        DEPLOYMENT_MODE="container",
        UPDATE_HEARTBEAT_INTERVAL="1s",
        UPDATE_REPORT_URL=server.url + "/v1/reports",
        UPDATE_REPORT_TOKEN=make_token(SECRET, me),
    )
    try:
        signer = new_signer()
        keys = keys_of(signer)
        host.install("1.0.0", keys)
        build = tmp_path / "builds" / f"avika-agent-{PLATFORM}"
        build.parent.mkdir(parents=True)
        build.write_bytes(dev_binary(tmp_path / "rel" / "avika-agent", "1.1.0", keys))
        spec = ReleaseSpec("1.1.0", {PLATFORM: build}, image="hellodk/avika-agent:1.1.0", init=True)
        release(DirStore(root / "updates"), [signer], spec)
        host.start()

        first = wait_for(lambda: store.agent(me), 60, "the agent's first report")
        assert first["state"] == "update_available"
        alive = wait_for(
            lambda: (
                (row := store.agent(me))
                and row["last_result"]
                and row["last_seen"] > first["last_seen"]
                and row
            ),
            60,
            "a heartbeat to move last_seen",
        )
        later = wait_for(
            lambda: (row := store.agent(me)) and row["last_seen"] > alive["last_seen"] and row,
            60,
            "another heartbeat",
        )
        [agent] = fleet(db)["agents"]
        assert (agent["state"], agent["version"], agent["stale"]) == ("update_available", "1.0.0", False)
        assert agent["last_result"] == "container"  # the last check's decision reason
        assert agent["last_change"] == first["last_change"] and agent["last_seen"] >= later["last_seen"]
        assert agent["last_seen"] > agent["last_change"]
        history = fleet(db, me)
        assert [e["state"] for e in history["events"]] == ["update_available"]
        assert [e["state"] for e in store.agent_events(me)] == ["update_available"]

        host.kill_all()  # the agent stops: nothing more arrives
        stopped = store.agent(me)["last_seen"]
        time.sleep(3)
        assert store.agent(me)["last_seen"] == stopped
        [silent] = fleet(db, "--stale-after", "2s")["agents"]
        assert silent["stale"] is True and silent["state"] == "update_available"
        assert fleet(db, "--stale-after", "2s", "--stale")["agents"] == [silent]
    finally:
        host.kill_all()
        server.shutdown()
        server.server_close()
        store.close()
        if server.reports is not None:
            server.reports.store.close()
