"""`make demo`: signed releases reach a fleet of real agents and a cluster; bad ones stop themselves.

On loopback only, with no AWS and nothing downloaded at run time. Everything it writes lands
under one folder (``demo-run/`` by default, or ``--dir``), which it names at the start and wipes
first. The story:

1. an Ed25519 signing key (``avika-publish keygen``);
2. three agent files built by ``packaging/build_agent.py`` (what ``make agent-binary`` runs),
   the public key embedded: 0.1.43, 0.1.44, and a broken 0.1.45 (the real 0.1.45 build behind a
   launcher that answers ``version`` but exits 1 when started to run);
3. 0.1.43 published, ``avika-publish serve`` (store + reports endpoint into SQLite) and a fleet
   of real ``avika-agent run`` processes, each with its own copy of the 0.1.43 file, state dir
   and enrolment token; some run in container mode;
4-5. the rollout-plan act (``demo/plan_act.py``): 0.1.44 is released with a plan of 25, 50 and
   100 % and climbs by itself while ``avika-publish progress`` runs as the hourly job would (VM
   agents download, verify, swap, exec, watch, commit; containers report ``update_available``);
   the broken 0.1.45 with the same plan: the canaries' watchdogs roll it back on their own and
   ``progress`` halts it at its first step, with no human command;
6-10. the Kubernetes act (``demo/kube_act.py``): ``avika-controller`` rolls a DaemonSet of 8
   simulated nodes to 0.1.44 in waves, one pod at a time, and rolls a crash-looping 0.1.45 back;
   its reports land beside the VM agents';
11. a per-agent summary (version history from the reports store, ``avika-agent status --json``);
12. the web console (``avika-publish serve --console``): its URL and a read token; on a terminal it
   keeps serving until Ctrl-C;
13. every process it started is stopped, on success, on error, on Ctrl-C or SIGTERM.

``--quick`` runs a smaller fleet with shorter intervals and does not wait at the console (CI runs
it as a test).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kube_act  # demo/kube_act.py: the Kubernetes act
import plan_act  # demo/plan_act.py: the rollout-plan act

from agent.environment import platform_key
from agent.manifest import rollout_bucket
from infra.reports.store import ReportStore

ROOT = Path(__file__).resolve().parent.parent
DATE = re.compile(r"^\d{4}-\d\d-\d\d ")
BIN = Path(sys.executable).parent
PUBLISH = str(BIN / "avika-publish")
BUILD = [sys.executable, str(ROOT / "packaging" / "build_agent.py")]
PLATFORM = platform_key()

OLD, NEW, BAD = "0.1.43", "0.1.44", "0.1.45"
FIRST_WAVE = 25  # percent, for 0.1.44 and for 0.1.45
# Agent ids are chosen so that both 25 % waves hold some VM agents and leave others out (buckets
# are fnv1a32(version + agent id) % 100; the demo prints them). --quick keeps the first five.
VM_IDS = [f"host-{n:02d}" for n in range(1, 11)]
CONTAINER_IDS = ["k8s-pod-1", "k8s-pod-2"]

# The broken 0.1.45: a shell launcher in front of the real 0.1.45 zipapp (Python runs a zip with
# data before it), so `FILE version` is the real build answering 0.1.45 and the agent's smoke
# test passes, while `FILE run` dies at once, as a release that crashes on start would.
BROKEN_LAUNCHER = b"""#!/bin/sh
# avika-agent 0.1.45, broken on purpose by demo/run_demo.py: the real 0.1.45 build follows this
# launcher; `version` runs it (the smoke test passes), anything else exits 1 at once.
if [ "$1" = version ]; then exec python3 "$0" "$@"; fi
echo "avika-agent 0.1.45: fatal: cannot start (broken on purpose by the demo)" >&2
exit 1
"""


class DemoError(Exception):
    """A step did not happen as the story says: the message explains, the log tails show why."""


def say(step: str) -> None:
    print(f"\n==> {step}", flush=True)


def note(text: str = "") -> None:
    print(f"    {text}" if text else "", flush=True)


def indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.rstrip("\n").splitlines())


# ---------------------------------------------------------------- processes


def proc_alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] not in ("Z", "X")


def proc_cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Processes:
    """Everything the demo starts: each in its own session, every pid seen recorded in ``pids.txt``.

    Agents restart themselves (exec), and a watchdog double-forks out of each updating agent and
    may start a restored agent in a new session, so process groups alone do not find them all:
    ``stop`` also looks for every live process whose command line names the demo folder.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.marker = (str(workdir) + os.sep).encode()
        self.popens: list[subprocess.Popen[Any]] = []
        self.pids: dict[int, str] = {}
        self.record = workdir / "pids.txt"
        self.stopped = False

    def add(self, pid: int | None, role: str) -> None:
        if pid is None or pid in self.pids:
            return
        self.pids[pid] = role
        with self.record.open("a") as out:
            out.write(f"{pid} {role}\n")

    def start(self, argv: list[str], role: str, **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, **kwargs)
        self.popens.append(proc)
        self.add(proc.pid, role)
        return proc

    def ours(self) -> list[int]:
        """Live processes whose command line names the demo folder (agents, watchdogs, the server)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                pid = int(entry.name)
                if self.marker in proc_cmdline(pid) and proc_alive(pid):
                    found.append(pid)
        return found

    def stop(self, agents: Iterable[Agent] = ()) -> int:
        """SIGTERM the agents (their watchdogs stand down), then SIGKILL whatever is left. Idempotent."""
        if self.stopped:
            return 0
        self.stopped = True
        for agent in agents:  # a clean stop: the agent tells its watchdog it was stopped on purpose
            record = read_json(agent.state_dir / "agent.pid")
            if isinstance(record, dict) and isinstance(record.get("pid"), int):
                self._signal(record["pid"], signal.SIGTERM)
        for proc in self.popens:
            if proc.poll() is None:
                self._signal(proc.pid, signal.SIGTERM)
        for pid in self.ours():
            self.add(pid, "found at stop")
        deadline = time.monotonic() + 5
        while self.ours() and time.monotonic() < deadline:
            time.sleep(0.1)
        for proc in self.popens:  # each was a session leader: its group may hold forks
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        for _ in range(20):
            left = self.ours()
            if not left:
                break
            for pid in left:
                self.add(pid, "killed at stop")
                self._signal(pid, signal.SIGKILL)
            time.sleep(0.05)
        for proc in self.popens:
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        return len([p for p in self.pids if p != os.getpid()])

    def _signal(self, pid: int, sig: int) -> None:
        if self.marker in proc_cmdline(pid):  # never a reused pid that is no longer ours
            with contextlib.suppress(OSError):
                os.kill(pid, sig)


# ---------------------------------------------------------------- one host


@dataclass
class Agent:
    agent_id: str
    mode: str  # vm | container
    dir: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    first_pid: int | None = None

    @property
    def target(self) -> Path:
        return self.dir / "bin" / "avika-agent"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def config(self) -> Path:
        return self.dir / "avika-agent.conf"

    @property
    def log(self) -> Path:
        return self.dir / "agent.log"

    def bucket(self, version: str) -> int:
        return rollout_bucket(self.agent_id, version)  # the publisher's default salt is the version

    def in_wave(self, version: str, percent: int = FIRST_WAVE) -> bool:
        return self.bucket(version) < percent

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no log yet)"
        return "\n".join(text)


# ---------------------------------------------------------------- the demo


class Demo:
    def __init__(self, workdir: Path, quick: bool) -> None:
        self.workdir = workdir
        self.quick = quick
        vm_ids = VM_IDS[:5] if quick else VM_IDS
        containers = CONTAINER_IDS[:1] if quick else CONTAINER_IDS
        self.agents = [Agent(a, "vm", workdir / "hosts" / a) for a in vm_ids]
        self.agents += [Agent(a, "container", workdir / "hosts" / a) for a in containers]
        self.interval = "1s" if quick else "2s"
        self.health_window = "2s" if quick else "3s"
        self.timeout = 60.0 if quick else 90.0
        self.store = workdir / "updates"
        self.builds = workdir / "builds"
        self.key = workdir / "signing-key.pem"
        self.reports_db = workdir / "reports.db"
        self.reports = f"sqlite:///{self.reports_db}"
        self.secret = secrets.token_hex(24)
        self.procs = Processes(workdir)
        self.url = ""
        self.public_key = ""
        self.committed_in_wave: dict[str, str] = {}
        self.canary_exit: int | None = None
        self.halt_serial: int | None = None
        self.kube_summary: dict[str, Any] = {}
        self.next_step = 1  # the number of the step the closing lines print
        self._run_env: dict[str, str] = {}

    @property
    def vms(self) -> list[Agent]:
        return [a for a in self.agents if a.mode == "vm"]

    @property
    def containers(self) -> list[Agent]:
        return [a for a in self.agents if a.mode == "container"]

    # -- tools

    def tool_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AVIKA_", "UPDATE_"))}
        env["AVIKA_FLEET_SECRET"] = self.secret
        return env

    def run(
        self, *argv: str, ok: Iterable[int] = (0,), timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, env=self.tool_env(), timeout=timeout, check=False
        )
        if done.returncode not in ok:
            shown = " ".join(Path(argv[0]).name if i == 0 else a for i, a in enumerate(argv[:3]))
            raise DemoError(f"`{shown} ...` exited {done.returncode}:\n{done.stderr}{done.stdout}")
        return done

    def publish(self, *args: str, ok: Iterable[int] = (0,)) -> subprocess.CompletedProcess[str]:
        return self.run(PUBLISH, *args, ok=ok)

    def signing(self) -> list[str]:
        return ["--key", str(self.key), "--store", str(self.store)]

    def fleet(self) -> dict[str, Any]:
        return json.loads(self.publish("fleet", "--reports", self.reports, "--json").stdout)

    def show_fleet(self) -> None:
        note("$ avika-publish fleet --reports sqlite:///.../reports.db")
        print(
            indent(self.publish("fleet", "--reports", self.reports).stdout or "(no reports yet)"), flush=True
        )

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.publish("show", "--store", str(self.store), "--json").stdout)

    def status(self, agent: Agent) -> dict[str, Any]:
        """``avika-agent status --json``, run with the host's own binary and config."""
        done = subprocess.run(
            [str(agent.target), "status", "--json", "--config", str(agent.config)],
            capture_output=True,
            text=True,
            env=self.agent_env(agent),
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise DemoError(f"{agent.agent_id}: status exited {done.returncode}: {done.stderr}{done.stdout}")
        return json.loads(done.stdout)

    def statuses(self) -> dict[str, dict[str, Any]]:
        with ThreadPoolExecutor(max_workers=4) as pool:
            return dict(
                zip([a.agent_id for a in self.agents], pool.map(self.status, self.agents), strict=True)
            )

    # -- waiting

    def track_pids(self) -> None:
        for agent in self.agents:
            for name, role in (("agent.pid", "agent"), ("watchdog.pid", "watchdog")):
                record = read_json(agent.state_dir / name)
                if isinstance(record, dict) and isinstance(record.get("pid"), int):
                    self.procs.add(record["pid"], f"{role} {agent.agent_id}")

    def wait_for(
        self, what: str, pending: Callable[[], list[Agent]], timeout: float | None = None, every: float = 1.0
    ) -> None:
        """Poll until ``pending()`` (the agents not there yet) is empty; on timeout, show their logs."""
        deadline = time.monotonic() + (timeout or self.timeout)
        started = time.monotonic()
        while True:
            self.track_pids()
            late = pending()
            if not late:
                note(f"({what}: {time.monotonic() - started:.1f} s)")
                return
            if time.monotonic() >= deadline:
                tails = "\n".join(f"--- {a.agent_id} ({a.log}), last lines:\n{a.log_tail()}" for a in late)
                raise DemoError(
                    f"timed out after {timeout or self.timeout:.0f} s waiting for {what}; "
                    f"not there yet: {', '.join(a.agent_id for a in late)}\n{tails}"
                )
            time.sleep(every)

    def rows(self) -> dict[str, dict[str, Any]]:
        return {row["agent_id"]: row for row in self.fleet()["agents"]}

    def not_committed(self, agents: list[Agent], version: str) -> Callable[[], list[Agent]]:
        def late() -> list[Agent]:
            rows = self.rows()
            return [
                a
                for a in agents
                if (r := rows.get(a.agent_id)) is None or (r["version"], r["state"]) != (version, "committed")
            ]

        return late

    def not_reported_available(self, version: str) -> Callable[[], list[Agent]]:
        def late() -> list[Agent]:
            return [
                a
                for a in self.containers
                if not any(
                    e["state"] == "update_available" and e.get("target_version") == version
                    for e in self.agent_events(a)
                )
            ]

        return late

    def agent_events(self, agent: Agent) -> list[dict[str, Any]]:
        store = ReportStore.from_url(self.reports)
        try:
            return sorted(store.agent_events(agent.agent_id), key=lambda e: (e["stream"], e["seq"]))
        finally:
            store.close()

    # -- the steps

    def step_key(self) -> None:
        say("1. Create an Ed25519 signing key (avika-publish keygen)")
        out = json.loads(self.publish("keygen", "--out", str(self.key), "--json").stdout)
        self.public_key = out["public_key"]
        note(f"{self.key.name}: public key {self.public_key} (key id {out['key_id'][:16]}...)")

    def step_build(self) -> None:
        say(
            f"2. Build agent binaries {OLD}, {NEW} and a broken {BAD} "
            "(packaging/build_agent.py, as `make agent-binary` does)"
        )
        self.builds.mkdir()
        self._run_env = self.run_env()
        for version in (OLD, NEW, BAD):
            out = self.builds / (f"real-{version}" if version == BAD else f"avika-agent-{version}")
            done = self.run(*BUILD, "--version", version, "--out", str(out), "--public-keys", self.public_key)
            note(done.stdout.strip().replace(str(self.workdir) + os.sep, ""))
        real = (self.builds / f"real-{BAD}").read_bytes()
        broken = self.builds / f"avika-agent-{BAD}"
        broken.write_bytes(BROKEN_LAUNCHER + real[real.index(b"\n") + 1 :])  # launcher replaces the shebang
        broken.chmod(0o755)
        smoke = subprocess.run(
            [str(broken), "version"],
            capture_output=True,
            text=True,
            env=self._run_env,
            timeout=60,
            check=False,
        )
        run = subprocess.run(
            [str(broken), "run"], capture_output=True, text=True, env=self._run_env, timeout=60, check=False
        )
        if smoke.stdout.strip() != BAD or run.returncode == 0:
            raise DemoError(f"the broken {BAD} does not behave: version -> {smoke!r}, run -> {run!r}")
        note(
            f"builds/avika-agent-{BAD}: the real {BAD} build behind a launcher that exits 1 on `run`: "
            f"`version` prints {smoke.stdout.strip()} (the smoke test passes), `run` exits {run.returncode}"
        )
        note("every binary embeds the public key: the agents need no UPDATE_PUBLIC_KEYS")

    def run_env(self) -> dict[str, str]:
        """The environment agents run in: ``python3`` on PATH is this interpreter's base (the binary's
        shebang is ``/usr/bin/env python3``; any CPython 3.9 - 3.13 would do)."""
        python_dir = self.workdir / "python"
        python_dir.mkdir(exist_ok=True)
        (python_dir / "python3").symlink_to(Path(getattr(sys, "_base_executable", sys.executable)).resolve())
        return {
            "PATH": f"{python_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "LANG": "C.UTF-8",
            "AVIKA_AGENT_CACHE": str(self.workdir / "cache"),  # the build step's own runs
        }

    def agent_env(self, agent: Agent) -> dict[str, str]:
        # Each agent unpacks its code into its own cache, as on a host of its own (DESIGN section 4).
        return {**self._run_env, "HOME": str(agent.dir), "AVIKA_AGENT_CACHE": str(agent.dir / "cache")}

    def release(self, version: str, *extra: str) -> dict[str, Any]:
        binary = self.builds / f"avika-agent-{version}"
        out = self.publish(
            "release", version, "--init", "--binary", f"{PLATFORM}={binary}",
            "--image", f"hellodk/avika-agent:{version}", "--reports-url", f"{self.url}/v1/reports",
            *self.signing(), "--json", *extra,
        )  # fmt: skip
        return json.loads(out.stdout)

    def step_fleet(self) -> None:
        n_vm, n_ct = len(self.vms), len(self.containers)
        say(
            f"3. Publish {OLD}, serve it and the reports endpoint, "
            f"start {n_vm} VM and {n_ct} container agents running {OLD}"
        )
        self.store.mkdir()
        log = (self.workdir / "serve.log").open("w")
        server = self.procs.start(
            [PUBLISH, "serve", "--root", str(self.store), "--host", "127.0.0.1", "--port", "0",
             "--reports", self.reports],
            "avika-publish serve",
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=self.tool_env(),
        )  # fmt: skip
        assert server.stdout is not None
        line = server.stdout.readline()
        if "http://" not in line:
            raise DemoError(f"avika-publish serve did not start: {line!r}; see {self.workdir / 'serve.log'}")
        self.url = line[line.index("http://") :].split()[0].rstrip("/")
        out = self.release(OLD)
        note(
            f"published {OLD} as serial {out['serial']}; "
            f"serving {self.store.name}/ and POST /v1/reports at {self.url}"
        )

        with ThreadPoolExecutor(max_workers=4) as pool:
            tokens = list(pool.map(lambda a: self.publish("enroll", a.agent_id).stdout.strip(), self.agents))
        for agent, token in zip(self.agents, tokens, strict=True):
            agent.target.parent.mkdir(parents=True)
            shutil.copy2(self.builds / f"avika-agent-{OLD}", agent.target)
            agent.config.touch(mode=0o600)  # it holds the report token: the agent warns otherwise
            agent.config.write_text(
                f"# {agent.agent_id}, written by demo/run_demo.py (syntax of /etc/avika/avika-agent.conf)\n"
                f"AGENT_ID={agent.agent_id}\n"
                f"UPDATE_SERVER={self.url}\n"
                f"UPDATE_TARGET={agent.target}\n"
                f"UPDATE_STATE_DIR={agent.state_dir}\n"
                f"BUFFER_DIR={agent.dir / 'data'}\n"
                f"DEPLOYMENT_MODE={agent.mode}\n"
                f"UPDATE_INTERVAL={self.interval}\n"
                f"UPDATE_HEALTH_WINDOW={self.health_window}\n"
                "UPDATE_MAX_BOOT_ATTEMPTS=3\n"
                f"UPDATE_REPORT_URL={self.url}/v1/reports\n"
                f"UPDATE_REPORT_TOKEN={token}\n"
            )
        for agent in self.agents:
            with agent.log.open("ab") as log_file:
                agent.first_pid = self.procs.start(
                    [str(agent.target), "run", "--config", str(agent.config)],
                    f"agent {agent.agent_id}",
                    stdout=log_file,
                    stderr=log_file,
                    env=self.agent_env(agent),
                    cwd=agent.dir,
                ).pid
        note(
            f"each host: its own copy of the {OLD} binary (UPDATE_TARGET = the running executable), "
            f"state dir, enrolment token (avika-publish enroll) and log, under hosts/<id>/; "
            f"UPDATE_INTERVAL={self.interval}, UPDATE_HEALTH_WINDOW={self.health_window}"
        )

        def not_checked() -> list[Agent]:
            late = []
            for agent in self.agents:
                state = read_json(agent.state_dir / "state.json")
                if not isinstance(state, dict) or not state.get("highest_serial"):
                    late.append(agent)
            return late

        self.wait_for(f"every agent to verify the signed {OLD} manifest", not_checked)
        statuses = self.statuses()
        print(
            indent(
                f"{'agent':<10} {'mode':<10} {'runs':<7} {'pid':>7}  "
                f"{'bucket ' + NEW:>13} {'bucket ' + BAD:>13}"
            )
        )
        for agent in self.agents:
            s = statuses[agent.agent_id]
            running = s.get("running") or {}
            print(
                indent(
                    f"{agent.agent_id:<10} {agent.mode:<10} {running.get('version', '-'):<7} "
                    f"{running.get('pid', '-'):>7}  {agent.bucket(NEW):>13} {agent.bucket(BAD):>13}"
                )
            )
        note(
            "bucket = fnv1a32(salt + agent id) % 100, salt = the version: "
            "an agent is in a wave when its bucket < percent"
        )
        note(f"nothing to do on {OLD}, so nothing to report yet:")
        self.show_fleet()

    def show_chain(self, agent: Agent, version: str) -> None:
        """The states ``agent`` reported for ``version``, as the reports store holds them."""
        chain = [e["state"] for e in self.agent_events(agent) if e.get("target_version") == version]
        record = read_json(agent.state_dir / "agent.pid") or {}
        pid = record.get("pid")
        how = "same pid as started: exec" if pid == agent.first_pid else "a new process"
        note(f"{agent.agent_id} reported: {' → '.join(chain)} (now pid {pid}, {how})")

    def log_excerpt(self, agent: Agent, start: str, limit: int = 14) -> str:
        """The log from the first line containing ``start``; dates and the folder path left out."""
        try:
            lines = agent.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        first = next((i for i, line in enumerate(lines) if start in line), 0)
        keep = ("swapped", "watchdog", "fatal", "rolling back", "restored", "running (pid", "bad_version")
        picked = [line for line in lines[first:] if any(k in line for k in keep)][:limit]
        return "\n".join(DATE.sub("", line).replace(str(self.workdir) + os.sep, "") for line in picked)

    # -- the summary

    def history(self, agent: Agent) -> tuple[str, str]:
        """The version history (from the agent's reported events, in queue order) and the outcome."""
        events = agent.events = self.agent_events(agent)
        if agent.mode == "container":
            offered = [e["target_version"] for e in events if e["state"] == "update_available"]
            return OLD, f"reported update_available: {', '.join(dict.fromkeys(offered))}; binary untouched"
        steps, outcome = [OLD], []
        for event in events:
            target = event.get("target_version")
            if event["state"] == "committed":
                steps.append(target)
                outcome.append(f"{target} {self.committed_in_wave.get(agent.agent_id, '')}".strip())
            elif event["state"] == "rolled_back":
                steps += [f"{target} ✗", event["version"]]
                reason = (event.get("error") or "").split(":")[0]
                outcome.append(f"{target} canary: rolled back by itself ({reason})")
            elif event["state"] == "failed" and target:
                steps.append(f"({target} failed)")
                outcome.append(f"{target} failed: {event.get('error')}")
        if not agent.in_wave(BAD):
            outcome.append(f"not a {BAD} canary: stayed")
        elif not any(e.get("target_version") == BAD for e in events):
            outcome.append(f"{BAD} canary: halted before its next check, never tried it")
        return " → ".join(steps), "; ".join(outcome)

    def summary(self) -> dict[str, Any]:
        statuses = self.statuses()
        rows = []
        for agent in self.agents:
            history, outcome = self.history(agent)
            status = statuses[agent.agent_id]
            running = status.get("running") or {}
            rows.append(
                {
                    "agent_id": agent.agent_id,
                    "mode": agent.mode,
                    "history": history,
                    "outcome": outcome,
                    "installed": status.get("version"),
                    "running": running.get("version"),
                    "pid": running.get("pid"),
                    "first_pid": agent.first_pid,
                    "bad_versions": status.get("bad_versions") or [],
                    "states": [e["state"] for e in agent.events],
                }
            )
        width = max(len(r["history"]) for r in rows)
        lines = [f"{'agent':<10} {'mode':<10} {'version history':<{width}}  {'runs now (pid)':<20} outcome"]
        for r in rows:
            now = f"{r['running'] or '-'} ({r['pid']}{'' if r['pid'] == r['first_pid'] else '*'})"
            lines.append(
                f"{r['agent_id']:<10} {r['mode']:<10} {r['history']:<{width}}  {now:<20} {r['outcome']}"
            )
        lines.insert(1, "-" * max(len(line) for line in lines))
        print(indent("\n".join(lines)))
        note("history: the agent's own reports (reports store); ✗ = installed, died on start, rolled back.")
        note("runs now: `avika-agent status --json`; the pid is the one the demo started (updates exec in")
        note("place), * = a new process, started by the watchdog after the rollback.")
        return {"agents": rows}

    def check_story(self, summary: dict[str, Any]) -> list[str]:
        """What the story promised, checked; returns the failures (empty: it all happened)."""
        problems = []
        new_bytes = (self.builds / f"avika-agent-{NEW}").read_bytes()
        old_bytes = (self.builds / f"avika-agent-{OLD}").read_bytes()
        by_id = {r["agent_id"]: r for r in summary["agents"]}
        for agent in self.vms:
            r = by_id[agent.agent_id]
            if (r["installed"], r["running"]) != (NEW, NEW) or agent.target.read_bytes() != new_bytes:
                problems.append(f"{agent.agent_id} is not running {NEW}: {r}")
        rolled = [a for a in self.vms if "rolled_back" in by_id[a.agent_id]["states"]]
        if not rolled:
            problems.append(f"no canary rolled {BAD} back")
        if any(not a.in_wave(BAD) for a in rolled):
            problems.append("an agent outside the canary wave tried 0.1.45")
        for agent in self.containers:
            r = by_id[agent.agent_id]
            if "update_available" not in r["states"] or agent.target.read_bytes() != old_bytes:
                problems.append(f"container {agent.agent_id} did not just report: {r}")
        if self.canary_exit != 5 or self.manifest()["rollout"]["percent"] != 0:
            problems.append(f"canary exited {self.canary_exit}; the rollout was not halted")
        return problems

    def main(self) -> dict[str, Any]:
        self.step_key()
        self.step_build()
        self.step_fleet()
        number = plan_act.run(self, 4)
        number = self.step_kubernetes(number)
        say(f"{number}. Summary: each agent's version history and where it stands now")
        self.next_step = number + 1
        summary = self.summary()
        problems = self.check_story(summary)
        summary.update(canary_exit=self.canary_exit, halt_serial=self.halt_serial, problems=problems)
        summary["kubernetes"] = self.kube_summary
        (self.workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if problems:
            raise DemoError("the story did not happen as told:\n" + "\n".join(problems))
        rolled = len([a for a in summary["agents"] if "rolled_back" in a["states"]])
        note(
            f"checked: every VM agent runs {NEW}, climbed by its plan; {rolled} canaries rolled {BAD} back "
            f"on their own and progress halted it (rollout set to 0 %); the containers only reported; "
            f"the cluster's DaemonSet moved in waves and rolled {BAD} back by itself"
        )
        return summary

    def step_kubernetes(self, number: int) -> int:
        """The container half: avika-controller rolls a DaemonSet of 8 simulated nodes (demo/kube_act.py)."""
        env = kube_act.ActEnv(
            workdir=self.workdir,
            key=self.key,
            public_key=self.public_key,
            reports_url=f"{self.url}/v1/reports",
            reports=self.reports,
            env=self.tool_env(),
            start=self.procs.start,
            quick=self.quick,
        )
        try:
            self.kube_summary = kube_act.run_act(env, step=number)
        except kube_act.ActError as exc:
            raise DemoError(f"the Kubernetes act: {exc}") from None
        return number + kube_act.STEPS


# ---------------------------------------------------------------- entry point


class Stopped(Exception):
    """SIGTERM or SIGHUP: stop everything, like Ctrl-C."""


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


MARKER = ".avika-demo"  # only a folder holding it (or the default one) is ever wiped


def serve_console(demo: Demo, *, wait: bool) -> str:
    """The web console over this demo's store and reports (``serve --console``); its URL.

    Prints the page's address with a read token in its fragment (the page takes it and removes it
    from the address bar) and an operate token (rollout, halt). With ``wait`` (a terminal, not
    ``--quick``) it keeps serving, and the agents keep running and reporting, until Ctrl-C.
    """
    import urllib.request

    say(f"{demo.next_step}. The console: the same fleet in a browser (avika-publish serve --console)")
    demo.next_step += 1
    read, operate = secrets.token_hex(16), secrets.token_hex(16)
    env = {
        **demo.tool_env(),
        "AVIKA_CONSOLE_TOKENS": f"demo-viewer:read:{read},demo-operator:operate:{operate}",
    }
    log = (demo.workdir / "console.log").open("w")
    server = demo.procs.start(
        [PUBLISH, "serve", "--root", str(demo.store), "--host", "127.0.0.1", "--port", "0",
         "--reports", demo.reports, "--console", "--key", str(demo.key)],
        "avika-publish serve --console",
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=env,
    )  # fmt: skip
    assert server.stdout is not None
    line = server.stdout.readline()
    if "http://" not in line:
        raise DemoError(f"the console did not start: {line!r}; see {demo.workdir / 'console.log'}")
    url = line[line.index("http://") :].split()[0].rstrip("/")
    request = urllib.request.Request(f"{url}/v1/fleet", headers={"Authorization": f"Bearer {read}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        summary = json.loads(answer.read())["summary"]
    note(f"the operator API answers: {summary['total']} agents, {summary['update_available']} with an update")
    note(f"open   {url}/console/#token={read}")
    note(f"read token     {read}   (paste it into the page's form, or use the link above)")
    note(f"operate token  {operate}   (also sets the rollout and halts, each confirmed)")
    (demo.workdir / "console.txt").write_text(f"{url}/console/\nread {read}\noperate {operate}\n")
    if wait:
        note("serving until Ctrl-C; the agents keep running and reporting (last seen moves)")
        try:
            while server.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("", flush=True)
    return url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir", type=Path, default=ROOT / "demo-run", help="folder for everything (wiped first)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="6 agents (1 container), shorter intervals: for CI"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    workdir: Path = args.dir.resolve()
    if workdir.exists():
        if any(workdir.iterdir()) and not (workdir / MARKER).exists() and workdir != ROOT / "demo-run":
            print(f"demo: refusing to wipe {workdir}: not a demo folder (no {MARKER} in it)", file=sys.stderr)
            return 2
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("written by demo/run_demo.py: this folder is wiped at the next run\n")
    demo = Demo(workdir, args.quick)
    n_vm, n_ct = len(demo.vms), len(demo.containers)
    quick = " (--quick)" if args.quick else ""
    print(
        f"Avika Updates demo{quick}: {n_vm} VM and {n_ct} container agents on 127.0.0.1, no AWS, "
        f"nothing downloaded.\nEvery file goes under {workdir} (agent logs: hosts/<id>/agent.log).",
        flush=True,
    )

    def stop() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        if demo.procs.stopped:
            return
        count = demo.procs.stop(demo.agents)
        left = demo.procs.ours()
        print(
            f"\n==> {demo.next_step}. Stop every process the demo started "
            f"({count} pids recorded in {demo.procs.record.name}): "
            + (f"STILL RUNNING: {left}" if left else "none left"),
            flush=True,
        )

    atexit.register(stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, _raise_stopped)
    signal.signal(signal.SIGHUP, _raise_stopped)
    code = 0
    try:
        demo.main()
        serve_console(demo, wait=sys.stdout.isatty() and not args.quick)
    except DemoError as exc:
        print(f"\ndemo: error: {exc}", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr, flush=True)
        code = 130
    except Stopped as exc:
        print(f"\ndemo: stopped by {exc}", file=sys.stderr, flush=True)
        code = 143
    finally:
        stop()
    print(
        f"\nDemo {'finished' if code == 0 else 'FAILED'} in {time.monotonic() - started:.1f} s; "
        f"files are under {workdir}"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
