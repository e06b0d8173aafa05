"""The demo's rollout-plan act (demo/plan_act.py), run on its own: ``python demo/plan_act.py --quick``.

It is the quick demo (``demo/run_demo.py``: 5 VM agents, 1 container, real processes) with the act
in place of the hand-driven steps 4-7. Checked from the artefacts, not from the narration alone:
the store's archive (``avika-publish history``: 0.1.44 signed at 25, 50 and 100 %, each step after
the soak; 0.1.45 at 25 and then 0 %, nothing in between), the demo's own story checks
(``summary.json``: no problems), every VM host's binary, and no process left behind.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from agent.manifest import parse_time, rollout_bucket
from tests.test_demo import kill_leftovers, leftovers

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ACT = ROOT / "demo" / "plan_act.py"
PUBLISH = Path(sys.executable).parent / "avika-publish"
OLD, NEW, BAD = "0.1.43", "0.1.44", "0.1.45"


def test_the_plan_act_climbs_by_itself_and_halts_the_bad_release_by_itself(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    try:
        done = subprocess.run(
            [sys.executable, str(ACT), "--quick", "--dir", str(workdir)],
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        left = leftovers(workdir) if (workdir / "pids.txt").exists() else []
        kill_leftovers(workdir)
    out = done.stdout
    assert done.returncode == 0, f"{done.stderr}\n{out}"
    assert left == [], f"processes left behind: {left}"
    assert f"==> 4. Publish {NEW} with a rollout plan 25 → 50 → 100 % (soak 3s)" in out
    assert f"==> 5. Publish the broken {BAD} with the same plan" in out
    assert f"[progress, exit 5] {BAD} HALTED" in out
    assert "no rollout typed by anyone" in out and "no canary or halt typed by anyone" in out

    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["problems"] == [] and summary["canary_exit"] == 5

    key = workdir / "signing-key.pem"
    history = subprocess.run(
        [str(PUBLISH), "history", "--key", str(key), "--store", str(workdir / "updates"), "--json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = sorted(json.loads(history), key=lambda r: r["serial"])
    assert all(r["verified"] for r in rows)
    climb = [r for r in rows if r["version"] == NEW]
    assert [r["rollout"] for r in climb] == [25, 50, 100]
    for before, after in itertools.pairwise(climb):
        assert parse_time(after["signed_at"]) - parse_time(before["signed_at"]) >= timedelta(seconds=3)
    assert [r["rollout"] for r in rows if r["version"] == BAD] == [25, 0]

    builds = workdir / "builds"
    agents = {a["agent_id"]: a for a in summary["agents"]}
    for agent_id, row in agents.items():
        target = workdir / "hosts" / agent_id / "bin" / "avika-agent"
        if row["mode"] == "vm":
            assert target.read_bytes() == (builds / f"avika-agent-{NEW}").read_bytes(), agent_id
            canary = rollout_bucket(agent_id, BAD) < 25
            assert (BAD in row["history"]) == canary, row
        else:
            assert target.read_bytes() == (builds / f"avika-agent-{OLD}").read_bytes(), agent_id
