"""``avika-publish rollback-to``: the fleet's one-command rollback, end to end (DESIGN section 6).

Real parts only: two versions built with ``make agent-binary``, published with ``avika-publish
release`` and served (with the reports endpoint) by ``avika-publish serve``; three hosts each run
``avika-agent run`` (exec restarts, the watchdog, reports with their enrolled tokens). The fleet
goes 1.0.0 -> 1.1.0 and commits; then one command, ``rollback-to 1.0.0``, takes every host back:
download, verify, swap, exec, commit, reported. ``fleet`` then counts everyone on 1.0.0, and
``history`` shows the rollback as the newest, downgrade, serial.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from infra.reports.auth import make_token
from tests.agent_harness import PLATFORM, Host, wait_for
from tests.publisher_fixtures import REPO, proc_env, run_publish

pytestmark = pytest.mark.slow
SECRET = "a-fleet-secret-of-enough-length"
HOSTS = 3


def built(tmp_path: Path, version: str, public: str) -> Path:
    out = tmp_path / "dist" / version / f"avika-agent-{PLATFORM}"
    out.parent.mkdir(parents=True, exist_ok=True)
    # -o: never let this test reinstall the venv (no network), whatever pyproject's mtime says
    make = ["make", "-s", "-o", ".venv/.installed-stamp", "agent-binary"]
    done = subprocess.run(
        [*make, f"VERSION={version}", f"OUT={out}", f"PUBLIC_KEYS={public}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def test_rollback_to_takes_a_fleet_of_real_agents_back_to_the_previous_version(tmp_path: Path) -> None:
    key, store, reports = tmp_path / "signing.pem", tmp_path / "store", tmp_path / "reports.db"
    done = run_publish("keygen", "--out", str(key), "--json")
    assert done.returncode == 0, done.stderr
    public = json.loads(done.stdout)["public_key"]
    old, new = built(tmp_path, "1.0.0", public), built(tmp_path, "1.1.0", public)
    signing = ("--key", str(key), "--store", str(store))

    store.mkdir()
    serve = subprocess.Popen(
        [sys.executable, "-m", "publisher.cli", "serve", "--root", str(store), "--port", "0",
         "--reports", f"sqlite:///{reports}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
        env=proc_env(AVIKA_FLEET_SECRET=SECRET),
    )  # fmt: skip
    hosts: list[Host] = []
    try:
        assert serve.stdout is not None
        url = serve.stdout.readline().split()[-1]
        released = run_publish(
            "release", "1.0.0", "--init", f"--binary={PLATFORM}={old}", "--reports-url", f"{url}/v1/reports",
            *signing,
        )  # fmt: skip
        assert released.returncode == 0, released.stderr
        for i in range(HOSTS):
            host = Host(tmp_path / f"web-{i:02d}", url, {
                "SHIV_ROOT": str(tmp_path / "cache"), "AVIKA_AGENT_CACHE": str(tmp_path / "cache"),
                "PEX_ROOT": str(tmp_path / "cache"), "UPDATE_REPORT_URL": None,  # the manifest's
                "UPDATE_REPORT_TOKEN": make_token(SECRET, f"host-web-{i:02d}"),
            })  # fmt: skip
            host.target.parent.mkdir(parents=True)
            host.target.write_bytes(old.read_bytes())
            host.target.chmod(0o755)
            hosts.append(host)
            host.start()

        forward = run_publish("release", "1.1.0", f"--binary={PLATFORM}={new}", *signing)
        assert forward.returncode == 0, forward.stderr
        for host in hosts:
            wait_for(
                lambda host=host: host.converged(new.read_bytes(), "1.1.0"), 120, f"{host.dir.name} on 1.1.0"
            )

        back = run_publish("rollback-to", "1.0.0", *signing)
        assert back.returncode == 0, back.stderr
        assert "downgrade    yes" in back.stdout and "from archived serial 1" in back.stderr

        for host in hosts:
            wait_for(
                lambda host=host: host.converged(old.read_bytes(), "1.0.0"),
                120,
                f"{host.dir.name} back on 1.0.0",
            )
            status = host.status()
            assert (status["version"], status["highest_serial"], status["pending"]) == ("1.0.0", 3, None)
            assert status["running"]["version"] == "1.0.0"
            committed = [e for e in host.events() if e["state"] == "committed"]
            assert [e["target_version"] for e in committed][-2:] == ["1.1.0", "1.0.0"]

        def fleet_on_old() -> dict | None:
            done = run_publish("fleet", "--reports", f"sqlite:///{reports}", "--json")
            view = json.loads(done.stdout) if done.returncode == 0 else None
            return view if view and view["versions"] == {"1.0.0": HOSTS} else None

        view = wait_for(fleet_on_old, 60, "the reports to show the fleet on 1.0.0")
        assert {a["state"] for a in view["agents"]} == {"committed"}
        rows = json.loads(run_publish("history", "--json", *signing).stdout)
        assert [(r["serial"], r["version"], r["downgrade"], r["live"]) for r in rows] == [
            (3, "1.0.0", True, True), (2, "1.1.0", False, False), (1, "1.0.0", False, False),
        ]  # fmt: skip
    finally:
        for host in hosts:
            host.kill_all()
        serve.terminate()
        serve.wait(timeout=10)
