"""The Kubernetes act of the demo runs as a test (``demo/kube_act.py --quick``): it must keep
telling a true story, checked from the artefacts (the reports store, the act's summary) and from
``/proc`` (nothing it started is left running).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.reports.store import ReportStore

ROOT = Path(__file__).resolve().parent.parent
ACT = ROOT / "demo" / "kube_act.py"
AGENT_ID = "k8s/demo/avika/daemonset/avika-agent"

pytestmark = pytest.mark.slow


def left_running(workdir: Path) -> list[str]:
    """Processes the act started (``kube/pids.txt``) that still run as what they were."""
    left = []
    for line in (workdir / "kube" / "pids.txt").read_text().splitlines():
        pid, role = line.split(" ", 1)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X") and (b"avika-controller" in cmdline or b"avika-publish" in cmdline):
            left.append(f"{pid} {role}")
    return left


def test_the_kubernetes_act_rolls_in_waves_and_rolls_a_crash_loop_back(tmp_path: Path) -> None:
    workdir = tmp_path / "kube-demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AVIKA_", "UPDATE_"))}
    done = subprocess.run(
        [sys.executable, str(ACT), "--dir", str(workdir), "--quick"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "==> 2. Publish 0.1.44 at 25 %: the controller moves worker-1, worker-4, worker-7" in out
    assert "Kubernetes act finished" in out
    summary = json.loads((workdir / "kube" / "summary.json").read_text())
    assert summary["problems"] == [] and summary["max_down"] == 1 and summary["canary"] == "worker-7"
    row = summary["row"]
    assert (row["version"], row["state"], row["target_version"]) == ("0.1.44", "rolled_back", "0.1.45")
    store = ReportStore.from_url(f"sqlite:///{workdir / 'reports.db'}")
    try:
        states = [
            e["state"] for e in sorted(store.agent_events(AGENT_ID), key=lambda e: (e["stream"], e["seq"]))
        ]
    finally:
        store.close()
    lifecycle = [s for s in states if s != "heartbeat"]
    assert lifecycle[0] == "restarting" and lifecycle[-2:] == ["restarting", "rolled_back"]
    assert lifecycle.count("committed") == 2
    assert len((workdir / "kube" / "pids.txt").read_text().splitlines()) == 2  # the CDN, the controller
    assert left_running(workdir) == []
