"""Soak: one real agent through hundreds of update cycles, with faults on the wire and kill -9s.

Bounded and loopback only. Run from the repository root::

    .venv/bin/python bench/soak.py                  # 200 cycles
    .venv/bin/python bench/soak.py --long           # 1,000 cycles
    .venv/bin/python bench/soak.py --cycles 50 --seed 7 --max-minutes 5 --no-results

The set-up (everything in one temporary directory, removed at the end unless ``--keep``):

- ``publisher.serve.make_server`` on 127.0.0.1 serves a directory store (``publisher.release``
  publishes into it, signing with a fresh Ed25519 key) and ``POST /v1/reports`` into SQLite,
  checked against a fleet secret (``infra.reports.auth.make_token`` gives the agent its token);
- ``tests.faultproxy.FaultProxy`` sits between the agent and that server for everything: the
  manifest, the binaries and the reports (the manifest's ``reports_url`` points at the proxy);
- ONE host (``tests.agent_harness.Host``): a target binary in its own directory, a state dir,
  ``UPDATE_INTERVAL=1s``, ``UPDATE_HEALTH_WINDOW=1s``, ``UPDATE_MAX_BOOT_ATTEMPTS=3``, restart by
  ``exec`` outside systemd (so the watchdog supervises each health window). The binaries are the
  development launchers of ``tests.agent_harness.dev_binary`` (real processes that exec), padded
  with 1-128 KiB of random comment so every build has its own size and bytes.

Each cycle:

1. publishes a new release ``1.0.<cycle>`` (versions only go up), or a signed downgrade to an
   older version this host committed before. The build is, by weight: ``ok`` (most), ``crash``
   (exits 1 before any agent code runs), ``segfault``, ``die_after_boot`` (counts its boot,
   dies 0.5 s later) or ``smoke_fail`` (``version`` prints the wrong version);
2. injects 0-2 random faults into the proxy, each for one or two requests: on the binary
   (truncated, reset, corrupt byte, mix-and-match, 5xx, short stall, lying Content-Length), on
   the manifest (replayed older signed manifest, 5xx, short stall, reset, 304 without ETag) or on
   the reports (5xx, reset before they reach the endpoint, reset after the endpoint stored them:
   the agent must resend and the store must ignore the duplicates);
3. in about half the cycles kills the agent with SIGKILL once (sometimes twice), at a random
   moment or right after a chosen state appears in its log (downloading, verifying, staged,
   restarting, watching, committed, rolled_back), then restarts it with the same command;
4. waits until the host has converged on what that build must end as: ``ok`` and downgrades
   installed and committed; ``crash``/``segfault``/``die_after_boot`` rolled back and
   remembered as bad; ``smoke_fail`` refused, nothing swapped;
5. checks every invariant below and goes on from where the host is.

What a kill means (the host runs outside systemd, restart method ``exec``):

- **agent crash**: ``kill -9`` of the agent's process group (the agent and any child it has at
  that instant, e.g. a smoke test). The watchdog is double-forked into its own session by
  design, so it survives, as it would when only the agent dies: that is the case it exists for.
  The soak then plays init and restarts the agent with the same command at once, like
  ``Restart=`` would, without waiting to see whether the watchdog restarts it too: the
  single-instance run lock must sort out the race.
- **host crash**: ``kill -9`` of every process of the host (agent, watchdog, agents the watchdog
  started, smoke tests), then "boot": the same command. A SIGKILL does not drop the page cache,
  so this models every process dying at once, not the loss of writes that were never fsynced.

The soak's init otherwise behaves as the shipped systemd units (packaging/systemd) would for the
process it supervises: when no process of the host is left (no agent, no watchdog), it starts the
agent again after 0.2 s (``Restart=on-failure``); after 5 such starts in a cycle with an update
still pending, it runs ``<target>.backup rollback`` (the ``OnFailure=`` rollback unit), then starts
the agent. A host crash while a build that dies before our code runs is installed needs that
unit: no watchdog survives a host crash, so nothing else could roll it back.

Invariants, checked after EVERY cycle (a violation is listed with its cycle and details):

- target bytes, all the time: a sampler thread hashes the target every 20 ms; it must always
  exist and be byte-identical to the binary running before the cycle or to the binary this
  cycle's manifest signed, never anything else (partial, corrupt, another release's bytes);
- converged state: no ``pending.json``; one agent process (the pid record's), running the version
  of the installed target, whose bytes are the binary signed for that version; no watchdog; no
  stray file next to the target; ``.backup`` (if any) a whole published binary;
  ``avika-agent status --json`` (the installed binary's) agrees; the highest accepted serial is
  the latest one and never moved back (replays);
- the expected outcome: an ``ok`` build or a downgrade is never rolled back; a crashing build
  is never committed; a smoke-failing build is never swapped in;
- reports, none lost or duplicated: the agent's queue files (``reports/meta.json`` +
  ``queue.log``) say which sequence numbers it accepted and which the endpoint acknowledged. In
  the SQLite store, every stream holds seq 1..N with no gap and no seq twice (a resend under a
  new ``event_id`` would be a duplicate the endpoint cannot see); the agent's stream holds at
  least every acknowledged seq and nothing the queue never numbered; every event the agent
  logged with a seq already acknowledged is in the store with the same ``event_id``; no event was
  logged without a seq (never queued); and the outcome of the cycle (``committed`` /
  ``rolled_back`` / ``failed`` with ``smoke_test_failed``) for this release's serial reached the
  store.

It prints the counts (cycles, kills by kind and by the state they landed in, faults by kind,
commits, rollbacks by reason, failures by code, init restarts), the violations and the runtime,
and appends them to ``bench/RESULTS.md`` (unless ``--no-results``). Exit status 1 if any
invariant was violated.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (str(ROOT / "bench"), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from results import Report, append, command_line, machine  # noqa: E402

from agent.report_queue import LOG_FILE, META_FILE, REPORTS_DIR, scan  # noqa: E402
from infra.reports.auth import make_token  # noqa: E402
from infra.reports.store import ReportStore  # noqa: E402
from publisher.release import ReleaseSpec, release  # noqa: E402
from publisher.serve import make_server  # noqa: E402
from publisher.stores import DirStore  # noqa: E402
from tests.agent_harness import PLATFORM, Host, alive, dev_binary, keys_of, new_signer, read_json  # noqa: E402
from tests.faultproxy import Fault, FaultProxy  # noqa: E402

SECRET = "soak-fleet-secret-0123456789abcdef"
DEFAULT_CYCLES = 200
LONG_CYCLES = 1000
CYCLE_TIMEOUT = 90.0  # one cycle that has not converged by then is a violation
SLOW_CYCLE = 20.0  # listed in the summary: fault back-offs add seconds, not tens of them
DRAIN_TIMEOUT = 30.0  # reports acknowledged after convergence (report back-off is 2 s doubling)
SAMPLE_EVERY = 0.02
TICK = 0.05
RESTART_SEC = 0.2
START_LIMIT = 5
MAX_BOOTS = 3
PAD_MAX = 128 * 1024

# Build kinds and what each must end as.
INSTALL, ROLLBACK, REFUSE = "installed", "rolled_back", "refused"
KINDS = {  # kind: (weight, expected outcome)
    "ok": (66, INSTALL),
    "downgrade": (6, INSTALL),
    "crash": (8, ROLLBACK),
    "segfault": (4, ROLLBACK),
    "die_after_boot": (8, ROLLBACK),
    "smoke_fail": (8, REFUSE),
}
BAD_REASONS = ("too_many_boots", "died_before_commit")
KILL_STATES = ("downloading", "verifying", "staged", "restarting", "watching", "committed", "rolled_back")
LIFECYCLE = ("update_available", *KILL_STATES, "failed")

FAULT_KINDS = {  # name: weight
    "binary_truncate": 3,
    "binary_reset": 3,
    "binary_corrupt": 3,
    "binary_mix_and_match": 3,
    "binary_5xx": 2,
    "binary_stall": 2,
    "binary_lie_length": 2,
    "manifest_replay": 3,
    "manifest_5xx": 2,
    "manifest_stall": 1,
    "manifest_reset": 1,
    "manifest_304_no_etag": 1,
    "reports_5xx": 2,
    "reports_reset_before": 1,
    "reports_reset_after_store": 2,
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Build:
    version: str
    kind: str
    data: bytes
    path: Path
    sha: str = ""
    url_path: str = ""  # as the proxy sees it

    def __post_init__(self) -> None:
        self.sha = sha256(self.data)
        self.url_path = f"/updates/binaries/{self.version}/{self.sha}/avika-agent-{PLATFORM}"

    def label(self) -> str:
        return f"{self.version} ({self.kind})"


@dataclass
class Violation:
    cycle: int
    what: str
    detail: str

    def line(self) -> str:
        return f"cycle {self.cycle}: {self.what}: {self.detail}"


@dataclass
class Stats:
    cycles: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    kills: Counter[str] = field(default_factory=Counter)
    kill_states: Counter[str] = field(default_factory=Counter)
    kills_missed: Counter[str] = field(default_factory=Counter)  # planned, nothing to kill
    faults: Counter[str] = field(default_factory=Counter)  # applied requests by kind
    faults_unused: Counter[str] = field(default_factory=Counter)  # injected, never hit
    init: Counter[str] = field(default_factory=Counter)
    cycle_seconds: list[float] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    slow: list[str] = field(default_factory=list)  # cycles over SLOW_CYCLE seconds (not violations)
    stopped_early: str | None = None


# ---------------------------------------------------------------- the agent's log, read as it grows


class LogTail:
    """The host's JSON-lines log, parsed incrementally: events (with stream/seq) and error lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rest = b""
        self.events: list[dict[str, Any]] = []
        self.errors: Counter[str] = Counter()
        self.not_json = 0
        self.tracebacks: list[str] = []

    def poll(self) -> list[dict[str, Any]]:
        """Read what was appended; returns the new events."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        new = []
        for raw in lines:
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                self.not_json += 1
                continue
            if not isinstance(obj, dict):
                continue
            if isinstance(obj.get("event"), dict):
                new.append(obj["event"])
            if obj.get("level") in ("error", "critical"):
                self.errors[" ".join(str(obj.get("msg", ""))[:70].split())] += 1
            if obj.get("exc"):
                self.tracebacks.append(str(obj["exc"])[-600:])
        self.events.extend(new)
        return new


# ---------------------------------------------------------------- the target, sampled all the time


class TargetSampler(threading.Thread):
    """Hashes the target every SAMPLE_EVERY seconds: it must exist and be one of ``allowed``."""

    def __init__(self, target: Path, names: dict[str, str], report: Callable[[str, str], None]) -> None:
        super().__init__(name="target-sampler", daemon=True)
        self.target = target
        self.names = names  # sha -> build label, for messages
        self.report = report
        self.allowed: frozenset[str] = frozenset()
        self.samples = 0
        self.stop = threading.Event()
        self._seen_bad: set[str] = set()

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_EVERY):
            allowed = self.allowed
            try:
                data = self.target.read_bytes()
            except FileNotFoundError:
                self._once("missing", "target missing", f"{self.target} does not exist")
                continue
            except OSError as exc:
                self._once(f"oserror {exc.errno}", "target unreadable", str(exc))
                continue
            self.samples += 1
            digest = sha256(data)
            if allowed and digest not in allowed:
                name = self.names.get(digest)
                what = (
                    f"another published binary {name}"
                    if name
                    else f"unpublished bytes ({len(data)} bytes, sha256 {digest[:16]})"
                )
                self._once(digest, "target is not the running or the signed binary", what)

    def _once(self, key: str, what: str, detail: str) -> None:
        if key not in self._seen_bad:
            self._seen_bad.add(key)
            self.report(what, detail)


# ---------------------------------------------------------------- the soak


def _quiet(handler: type[Any]) -> type[Any]:
    """The server's request handler without its access log on stderr."""

    class Quiet(handler):  # type: ignore[misc, valid-type]
        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Quiet


class Soak:
    def __init__(self, work: Path, seed: int, out: Report, *, verbose: bool = False) -> None:
        self.work = work
        self.verbose = verbose
        self.rng = random.Random(seed)
        self.out = out
        self.stats = Stats()
        self.cycle = 0
        self.signer = new_signer()
        self.keys = keys_of(self.signer)
        self.builds_by_sha: dict[str, Build] = {}
        self.builds_by_version: dict[str, Build] = {}
        self.committed: list[Build] = []  # ok builds this host committed (downgrade targets)
        self.serial = 0
        self.highest_serial = 0
        self.bad_paths: dict[str, int] = {}  # binary path of a rolled-back build -> GETs seen then
        self._stack = contextlib.ExitStack()
        self._stream: str | None = None
        self._dead_since: float | None = None
        self._starts = 0
        self._reported: set[str] = set()

    # -- set-up and tear-down

    def __enter__(self) -> Soak:
        www = self.work / "www"
        (www / "updates").mkdir(parents=True)
        db = f"sqlite:///{self.work / 'reports.db'}"
        self.server = make_server(www, "127.0.0.1", 0, reports_url=db, fleet_secret=SECRET)
        self.server.RequestHandlerClass = _quiet(self.server.RequestHandlerClass)
        thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        self._stack.callback(self._stop_server, thread)
        self.proxy = self._stack.enter_context(FaultProxy(self.server.url))
        self.store = DirStore(www / "updates")
        self.reports = ReportStore.from_url(db)
        self._stack.callback(self.reports.close)
        self.host = Host(self.work / "host", self.proxy.url + "/updates")
        self.agent_id = self.host.env()["AGENT_ID"]
        self.host.env_extra.update(UPDATE_REPORT_TOKEN=make_token(SECRET, self.agent_id))
        self.host.env_extra["UPDATE_REPORT_URL"] = None  # type: ignore[assignment]  # the manifest's
        self._stack.callback(self.host.kill_all)
        self.tail = LogTail(self.host.log_path)
        self.sampler = TargetSampler(
            self.host.target,
            {},
            lambda what, detail: self.violation(what, detail),
        )
        self._stack.callback(self.sampler.stop.set)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _stop_server(self, thread: threading.Thread) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.server.reports is not None:
            self.server.reports.store.close()
        thread.join(5)

    def violation(self, what: str, detail: str) -> None:
        found = Violation(self.cycle, what, detail)
        self.stats.violations.append(found)
        self.out(f"  VIOLATION {found.line()}")

    # -- builds and releases

    def build(self, version: str, kind: str) -> Build:
        variant = kind if kind in ("crash", "segfault", "die_after_boot", "smoke_fail") else "ok"
        path = self.work / "builds" / f"{version}-{kind}" / f"avika-agent-{PLATFORM}"
        data = dev_binary(path, version, self.keys, variant)
        pad = self.rng.randint(1024, PAD_MAX)
        data += b"# padding " + self.rng.randbytes(pad // 2).hex().encode() + b"\n"
        path.write_bytes(data)
        build = Build(version, kind, data, path)
        self.builds_by_sha[build.sha] = build
        self.sampler.names[build.sha] = build.label()
        return build

    def publish(self, build: Build, *, downgrade: bool = False) -> int:
        spec = ReleaseSpec(
            build.version,
            {PLATFORM: build.path},
            reports_url=self.proxy.url + "/v1/reports",
            downgrade=downgrade,
            init=True,
        )
        outcome = release(self.store, [self.signer], spec)
        if outcome.status != "published":
            raise RuntimeError(f"release {build.version}: {outcome.status} {outcome.notes}")
        self.builds_by_version[build.version] = build
        self.serial = outcome.manifest.serial
        return self.serial

    # -- the host's processes

    def host_processes(self) -> dict[int, list[str]]:
        found = {}
        marker = str(self.host.dir).encode()
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker in raw and alive(int(entry)):
                found[int(entry)] = [p.decode(errors="replace") for p in raw.split(b"\0") if p]
        return found

    def run_processes(self) -> dict[int, list[str]]:
        """Agents (``run``) of the host, the watchdog excluded."""
        watchdog = self.host.watchdog_pid()
        return {
            pid: argv for pid, argv in self.host_processes().items() if "run" in argv[1:3] and pid != watchdog
        }

    def reap(self) -> None:
        for proc in self.host.popens:
            proc.poll()
        self.host.popens = [p for p in self.host.popens if p.returncode is None]

    def start_agent(self, why: str) -> None:
        self.stats.init[why] += 1
        self.host.start()

    # -- init: Restart=on-failure, the start limit and the rollback unit

    def init_tick(self) -> None:
        self.reap()
        if self.host_processes():
            self._dead_since = None
            return
        now = time.monotonic()
        if self._dead_since is None:
            self._dead_since = now
            return
        if now - self._dead_since < RESTART_SEC:
            return
        self._dead_since = None
        self._starts += 1
        if self._starts > START_LIMIT and self.host.pending() is not None and self.host.backup.exists():
            self.stats.init["rollback_unit"] += 1
            done = subprocess.run(
                [str(self.host.backup), "rollback", "--config", str(self.host.config)],
                env=self.host.env(),
                cwd=self.host.dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if done.returncode != 0:
                self.violation("rollback unit failed", f"exit {done.returncode}: {done.stdout.strip()[:300]}")
            self._starts = 0
        self.start_agent("restart_on_failure")

    def supervise(self, until: Callable[[], Any], timeout: float, step: float = TICK) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            self.init_tick()
            self.tail.poll()
            value = until()
            if value:
                return value
            if time.monotonic() >= deadline:
                return None
            time.sleep(step)

    # -- kills

    def kill(self, kind: str) -> None:
        self.tail.poll()
        state = self.state_now()
        if kind == "host":
            pids = self.host_processes()
            if not pids:
                self.stats.kills_missed["no process"] += 1
                return
            for _ in range(5):
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.02)
                pids = self.host_processes()
                if not pids:
                    break
        else:
            agents = self.run_processes()  # by command line: a stale pid record may name a reused pid
            record = self.host.agent_record()
            pid = record["pid"] if record and record["pid"] in agents else min(agents, default=None)
            if pid is None:
                self.stats.kills_missed["no agent"] += 1
                return
            try:
                group = os.getpgid(pid)
            except ProcessLookupError:
                self.stats.kills_missed["no agent"] += 1
                return
            if group == os.getpgrp():  # each agent has its own session (started by us or a watchdog)
                raise RuntimeError(f"agent pid {pid} is in the soak's own process group")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        self.stats.kills[kind] += 1
        self.stats.kill_states[state] += 1
        self._kills_this_cycle.append(f"{kind}@{state}")
        self.reap()
        time.sleep(self.rng.uniform(0.0, 0.1))
        self.start_agent(f"after_{kind}_crash")

    def state_now(self) -> str:
        """The lifecycle state of this cycle's release, as the log says right now."""
        version = self._current.version
        for event in reversed(self.tail.events):
            if event.get("target_version") == version and event.get("state") in LIFECYCLE:
                return str(event["state"])
        return "checking"

    def plan_kills(self) -> list[tuple[str, str, float]]:
        """[(kind, trigger, value)]: trigger "time" (seconds) or "state" (a state name)."""
        if self.rng.random() >= 0.45:
            return []
        plans = []
        for _ in range(2 if self.rng.random() < 0.15 else 1):
            kind = "agent" if self.rng.random() < 0.6 else "host"
            if self.rng.random() < 0.5:
                plans.append((kind, "time", self.rng.uniform(0.05, 4.0)))
            else:
                plans.append((kind, "state", 0.0))
        return plans

    def run_kill(self, kind: str, trigger: str, value: float, expect: str) -> None:
        if trigger == "time":
            self.supervise(lambda: False, value)
            self.kill(kind)
            return
        choices = {
            "ok": ("downloading", "verifying", "staged", "restarting", "watching", "committed"),
            "downgrade": ("downloading", "verifying", "staged", "restarting", "watching", "committed"),
            "crash": ("downloading", "staged", "restarting", "rolled_back"),
            "segfault": ("downloading", "staged", "restarting", "rolled_back"),
            "die_after_boot": ("downloading", "staged", "restarting", "watching", "rolled_back"),
            "smoke_fail": ("downloading", "verifying"),
        }[self._current_kind]
        state = self.rng.choice(choices)
        seen = len(self.tail.events)
        version = self._current.version

        def appeared() -> bool:
            return any(
                e.get("state") == state and e.get("target_version") == version
                for e in self.tail.events[seen:]
            )

        if self.supervise(appeared, 8.0, step=0.005):
            time.sleep(self.rng.uniform(0.0, 0.03))
            self.kill(kind)
        else:
            self.stats.kills_missed[f"{state} never seen"] += 1

    # -- faults

    def inject_faults(self) -> list[tuple[str, Any]]:
        rules = []
        count = self.rng.choices((0, 1, 2), weights=(45, 43, 12))[0]
        names = list(FAULT_KINDS)
        for name in self.rng.choices(names, weights=[FAULT_KINDS[n] for n in names], k=count):
            rule = self._inject(name)
            if rule is not None:
                rules.append((name, rule))
        return rules

    def _inject(self, name: str) -> Any:
        rng, proxy, new = self.rng, self.proxy, self._current
        size = len(new.data)
        binary, manifest, reports = new.url_path, "/updates/manifest.json", "/v1/reports"
        times = 2 if rng.random() < 0.1 else 1
        if name == "binary_truncate":
            return proxy.inject(binary, Fault.TRUNCATE, times=times, after=rng.randrange(size))
        if name == "binary_reset":
            after = None if rng.random() < 0.3 else rng.randrange(size)
            return proxy.inject(binary, Fault.RESET, times=times, after=after)
        if name == "binary_corrupt":
            return proxy.inject(binary, Fault.CORRUPT, times=times, offset=rng.randrange(size))
        if name == "binary_mix_and_match":
            others = [b for b in self.builds_by_version.values() if b.sha != new.sha]
            if not others:
                return None
            other = rng.choice(others)
            if rng.random() < 0.5:  # another release's object, as the CDN would mix them up
                return proxy.inject(binary, Fault.MIX_AND_MATCH, times=times, source=other.url_path)
            body = (other.data * (size // len(other.data) + 1))[:size]  # same length, other bytes
            return proxy.inject(binary, Fault.MIX_AND_MATCH, times=times, body=body)
        if name == "binary_5xx":
            return proxy.inject(binary, Fault.STATUS, times=times, status=rng.choice((500, 502, 503, 504)))
        if name == "binary_stall":
            return proxy.inject(
                binary, Fault.STALL, times=1, after=rng.randrange(size), seconds=rng.uniform(0.2, 1.5)
            )
        if name == "binary_lie_length":
            delta = rng.choice((-1, 1)) * rng.randint(1, 4096)
            return proxy.inject(binary, Fault.LIE_LENGTH, times=times, delta=max(delta, 1 - size))
        if name == "manifest_replay":
            bodies = proxy.captured(manifest)
            if len(bodies) < 2:
                return None
            return proxy.inject(manifest, Fault.REPLAY, times=times, index=rng.randrange(len(bodies) - 1))
        if name == "manifest_5xx":
            return proxy.inject(manifest, Fault.STATUS, times=times, status=rng.choice((500, 503)))
        if name == "manifest_stall":
            return proxy.inject(manifest, Fault.STALL, times=1, after=rng.randrange(64), seconds=0.5)
        if name == "manifest_reset":
            return proxy.inject(manifest, Fault.RESET, times=times)
        if name == "manifest_304_no_etag":
            return proxy.inject(manifest, Fault.NOT_MODIFIED_NO_ETAG, times=times)
        if name == "reports_5xx":
            return proxy.inject(reports, Fault.STATUS, times=1, status=rng.choice((500, 503)))
        if name == "reports_reset_before":
            return proxy.inject(reports, Fault.RESET, times=1)
        if name == "reports_reset_after_store":
            return proxy.inject(reports, Fault.RESET, times=1, after=0)
        raise ValueError(name)

    # -- what the host looks like

    def target_sha(self) -> str | None:
        try:
            return sha256(self.host.target.read_bytes())
        except FileNotFoundError:
            return None

    def bad_pairs(self) -> dict[tuple[str, str], str]:
        return {
            (e.get("version"), e.get("sha256")): str(e.get("reason"))
            for e in self.host.state().get("bad_versions") or []
            if isinstance(e, dict)
        }

    def settled(self) -> dict[str, Any] | None:
        """The host at rest: no update pending, an agent running, no watchdog. None otherwise."""
        if self.host.pending() is not None or self.host.watchdog_pid() is not None:
            return None
        running = self.host.running_version()
        sha = self.target_sha()
        if running is None or sha is None:
            return None
        return {"running": running, "sha": sha}

    def converged(self, expect: str, prev: Build, new: Build) -> str | None:
        """``done`` when the host ended as ``expect``; ``wrong`` when it settled on another outcome."""
        now = self.settled()
        if now is None:
            return None
        running, sha = now["running"], now["sha"]
        if expect == INSTALL:
            if sha == new.sha and running == new.version:
                return "done"
            if (new.version, new.sha) in self.bad_pairs() and sha == prev.sha and running == prev.version:
                return "wrong"
            return None
        if sha == new.sha and running == new.version:
            return "wrong"  # a crashing or smoke-failing build committed
        if sha != prev.sha or running != prev.version:
            return None
        if expect == ROLLBACK:
            return "done" if (new.version, new.sha) in self.bad_pairs() else None
        entry = (self.host.state().get("attempts") or {}).get(f"{new.version}/{new.sha}") or {}
        return "done" if entry.get("last_error") == "smoke_test_failed" else None

    # -- one cycle

    def pick_kind(self) -> str:
        names = list(KINDS)
        kind = self.rng.choices(names, weights=[KINDS[n][0] for n in names])[0]
        if kind == "downgrade" and not self._downgrade_targets():
            kind = "ok"
        return kind

    def _downgrade_targets(self) -> list[Build]:
        current = self._host_build
        return [b for b in self.committed if b.version != current.version and b.sha != current.sha]

    def run_cycle(self, number: int) -> None:
        self.cycle = number
        started = time.monotonic()
        prev = self._host_build
        kind = self.pick_kind()
        if kind == "downgrade":
            new = self.rng.choice(self._downgrade_targets()[-20:])
        else:
            new = self.build(f"1.0.{number}", kind)
        expect = KINDS[kind][1]
        self.stats.kinds[kind] += 1
        self._current = new
        self._current_kind = kind
        self._starts = 0
        self._kills_this_cycle: list[str] = []
        self.sampler.allowed = frozenset({prev.sha, new.sha})
        serial = self.publish(new, downgrade=kind == "downgrade")
        rules = self.inject_faults()
        for kill_kind, trigger, value in self.plan_kills():
            self.run_kill(kill_kind, trigger, value, expect)
        result = self.supervise(lambda: self.converged(expect, prev, new), CYCLE_TIMEOUT)
        converged_at = time.monotonic() - started
        for name, rule in rules:
            if rule.applied:
                self.stats.faults[name] += rule.applied
            else:
                self.stats.faults_unused[name] += 1
        self.proxy.clear()
        if result is None:
            self.violation(
                "no convergence",
                f"{new.label()} expected {expect} within {CYCLE_TIMEOUT:.0f}s; {self.describe()}",
            )
            self.recover()
        elif result == "wrong":
            self.violation(
                f"{kind} build did not end {expect}",
                f"{new.label()}: {self.describe()}",
            )
        sha = self.target_sha()
        landed = self.builds_by_sha.get(sha or "")
        if landed is None:
            raise RuntimeError(f"the target is no published binary after cycle {number}; stopping")
        if landed is new:
            outcome = INSTALL
        elif landed is prev:
            outcome = ROLLBACK if (new.version, new.sha) in self.bad_pairs() else REFUSE
        else:
            outcome = f"other ({landed.label()})"
        self.stats.outcomes[outcome] += 1
        if landed is new and kind in ("ok", "downgrade") and new not in self.committed:
            self.committed.append(new)
        if expect == ROLLBACK and (new.version, new.sha) in self.bad_pairs():
            self.bad_paths[new.url_path] = len(self.proxy.seen(new.url_path))
        self._host_build = landed
        self.check(number, expect, kind, new, serial)
        self.sampler.allowed = frozenset({landed.sha})
        self.stats.cycles += 1
        took = time.monotonic() - started
        self.stats.cycle_seconds.append(took)
        what = f"{new.label()} as a downgrade" if kind == "downgrade" else new.label()
        line = (
            f"cycle {number}: {what} -> {outcome}; faults "
            f"{[(n, r.applied) for n, r in rules]}; kills {self._kills_this_cycle}; "
            f"converged {converged_at:.1f} s, total {took:.1f} s"
        )
        if took > SLOW_CYCLE:
            self.stats.slow.append(line)
        if self.verbose:
            print(f"    {line}", flush=True)

    def recover(self) -> None:
        """After a cycle that never converged: power-cycle the host once more and wait."""
        self.kill("host")
        self.supervise(lambda: self.settled(), 60.0)

    def describe(self) -> str:
        sha = self.target_sha()
        build = self.builds_by_sha.get(sha or "")
        procs = {pid: " ".join(Path(a).name for a in argv[:3]) for pid, argv in self.host_processes().items()}
        return json.dumps(
            {
                "target": build.label() if build else sha,
                "pending": self.host.pending(),
                "running": self.host.agent_record(),
                "watchdog": self.host.watchdog_pid(),
                "processes": procs,
                "bad_versions": [
                    (e.get("version"), e.get("reason")) for e in self.host.state().get("bad_versions", [])
                ][-3:],
                "last_events": [
                    (e.get("state"), e.get("target_version"), (e.get("error") or "")[:60])
                    for e in self.tail.events[-6:]
                ],
            },
            default=str,
        )

    # -- the invariants after a cycle

    def check(self, number: int, expect: str, kind: str, new: Build, serial: int) -> None:
        # One agent process: the losers of a start race and finished watchdogs leave within seconds.
        def one_agent() -> bool:
            record = self.host.agent_record()
            return record is not None and set(self.run_processes()) == {record["pid"]}

        if not self.supervise(one_agent, 5.0):
            procs = {pid: " ".join(argv[1:3]) for pid, argv in self.run_processes().items()}
            self.violation("not exactly one agent process", f"{procs}; record {self.host.agent_record()}")
        sha = self.target_sha()
        build = self.builds_by_sha.get(sha or "")
        done = self.host.cli("status", "--json")
        try:
            status = json.loads(done.stdout)
        except ValueError:
            status = {}
        if done.returncode != 0 or not isinstance(status, dict):
            self.violation("status --json failed", f"exit {done.returncode}: {done.stdout[:300]}")
            status = {}
        running = status.get("running") or {}
        if build is None:
            self.violation("target is not a published binary", f"sha256 {sha}")
        elif status.get("version") != build.version or running.get("version") != build.version:
            self.violation(
                "status disagrees with the target",
                f"target {build.label()}, status version {status.get('version')}, running {running}",
            )
        elif self.builds_by_version.get(build.version) is not build:
            self.violation("target is not the binary signed for its version", build.label())
        if status.get("pending") is not None:
            self.violation("pending record left", json.dumps(status["pending"]))
        if (running.get("pid") or 0) != (self.host.agent_record() or {}).get("pid"):
            self.violation("status running pid differs from the pid record", json.dumps(running))
        stray = self.host.stray_files()
        if stray:
            self.violation("stray files next to the target", ", ".join(stray))
        if self.host.backup.exists():
            backup = sha256(self.host.backup.read_bytes())
            if backup not in self.builds_by_sha:
                self.violation("backup is not a published binary", backup)
        highest = status.get("highest_serial") or 0
        if highest < self.highest_serial:
            self.violation("highest serial moved back", f"{highest} < {self.highest_serial}")
        if highest != serial:
            self.violation("latest manifest not accepted", f"highest_serial {highest}, published {serial}")
        self.highest_serial = max(self.highest_serial, highest)
        for path, seen in self.bad_paths.items():
            now_seen = len(self.proxy.seen(path))
            if now_seen > seen:
                self.violation("a rolled-back build was downloaded again", path)
                self.bad_paths[path] = now_seen
        self.check_reports(expect, new, serial)

    def queue_position(self) -> tuple[str | None, int, int]:
        """(stream, acked seq, highest seq numbered) from the queue files, as another process sees them."""
        directory = self.host.state_dir / REPORTS_DIR
        meta = read_json(directory / META_FILE) or {}
        try:
            data = (directory / LOG_FILE).read_bytes()
        except FileNotFoundError:
            data = b""
        acked = int(meta.get("acked_seq") or 0)
        top = max([acked, *(e.seq for e in scan(data).entries)])
        return meta.get("stream"), acked, top

    def check_reports(self, expect: str, new: Build, serial: int) -> None:
        drained = self.supervise(lambda: (p := self.queue_position())[1] == p[2], DRAIN_TIMEOUT, step=0.1)
        if not drained:
            self.violation("reports not drained", f"queue (stream, acked, top) = {self.queue_position()}")
        stream, acked, _ = self.queue_position()
        stored = self.reports.agent_events(self.agent_id)
        _, _, top = self.queue_position()
        self.tail.poll()
        by_stream: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
        ids: dict[str, tuple[str, int]] = {}
        for event in stored:
            by_stream[event["stream"]][event["seq"]].append(event["event_id"])
            ids[event["event_id"]] = (event["stream"], event["seq"])
        for name, seqs in by_stream.items():
            twice = {s: v for s, v in seqs.items() if len(v) > 1}
            if twice:
                self._report_once(
                    f"dup {name} {sorted(twice)}", "duplicate seq in the store", f"{name}: {twice}"
                )
            missing = sorted(set(range(1, max(seqs) + 1)) - set(seqs))
            if missing:
                self._report_once(
                    f"gap {name} {missing}", "gap in the stored seqs", f"{name}: {missing[:20]}"
                )
        if stream is not None:
            high = max(by_stream.get(stream, {}) or [0])
            if high < acked:
                self.violation(
                    "acknowledged events missing from the store", f"store up to {high}, acked {acked}"
                )
            if high > top:
                self.violation(
                    "store holds a seq the queue never numbered", f"store up to {high}, queue top {top}"
                )
            if self._stream is not None and stream != self._stream:
                self.out(f"  note: the queue's stream changed from {self._stream} to {stream}")
            self._stream = stream
        for event in self.tail.events:
            seq, where = event.get("seq"), event.get("stream")
            if seq is None:
                self._report_once(
                    f"noseq {event.get('event_id')}",
                    "event logged but never queued",
                    f"{event.get('state')} {event.get('target_version')}",
                )
            elif where == stream and seq <= acked and ids.get(event["event_id"]) != (where, seq):
                self._report_once(
                    f"lost {event['event_id']}",
                    "acknowledged event missing from the store",
                    f"seq {seq} {event.get('state')} {event.get('target_version')} {event['event_id']}",
                )
        wanted = {INSTALL: "committed", ROLLBACK: "rolled_back", REFUSE: "failed"}[expect]
        landed = self._host_build
        if expect == INSTALL and landed is not new:
            return  # already reported as a wrong outcome
        found = [
            e
            for e in stored
            if e["state"] == wanted
            and e.get("target_version") == new.version
            and e.get("manifest_serial") == serial
            and (expect != REFUSE or str(e.get("error", "")).startswith("smoke_test_failed"))
        ]
        if not found and (expect != ROLLBACK or (new.version, new.sha) in self.bad_pairs()):
            self.violation("outcome never reported", f"no {wanted} for {new.label()} serial {serial}")

    def _report_once(self, key: str, what: str, detail: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            self.violation(what, detail)

    # -- the whole run

    def setup(self) -> None:
        first = self.build("1.0.0", "ok")
        self.publish(first)
        self.host.target.parent.mkdir(parents=True, exist_ok=True)
        self.host.target.write_bytes(first.data)
        self.host.target.chmod(0o755)
        self._host_build = first
        self._current = first
        self.committed.append(first)
        self.sampler.allowed = frozenset({first.sha})
        self.sampler.start()
        self.start_agent("first_start")
        if not self.supervise(lambda: self.host.state().get("highest_serial") == self.serial, 30.0):
            raise RuntimeError(f"the agent did not start: {self.host.log_text()[-2000:]}")
        self.highest_serial = self.serial

    def totals(self) -> dict[str, Any]:
        stored = self.reports.agent_events(self.agent_id)
        states = Counter(e["state"] for e in stored)
        rollbacks = Counter(
            str(e.get("error", "")).split(":")[0] for e in stored if e["state"] == "rolled_back"
        )
        failures = Counter(
            f"{e.get('failed_state')}/{str(e.get('error', '')).split(':')[0]}"
            for e in stored
            if e["state"] == "failed"
        )
        return {
            "events": len(stored),
            "streams": len({e["stream"] for e in stored}),
            "states": states,
            "rollbacks": rollbacks,
            "failures": failures,
        }


# ---------------------------------------------------------------- output


def fmt_counter(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def summary(soak: Soak, runtime: float, out: Report) -> dict[str, Any]:
    stats = soak.stats
    totals = soak.totals()
    seconds = stats.cycle_seconds or [0.0]
    kills = sum(stats.kills.values())
    faults = sum(stats.faults.values())
    out("")
    out("| figure | value |")
    out("|---|---|")
    rows = [
        (
            "cycles",
            f"{stats.cycles}" + (f" (stopped early: {stats.stopped_early})" if stats.stopped_early else ""),
        ),
        ("releases by kind", fmt_counter(stats.kinds)),
        ("cycle outcomes", fmt_counter(stats.outcomes)),
        ("kills (kill -9)", f"{kills}: {fmt_counter(stats.kills)}"),
        ("kills planned, not made", fmt_counter(stats.kills_missed)),
        ("kills landed in", fmt_counter(stats.kill_states)),
        ("faults applied (requests)", f"{faults}: {fmt_counter(stats.faults)}"),
        ("faults injected, never hit", fmt_counter(stats.faults_unused)),
        ("commits (reported)", str(totals["states"].get("committed", 0))),
        ("rollbacks by reason", fmt_counter(totals["rollbacks"])),
        ("failures by state/code", fmt_counter(totals["failures"])),
        ("agent starts by init", fmt_counter(stats.init)),
        ("reports in the store", f"{totals['events']} events in {totals['streams']} stream(s)"),
        ("target samples", f"{soak.sampler.samples:,} (every {SAMPLE_EVERY * 1000:.0f} ms)"),
        (
            "cycle time",
            f"mean {sum(seconds) / len(seconds):.2f} s, median {sorted(seconds)[len(seconds) // 2]:.2f} s, "
            f"max {max(seconds):.2f} s",
        ),
        ("runtime", f"{runtime:.0f} s ({runtime / 60:.1f} min)"),
        ("invariant violations", str(len(stats.violations))),
    ]
    for name, value in rows:
        out(f"| {name} | {value} |")
    out("")
    if stats.violations:
        out("Violations:")
        for found in stats.violations:
            out(f"- {found.line()}")
    else:
        out("Violations: none.")
    out("")
    out(f"Cycles slower than {SLOW_CYCLE:.0f} s (not violations): {len(stats.slow)}")
    for line in stats.slow[:10]:
        out(f"- {line}")
    out("")
    out("Notes:")
    out(
        "- agent crash = kill -9 of the agent's process group (its watchdog, in its own session, "
        "survives); host crash = kill -9 of every process of the host; both followed at once by a "
        "start with the same command (the run lock settles a race with the watchdog's own restart)."
    )
    out(
        "- after every cycle: target byte-identical to the running or the newly signed binary (also "
        f"sampled every {SAMPLE_EVERY * 1000:.0f} ms), no pending.json, one agent running the installed "
        "version, no watchdog, no stray file, status --json agreeing, serial never moved back; reports: "
        "seq 1..N per stream with no gap or repeat in SQLite, every acknowledged seq stored with the "
        "event_id the agent logged, the cycle's outcome event stored."
    )
    out("- faults: requests the proxy actually broke (a rule injected for 1-2 requests).")
    if soak.tail.errors:
        out("")
        out("Errors the agent logged (count: message), for the record:")
        for message, count in soak.tail.errors.most_common(12):
            out(f"- {count}: {message}")
    if soak.tail.tracebacks:
        out(
            f"- {len(soak.tail.tracebacks)} traceback(s) in the agent log; last: {soak.tail.tracebacks[-1]!r}"
        )
    return {
        "cycles": stats.cycles,
        "kills": kills,
        "kills_by_kind": dict(stats.kills),
        "kill_states": dict(stats.kill_states),
        "faults": faults,
        "faults_by_kind": dict(stats.faults),
        "commits": totals["states"].get("committed", 0),
        "rollbacks": dict(totals["rollbacks"]),
        "failures": dict(totals["failures"]),
        "outcomes": dict(stats.outcomes),
        "init": dict(stats.init),
        "events": totals["events"],
        "violations": [v.line() for v in stats.violations],
        "runtime": runtime,
        "stopped_early": stats.stopped_early,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cycles", type=int, default=DEFAULT_CYCLES, help=f"update cycles (default {DEFAULT_CYCLES})"
    )
    parser.add_argument("--long", action="store_true", help=f"{LONG_CYCLES} cycles")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="stop starting cycles after this")
    parser.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--verbose", action="store_true", help="one line per cycle")
    parser.add_argument("--json-out", type=Path, help="also write the figures as JSON here")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (always kept on violations)"
    )
    args = parser.parse_args(argv)
    cycles = LONG_CYCLES if args.long else args.cycles
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    out = Report()
    machine_line = machine()
    out(f"Soak: {cycles} cycles, seed {seed}, cap {args.max_minutes:g} min; one agent on 127.0.0.1")
    started = time.monotonic()
    figures: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="avika-soak-"))
    keep = args.keep
    try:
        with Soak(work, seed, out, verbose=args.verbose) as soak:
            soak.setup()
            cap = args.max_minutes * 60
            for number in range(1, cycles + 1):
                if time.monotonic() - started > cap:
                    soak.stats.stopped_early = f"--max-minutes {args.max_minutes:g} reached"
                    out(f"stopping early after {number - 1} cycles: {soak.stats.stopped_early}")
                    break
                soak.run_cycle(number)
                if number % 10 == 0 or number == cycles:
                    s = soak.stats
                    out(
                        f"  cycle {number}/{cycles}: {time.monotonic() - started:.0f} s, "
                        f"kills {sum(s.kills.values())}, faults {sum(s.faults.values())}, "
                        f"violations {len(s.violations)}"
                    )
            figures = summary(soak, time.monotonic() - started, out)
            keep = keep or bool(soak.stats.violations)
    except BaseException:
        keep = True
        raise
    finally:
        if keep:
            print(f"work directory kept: {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    figures["seed"] = seed
    if args.json_out:
        args.json_out.write_text(json.dumps(figures, indent=2))
    if not args.no_results:
        append(out.lines, title="bench/soak.py", command=command_line(), machine_line=machine_line)
    return 1 if figures.get("violations") else 0


if __name__ == "__main__":
    sys.exit(main())
