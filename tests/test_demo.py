"""`make demo` runs as a test: the newcomer's first command must keep telling a true story.

``demo/run_demo.py --quick`` (5 VM agents, 1 container, a simulated cluster of 8 nodes) runs end
to end; the test then checks what happened from the artefacts, not only from the demo's own words:
the reports store (SQLite), the store's archive (``avika-publish history``: the plan's steps, each
after its soak), the live manifest (``avika-publish show --json``), the bytes of every host's
target, the Kubernetes act's summary, the console's API, and ``/proc`` for any process left behind
(the demo records every pid it saw in ``pids.txt``). A second run is interrupted (SIGINT, as
Ctrl-C) once its agents update, and must leave nothing running.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.manifest import parse_time, rollout_bucket
from infra.reports.store import ReportStore

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "run_demo.py"
PUBLISH = Path(sys.executable).parent / "avika-publish"
OLD, NEW, BAD = "0.1.43", "0.1.44", "0.1.45"
KUBE_AGENT = "k8s/demo/avika/daemonset/avika-agent"

pytestmark = pytest.mark.slow


def alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] not in ("Z", "X")


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def leftovers(workdir: Path) -> list[str]:
    """Live processes the demo started: a recorded pid still running from the folder, or any
    process whose command line names the folder (a watchdog or restarted agent it never saw)."""
    marker = (str(workdir) + os.sep).encode()
    found = set()
    for line in (workdir / "pids.txt").read_text().splitlines():
        pid = int(line.split()[0])
        if alive(pid) and marker in cmdline(pid):
            found.add(pid)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            pid = int(entry.name)
            if marker in cmdline(pid) and alive(pid):
                found.add(pid)
    return [f"{pid}: {cmdline(pid).decode(errors='replace')}" for pid in sorted(found)]


def kill_leftovers(workdir: Path) -> None:
    """Clean up after a failed demo, so one failure does not leak processes into the suite."""
    marker = (str(workdir) + os.sep).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and marker in cmdline(int(entry.name)):
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)


def events(db: Path, agent_id: str) -> list[dict[str, Any]]:
    store = ReportStore.from_url(f"sqlite:///{db}")
    try:
        return sorted(store.agent_events(agent_id), key=lambda e: (e["stream"], e["seq"]))
    finally:
        store.close()


def test_quick_demo_tells_the_whole_story(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    try:
        done = subprocess.run(
            [sys.executable, str(DEMO), "--quick", "--dir", str(workdir)],
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        left = leftovers(workdir) if (workdir / "pids.txt").exists() else []
        kill_leftovers(workdir)
    out = done.stdout
    assert done.returncode == 0, f"{done.stderr}\n{out}"
    assert left == [], f"processes left behind: {left}"

    # It narrates each step in one line, names its folder, and times itself.
    assert f"Every file goes under {workdir}" in out
    for step in range(1, 14):
        assert f"\n==> {step}. " in out, f"step {step} not narrated"
    assert f"==> 4. Publish {NEW} with a rollout plan 25 → 50 → 100 % (soak 3s)" in out
    assert f"==> 5. Publish the broken {BAD} with the same plan" in out
    assert f"[progress, exit 5] {BAD} HALTED" in out
    assert "no rollout typed by anyone" in out and "no canary or halt typed by anyone" in out
    assert "==> 7. Publish 0.1.44 at 25 %: the controller moves worker-1, worker-4, worker-7" in out
    assert "==> 12. The console" in out and "/console/#token=" in out
    assert "Demo finished in" in out
    assert out.count("$ avika-publish fleet") == 4  # the fleet view at steps 3, 4, 5 and 10

    summary = json.loads((workdir / "summary.json").read_text())
    agents = {a["agent_id"]: a for a in summary["agents"]}
    vms = [a for a, row in agents.items() if row["mode"] == "vm"]
    containers = [a for a, row in agents.items() if row["mode"] == "container"]
    assert len(vms) == 5 and len(containers) == 1
    assert summary["problems"] == [] and summary["canary_exit"] == 5
    canaries = [a for a in vms if rollout_bucket(a, BAD) < 25]
    assert canaries and len(canaries) < len(vms)

    # The store's archive: 0.1.44 climbed 25 -> 50 -> 100, each step after its soak; 0.1.45 went
    # from 25 straight to 0 (progress halted it), nothing in between. Every serial verifies.
    history = subprocess.run(
        [str(PUBLISH), "history", "--key", str(workdir / "signing-key.pem"),
         "--store", str(workdir / "updates"), "--json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = sorted(json.loads(history), key=lambda r: r["serial"])
    assert all(r["verified"] for r in rows)
    climb = [r for r in rows if r["version"] == NEW]
    assert [r["rollout"] for r in climb] == [25, 50, 100]
    for before, after in itertools.pairwise(climb):
        assert parse_time(after["signed_at"]) - parse_time(before["signed_at"]) >= timedelta(seconds=3)
    assert [r["rollout"] for r in rows if r["version"] == BAD] == [25, 0]

    # The live manifest: 0.1.45 halted at rollout 0 by `progress`.
    show = subprocess.run(
        [str(PUBLISH), "show", "--store", str(workdir / "updates"), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    manifest = json.loads(show.stdout)
    assert (manifest["version"], manifest["rollout"]["percent"]) == (BAD, 0)
    assert manifest["serial"] == summary["halt_serial"] == rows[-1]["serial"]

    # Every VM host ends with the 0.1.44 binary in place and running it; containers never swap.
    builds = workdir / "builds"
    for agent_id in vms:
        target = workdir / "hosts" / agent_id / "bin" / "avika-agent"
        assert target.read_bytes() == (builds / f"avika-agent-{NEW}").read_bytes(), agent_id
        assert (agents[agent_id]["installed"], agents[agent_id]["running"]) == (NEW, NEW)
    for agent_id in containers:
        target = workdir / "hosts" / agent_id / "bin" / "avika-agent"
        assert target.read_bytes() == (builds / f"avika-agent-{OLD}").read_bytes(), agent_id
        assert not target.with_name("avika-agent.backup").exists()
    for agent_id in (*vms, *containers):  # each host's config holds its token: only the agent reads it
        host = workdir / "hosts" / agent_id
        assert (next(host.glob("*.conf")).stat().st_mode & 0o077) == 0, agent_id
        assert "holds UPDATE_REPORT_TOKEN" not in (host / "agent.log").read_text(), agent_id

    # The reports store holds the story.
    db = workdir / "reports.db"
    for agent_id in vms:
        stored = events(db, agent_id)
        committed = [e["target_version"] for e in stored if e["state"] == "committed"]
        assert committed == [NEW], (agent_id, stored)
        tried_bad = [e for e in stored if e.get("target_version") == BAD]
        if agent_id in canaries and tried_bad:
            rolled = [e for e in tried_bad if e["state"] == "rolled_back"]
            assert len(rolled) == 1, (agent_id, tried_bad)
            assert rolled[0]["version"] == NEW
            assert rolled[0]["error"].split(":")[0] in ("too_many_boots", "died_before_commit")
            assert agents[agent_id]["history"] == f"{OLD} → {NEW} → {BAD} ✗ → {NEW}"
        elif agent_id in canaries:  # the first failure halted the wave before this one's next check
            assert f"{agent_id}: in the wave, but {BAD} was halted before its next check: never tried" in out
            assert agents[agent_id]["history"] == f"{OLD} → {NEW}"
        else:
            assert tried_bad == [], f"{agent_id} is outside {BAD}'s wave but tried it: {tried_bad}"
            assert agents[agent_id]["history"] == f"{OLD} → {NEW}"
    for agent_id in containers:
        stored = events(db, agent_id)
        assert {e["state"] for e in stored} == {"update_available"}, stored
        assert NEW in {e["target_version"] for e in stored}
        assert {e["mode"] for e in stored} == {"container"}

    # The cluster: the 25 % wave one pod at a time, then the rest; 0.1.45 crash-looped on the one
    # canary node and was rolled back by the controller; its reports sit beside the VM agents'.
    kube = summary["kubernetes"]
    assert kube["problems"] == [] and kube["max_down"] == 1 and kube["canary"] == "worker-7"
    assert (kube["row"]["version"], kube["row"]["state"], kube["row"]["target_version"]) == (
        NEW,
        "rolled_back",
        BAD,
    )
    chain = [(e["state"], e["target_version"]) for e in events(db, KUBE_AGENT) if e["state"] != "heartbeat"]
    # Before 0.1.44 the controller may report its first look at 0.1.43 (a pass while the demo's
    # DaemonSet status settles): only ever about 0.1.43. From 0.1.44 on, the story as told.
    moved = chain[next(i for i, (_, target) in enumerate(chain) if target == NEW) :]
    assert all(target == OLD for _, target in chain[: len(chain) - len(moved)]), chain
    assert moved[0] == ("restarting", NEW), chain
    assert moved[-2:] == [("restarting", BAD), ("rolled_back", BAD)], chain
    assert [state for state, _ in moved].count("committed") == 2, chain
    fleet = subprocess.run(
        [str(PUBLISH), "fleet", "--reports", f"sqlite:///{db}", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    modes = {a["agent_id"]: a["mode"] for a in json.loads(fleet.stdout)["agents"]}
    assert modes[KUBE_AGENT] == "container" and all(modes[a] == "vm" for a in vms)


def test_ctrl_c_stops_every_process_the_demo_started(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-u", str(DEMO), "--quick", "--dir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 400
        for line in proc.stdout:  # interrupt once the fleet is updating: agents exec'd, watchdogs out
            lines.append(line)
            if line.startswith("==> 5.") or time.monotonic() > deadline:
                break
        assert any(line.startswith("==> 5.") for line in lines), "".join(lines)  # 0.1.44 climbed to 100 %
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole foreground group
        rest, _ = proc.communicate(timeout=60)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        left = leftovers(workdir)
        kill_leftovers(workdir)
    out = "".join(lines)
    assert proc.returncode == 130, out
    assert "demo: interrupted" in out and "none left" in out, out
    assert left == [], f"processes left behind: {left}"
    assert len((workdir / "pids.txt").read_text().splitlines()) >= 7  # the server and six agents
