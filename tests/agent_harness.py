"""Shared helpers for the update tests that run real agent processes.

- :func:`dev_binary` writes a fast stand-in for ``make agent-binary``: a Python launcher script
  (shebang: this venv's python) that sets ``agent.buildinfo.VERSION`` / ``PUBLIC_KEYS`` and calls
  ``agent.cli.main``. Variants misbehave the ways a bad release does: ``crash`` (exits 1 at start,
  before any agent code runs), ``segfault`` (SIGSEGV at start), ``smoke_fail`` (``version`` prints
  the wrong version), ``die_after_boot`` (runs our code, counts its boot, dies 0.5 s later),
  ``hang_after_boot`` (runs our code, counts its boot, then its first check never returns, as a
  fetch without a deadline or a deadlock would: alive, never commits, deaf to SIGTERM since its
  loop never gets back to look). Every variant answers ``version`` correctly except
  ``smoke_fail``, so a bad release passes the smoke test, as a real one that fails only under
  ``run`` would.
- :class:`Site` publishes signed releases in the store layout (DESIGN section 2) on a
  :class:`tests.agent_fixtures.LocalServer` (127.0.0.1, port 0), which records every request and
  can drop, corrupt or fail a download.
- :class:`Host` is one simulated VM: a target binary in its own directory, a state dir, the
  environment a host would set, and helpers to start ``run``, call the CLI, read the JSON-lines
  log (the reported event chain), poll with deadlines and kill everything it started by pid.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent import environment
from agent.manifest import Binary, LocalSigner, Manifest, Rollout, generate_private_key, sign_envelope
from tests.agent_fixtures import LocalServer, Route, sha256

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
PLATFORM = environment.platform_key()
VARIANTS = ("ok", "crash", "segfault", "smoke_fail", "die_after_boot", "hang_after_boot")
# The states a successful VM update goes through, in order (DESIGN section 4).
COMMITTED_CHAIN = [
    "update_available",
    "downloading",
    "verifying",
    "staged",
    "restarting",
    "watching",
    "committed",
]

_LAUNCHER = """#!{python}
# avika-agent development build {version} ({variant}): a stand-in for `make agent-binary`
import os, sys
if sys.argv[1:2] == ["version"]:
    print({printed!r})
    sys.exit(0)
{misbehave}
sys.path.insert(0, {root!r})
import agent.buildinfo
agent.buildinfo.VERSION = {version!r}
agent.buildinfo.PUBLIC_KEYS = {keys!r}
from agent import cli
{late}
cli.entry()
"""
_MISBEHAVE = {
    "crash": "sys.exit(1)",
    "segfault": "import signal; os.kill(os.getpid(), signal.SIGSEGV)",
}
_LATE = {
    "die_after_boot": (
        "import threading\nif 'run' in sys.argv: threading.Timer(0.5, lambda: os._exit(1)).start()"
    ),
    # The run loop's first check blocks for good (after resume counted the boot and reported watching).
    "hang_after_boot": (
        "import threading\nfrom agent import check as _check\n"
        "if 'run' in sys.argv: _check.check = lambda *a, **k: threading.Event().wait()"
    ),
}


def dev_binary(path: Path, version: str, keys: str = "", variant: str = "ok") -> bytes:
    """Write an executable dev agent at ``path``; returns its bytes (unique per version/keys/variant)."""
    if variant not in VARIANTS:
        raise ValueError(variant)
    text = _LAUNCHER.format(
        python=PYTHON,
        version=version,
        variant=variant,
        printed=f"{version}-wrong" if variant == "smoke_fail" else version,
        misbehave=_MISBEHAVE.get(variant, ""),
        root=str(ROOT),
        keys=keys,
        late=_LATE.get(variant, ""),
    )
    data = text.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o755)
    return data


def new_signer() -> LocalSigner:
    return LocalSigner(generate_private_key())


def keys_of(*signers: LocalSigner) -> str:
    return ",".join(s.public_key.b64 for s in signers)


# ---------------------------------------------------------------- the update site


@dataclass
class Site:
    """Releases in the store layout, served by a recording LocalServer under ``/updates``."""

    server: LocalServer
    signer: LocalSigner
    serial: int = 0
    manifest: Manifest | None = None
    binaries: dict[str, bytes] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url("/updates")

    def binary_path(self, version: str, data: bytes) -> str:
        return f"/updates/binaries/{version}/{sha256(data)}/avika-agent-{PLATFORM}"

    def release(
        self,
        version: str,
        data: bytes,
        *,
        signers: list[LocalSigner] | None = None,
        size: int | None = None,
        digest: str | None = None,
        route: dict[str, Any] | None = None,
        **fields: Any,
    ) -> Manifest:
        """Upload ``data`` as ``version`` and sign a manifest (serial + 1) pointing at it."""
        path = self.binary_path(version, data)
        options = dict(route or {})
        self.server.serve(path, options.pop("body", data), **options)
        self.binaries[path] = data
        now = datetime.now(timezone.utc)
        binary = Binary(
            url=path.removeprefix("/updates/"), sha256=digest or sha256(data), size=size or len(data)
        )
        self.serial += 1
        self.manifest = Manifest(
            serial=self.serial,
            version=version,
            released_at=now - timedelta(minutes=1),
            expires=now + timedelta(days=30),
            binaries={PLATFORM: binary},
            rollout=fields.pop("rollout", Rollout(100, version)),
            container_image=fields.pop("container_image", f"hellodk/avika-agent:{version}"),
            **fields,
        )
        self._sign(signers)
        return self.manifest

    def resign(self, *, signers: list[LocalSigner] | None = None, **changes: Any) -> Manifest:
        """A routine re-sign (``rollout``, ``refresh``): new serial, same binaries."""
        assert self.manifest is not None
        self.serial += 1
        fields = {f: getattr(self.manifest, f) for f in Manifest.__dataclass_fields__ if f != "raw"}
        fields.update(serial=self.serial, expires=datetime.now(timezone.utc) + timedelta(days=30), **changes)
        self.manifest = Manifest(**fields)
        self._sign(signers)
        return self.manifest

    def _sign(self, signers: list[LocalSigner] | None) -> None:
        assert self.manifest is not None
        envelope = sign_envelope(self.manifest.to_payload(), signers or [self.signer])
        self.server.serve("/updates/manifest.json", envelope, etag=f'"{sha256(envelope)[:16]}"')

    def route(self, version: str, data: bytes) -> Route:
        return self.server.routes[self.binary_path(version, data)]

    def downloads(self, version: str, data: bytes) -> int:
        return self.server.count(self.binary_path(version, data))


@contextlib.contextmanager
def site(signer: LocalSigner | None = None) -> Iterator[Site]:
    with LocalServer() as server:
        yield Site(server, signer or new_signer())


# ---------------------------------------------------------------- real small filesystems


@contextlib.contextmanager
def tmpfs(
    where: Path, size: str, *, read_only: bool = False, files: dict[str, bytes] | None = None
) -> Iterator[Path]:
    """A real tmpfs mounted at ``where`` with ``files`` (executable) in it, then optionally remounted
    read-only; skips the test where mounting is not allowed (it needs CAP_SYS_ADMIN)."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {done.stderr.decode().strip()}")
    try:
        for name, data in (files or {}).items():
            (where / name).write_bytes(data)
            (where / name).chmod(0o755)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


# ---------------------------------------------------------------- polling


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def proc_state(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2]


def alive(pid: int | None) -> bool:
    return pid is not None and proc_state(pid) not in (None, "Z", "X")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


# ---------------------------------------------------------------- a host


def _retry_busy(spawn: Callable[[], Any]) -> Any:
    """Spawn, retrying ETXTBSY: with scenarios in threads, another thread's fork may briefly hold
    a copy of the descriptor a binary was just written through (a test-harness race only; the
    agent writes and runs its staged file from one thread)."""
    for attempt in range(40):
        try:
            return spawn()
        except OSError as exc:
            if exc.errno != errno.ETXTBSY or attempt == 39:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


@dataclass
class Host:
    """One simulated VM: ``<dir>/bin/avika-agent``, ``<dir>/state``, a JSON-lines log."""

    dir: Path
    update_server: str
    env_extra: dict[str, str] = field(default_factory=dict)
    popens: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "avika-agent.conf"
        self.config.write_text("# settings come from the environment\n")

    @property
    def target(self) -> Path:
        return self.dir / "bin" / "avika-agent"

    @property
    def backup(self) -> Path:
        return self.dir / "bin" / "avika-agent.backup"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def log_path(self) -> Path:
        return self.dir / "agent.log"

    def install(self, version: str, keys: str = "", variant: str = "ok") -> bytes:
        return dev_binary(self.target, version, keys, variant)

    def env(self, **overrides: str) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.dir),
            "LANG": "C.UTF-8",
            "AGENT_ID": f"host-{self.dir.name}",
            "UPDATE_SERVER": self.update_server,
            "UPDATE_TARGET": str(self.target),
            "UPDATE_STATE_DIR": str(self.state_dir),
            "BUFFER_DIR": str(self.dir / "data"),
            "DEPLOYMENT_MODE": "vm",
            "UPDATE_INTERVAL": "1s",
            "UPDATE_HEALTH_WINDOW": "1s",
            "UPDATE_MAX_BOOT_ATTEMPTS": "3",
            "UPDATE_REPORT_URL": "disabled",
            "AVIKA_LOG_FORMAT": "json",
            "AVIKA_AGENT_CACHE": str(self.dir / "cache"),  # where a real agent file unpacks its code
        }
        env.update(self.env_extra)
        env.update(overrides)
        return {k: v for k, v in env.items() if v is not None}

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        """``<target> run`` in its own session, logging to ``agent.log`` (appended)."""
        with open(self.log_path, "ab") as log:
            proc = _retry_busy(
                lambda: subprocess.Popen(
                    [str(self.target), *(args or ("run",)), "--config", str(self.config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=self.env(**env),
                    cwd=self.dir,
                    start_new_session=True,
                )
            )
        self.popens.append(proc)
        return proc

    def cli(self, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
        """Run the installed binary once (stdout captured, stderr appended to the log)."""
        with open(self.log_path, "ab") as log:
            return _retry_busy(
                lambda: subprocess.run(
                    [str(self.target), *args, "--config", str(self.config)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env=self.env(**env),
                    cwd=self.dir,
                    timeout=timeout,
                    text=True,
                    check=False,
                )
            )

    def status(self) -> dict[str, Any]:
        done = self.cli("status", "--json")
        assert done.returncode == 0, done
        return json.loads(done.stdout)

    # -- what is on disk

    def pending(self) -> dict[str, Any] | None:
        return read_json(self.state_dir / "pending.json")

    def state(self) -> dict[str, Any]:
        return read_json(self.state_dir / "state.json") or {}

    def agent_record(self) -> dict[str, Any] | None:
        record = read_json(self.state_dir / "agent.pid")
        return record if record and alive(record.get("pid")) else None

    def running_version(self) -> str | None:
        record = self.agent_record()
        return record["version"] if record else None

    def watchdog_pid(self) -> int | None:
        record = read_json(self.state_dir / "watchdog.pid")
        pid = record.get("pid") if record else None
        return pid if alive(pid) else None

    def stray_files(self) -> list[str]:
        """Anything next to the target but the target and its backup (staged files, temp links)."""
        return sorted(
            p.name
            for p in self.target.parent.iterdir()
            if p.name not in ("avika-agent", "avika-agent.backup")
        )

    # -- the log

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        with contextlib.suppress(FileNotFoundError):
            for raw in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    obj = json.loads(raw)
                    if isinstance(obj, dict):
                        lines.append(obj)
        return lines

    def events(self) -> list[dict[str, Any]]:
        return [line["event"] for line in self.log_lines() if isinstance(line.get("event"), dict)]

    def chain(self, target_version: str | None = None) -> list[str]:
        return [
            e["state"]
            for e in self.events()
            if target_version is None or e.get("target_version") == target_version
        ]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- processes

    def processes(self) -> list[int]:
        """Every live process started from this host's directory (agents, restarted agents, watchdogs).

        Watchdogs are forks of an agent, so their command line names the target too.
        """
        found = []
        marker = str(self.dir).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmdline and alive(int(entry.name)):
                found.append(int(entry.name))
        return found

    def kill_all(self) -> None:
        """SIGKILL every process of this host, by pid, and reap our own children.

        First prints what a failure needs explained (pytest shows a test's output only if it
        failed): the live processes, pending.json, state.json and the log's tail.
        """
        print(f"--- host {self.dir}: processes {self.processes()}, pending {self.pending()}")
        print(f"--- state {self.state()}")
        print("--- log tail:\n" + "\n".join(self.log_text().splitlines()[-60:]))
        for _ in range(3):
            pids = self.processes()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for proc in self.popens:
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)

    def converged(self, new: bytes, version: str | None = None) -> bool:
        """The update finished: no record pending, the target is the new binary, an agent runs it
        (``version``, if given) and the commit was reported."""
        running = self.running_version()
        return (
            self.pending() is None
            and self.target.read_bytes() == new
            and running is not None
            and (version is None or running == version)
            and "committed" in self.chain(version)
        )


def run_concurrently(scenarios: dict[str, Callable[[], Any]], workers: int = 6) -> dict[str, Any]:
    """Run independent scenarios (each with its own server and host) in threads.

    Returns each one's result, or the exception it raised, by name: the tests that own a
    scenario assert on it (or re-raise), so the suite pays the wall time of a few, not of all.
    """
    results: dict[str, Any] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(fn): name for name, fn in scenarios.items()}
        for future in futures:
            try:
                results[futures[future]] = future.result()
            except BaseException as exc:  # handed to the test that owns the scenario
                results[futures[future]] = exc
    return results
