"""Restarting into a new (or restored) binary, and the watchdog that survives a bad one (DESIGN section 4).

Methods (``UPDATE_RESTART_METHOD``):

- ``exec``: ``os.execv`` of the verified target path: same PID, so systemd or any supervisor keeps
  tracking the agent.
- ``systemd``: ``systemctl reset-failed UNIT``, then ``systemctl --no-block restart UNIT``
  (``systemctl`` is looked up on PATH). ``--no-block`` because the calling agent is itself in the
  unit's cgroup: the restart stops it, and a blocking ``systemctl`` would be killed waiting for
  the job it queued. Under systemd the unit is the watchdog (packaging/systemd): ``Type=notify``
  with ``WatchdogSec=`` restarts an agent whose loop stops pinging (:mod:`agent.sdnotify`), and
  its start limits with ``OnFailure=`` roll back a binary that cannot even start.
- ``signal``: SIGHUP to the running agent, whose handler re-execs the target. ``update`` or
  ``rollback`` run by hand signal the agent named by ``<state dir>/agent.pid`` (JSON ``{"pid",
  "version", "started_at", "args", "target"}``), or leave the new binary for the next start if
  none runs.

The watchdog (``exec`` and ``signal`` outside systemd, i.e. ``INVOCATION_ID`` unset) is forked
before the restart and double-forked into its own session, so it is never the agent's child and
outlives it. It closes every inherited descriptor but 0-2 (an inherited ``flock`` on the run or
update lock would outlive the exec and lock the new version out), and only then tells the
process that forked it its pid: that process execs only after the watchdog holds no lock of its.
It watches the agent with a pidfd (``os.pidfd_open``; without one, ``/proc/<pid>/stat``: gone,
or state ``Z``/``X``, or another start time = dead). It stays until the update commits or rolls
back. A new version that starts while no watchdog runs (after a host crash killed it, or started
by another supervisor) forks one for itself.

Boot-counting protocol (the agent and the watchdog share ``boots`` in ``pending.json``):

1. The transaction writes the record with ``boots`` = 0 before the swap.
2. Every start of the new version that reaches our code counts itself: ``lifecycle.resume``
   raises ``boots`` by one, durably, before anything else.
3. The watchdog remembers ``boots`` as it was when the agent it watches was (re)started. When
   that process dies before the commit, the watchdog re-reads the record: ``boots`` unchanged
   means the dead start never counted itself (it died before our code ran: a bad interpreter, a
   segfault, an exit at import), so the watchdog adds that boot; a higher ``boots`` means the
   start counted itself and the watchdog adds nothing. Each start counts exactly once.
4. Then, if ``boots`` >= ``UPDATE_MAX_BOOT_ATTEMPTS`` (the next start would exceed the cap), the
   watchdog rolls back (restores ``.backup``, remembers the (version, sha256) as
   ``too_many_boots``, reports ``rolled_back``) and starts the old version; past the commit
   deadline it rolls back as ``commit_deadline_passed`` (a new start would only do the same);
   otherwise it starts the target again with the same argv, environment and working directory,
   and remembers ``boots``. Restarted agents are double-forked too (never the watchdog's
   children): the watchdog reaps the short-lived intermediate at once, so it leaves no zombie,
   and the agent it starts is reparented to init (or the nearest subreaper), which reaps it.
5. When the agent dies and another one runs already (the pid record names a live agent of this
   target: a supervisor restarted it first), the watchdog adopts that one instead of starting a
   second: it watches it from then on, and never counts a boot for it (whoever started it
   restarts it; each of its starts that reaches our code counts itself).
6. The ``rolled_back`` report goes into the durable queue through a sink the watchdog opens
   itself (never one inherited from the agent: its thread and locks did not survive the fork),
   and is sent after the old version was started (the restored agent sends it too).
7. It stands down when ``pending.json`` disappears (commit or rollback) or when the agent it
   watches was stopped on purpose (its SIGTERM handler writes ``<state dir>/stopping`` with its
   pid).

A hung release (alive, never commits): a live loop rolls itself back at the commit deadline
(``commit_deadline_passed``). An agent that has not done so by the deadline plus a grace
(``UPDATE_FETCH_TIMEOUT`` + ``lifecycle.HANG_MARGIN``; counted from when the watchdog started
watching that process, if later) is hung. The watchdog takes the update lock (the loop commits
and rolls back under it, so it never kills an agent that is finishing its own update), sends
SIGTERM, SIGKILL after 10 s, restores the backup the same atomic way, remembers the version as
``hung`` (for good: a hang is a defect of the build, not of the network), reports
``rolled_back`` and starts the old version.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NoReturn

from agent import lifecycle
from agent.config import AgentConfig
from agent.events import EventSink, Origin
from agent.manifest import format_time
from agent.reports import QueueSink, sink_for
from agent.state import LockBusy, write_json_atomic

log = logging.getLogger(__name__)

PID_FILE = "agent.pid"
STOPPING_FILE = "stopping"
WATCHDOG_FILE = "watchdog.pid"
SYSTEMCTL_TIMEOUT = 30.0
WATCHDOG_POLL = 0.25  # seconds between looks at pending.json while the agent lives
WATCHDOG_FLUSH = 5.0  # how long the watchdog tries to deliver its rollback report before it exits
WATCHDOG_START_WAIT = 10.0  # how long the forking process waits for the watchdog to let go of its fds
TERM_GRACE = 10.0  # a hung agent gets SIGTERM, then SIGKILL after this (DESIGN section 4)
KILL_WAIT = 30.0  # after SIGKILL; only an uninterruptible sleep outlasts it
HANG_LOCK_WAIT = 30.0  # the agent holds the update lock for moments while it commits or rolls back
LAUNCH_ATTEMPTS = 8  # starting an agent is tried this often (0.5 s doubling, about 40 s in all)
_FALLBACK_MAXFD = 4096


class RestartFailed(Exception):
    code = "restart_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    """systemd sets ``INVOCATION_ID`` for every unit it starts."""
    return bool((os.environ if environ is None else environ).get("INVOCATION_ID"))


def needs_watchdog(config: AgentConfig, environ: Mapping[str, str] | None = None) -> bool:
    return config.restart_method in ("exec", "signal") and not under_systemd(environ)


# ---------------------------------------------------------------- processes


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) from ``/proc/<pid>/stat``; None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parens
    return rest[0], int(rest[19])


def pid_alive(pid: int) -> bool:
    """Running (a zombie is dead: it only waits for its parent to reap it)."""
    found = proc_stat(pid)
    return found is not None and found[0] not in ("Z", "X", "x")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def runs_target(pid: int, target: Path) -> bool:
    """Whether ``pid`` was started from ``target`` (its command line names it): guards pid reuse."""
    names = {target.name, Path(os.path.realpath(target)).name}
    return any(Path(arg).name in names for arg in _cmdline(pid)[:3])


def proc_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape") for k, v in pairs}


def proc_cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return "/"


# ---------------------------------------------------------------- the pid record and the stop marker


def write_pid_record(state_dir: Path, *, version: str, args: Sequence[str], target: Path) -> None:
    write_json_atomic(
        state_dir / PID_FILE,
        {
            "pid": os.getpid(),
            "version": version,
            "started_at": format_time(datetime.now(timezone.utc)),
            "args": list(args),
            "target": str(target),
        },
    )


def read_json(path: Path) -> dict[str, Any] | None:
    """A small JSON object record (pid record, stop marker), or None if absent or unusable."""
    try:
        data = lifecycle.read_record(path)
        obj = json.loads(data) if data is not None else None
    except (OSError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _int_field(record: Mapping[str, Any], name: str) -> int | None:
    value = record.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def running_agent(state_dir: Path, target: Path | None = None) -> dict[str, Any] | None:
    """The pid record of a live agent, or None (no record, or its process is gone)."""
    record = read_json(state_dir / PID_FILE)
    pid = None if record is None else _int_field(record, "pid")
    if record is None or pid is None or not pid_alive(pid):
        return None
    check = target if target is not None else Path(str(record.get("target") or ""))
    if check.name and not runs_target(pid, check):
        return None
    return record


def watchdog_running(state_dir: Path) -> int | None:
    """The pid of a live watchdog (its record names it with its start time: no reused pid)."""
    record = read_json(state_dir / WATCHDOG_FILE)
    pid = None if record is None else _int_field(record, "pid")
    if record is None or pid is None:
        return None
    found = proc_stat(pid)
    if found is None or found[0] in ("Z", "X", "x") or found[1] != record.get("starttime"):
        return None
    return pid


def clear_pid_record(state_dir: Path, pid: int | None = None) -> None:
    """Remove the pid record if it is ours (``pid``, default this process)."""
    record = read_json(state_dir / PID_FILE)
    if record is not None and record.get("pid") == (os.getpid() if pid is None else pid):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state_dir / PID_FILE)


def write_stopping(state_dir: Path) -> None:
    """Written by the SIGTERM handler: the agent was stopped on purpose, the watchdog stands down."""
    with contextlib.suppress(OSError):
        write_json_atomic(
            state_dir / STOPPING_FILE, {"pid": os.getpid(), "time": format_time(datetime.now(timezone.utc))}
        )


def stopped_on_purpose(state_dir: Path, pid: int) -> bool:
    record = read_json(state_dir / STOPPING_FILE)
    return record is not None and record.get("pid") == pid


def clear_stopping(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_dir / STOPPING_FILE)


# ---------------------------------------------------------------- methods


@dataclass(frozen=True)
class Launch:
    """How to start the agent again: the target with the original arguments, env and cwd."""

    target: str
    args: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = "/"

    @classmethod
    def of_self(cls, target: Path) -> Launch:
        return cls(str(target), tuple(sys.argv[1:]), dict(os.environ), os.getcwd())

    @classmethod
    def of_agent(cls, record: Mapping[str, Any], target: Path) -> Launch:
        pid = int(record["pid"])
        args = record.get("args")
        return cls(
            str(target),
            tuple(str(a) for a in args) if isinstance(args, list) else ("run",),
            proc_environ(pid) or dict(os.environ),
            proc_cwd(pid),
        )


def _flush_output() -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _default_signals() -> None:
    """Python ignores SIGPIPE and SIGXFSZ; an ignored disposition would survive the exec."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def exec_target(target: Path | str, args: Sequence[str], env: Mapping[str, str] | None = None) -> NoReturn:
    """Replace this process with ``target args`` (same PID). ``RestartFailed`` if exec fails."""
    log.info("exec %s %s", target, " ".join(args))
    _flush_output()
    _default_signals()
    try:
        if env is None:
            os.execv(str(target), [str(target), *args])
        os.execve(str(target), [str(target), *args], dict(env))
    except OSError as exc:
        raise RestartFailed(f"cannot exec {target}: {exc}") from exc


def systemd_restart(unit: str) -> None:
    """``systemctl reset-failed UNIT`` (so start limits do not refuse us), then the restart."""
    exe = shutil.which("systemctl")
    if exe is None:
        raise RestartFailed("systemctl is not on PATH")
    try:
        reset = subprocess.run(
            [exe, "reset-failed", unit],
            capture_output=True,
            text=True,
            timeout=SYSTEMCTL_TIMEOUT,
            check=False,
        )
        if reset.returncode != 0:
            log.debug("systemctl reset-failed %s: %s", unit, reset.stderr.strip())
        done = subprocess.run(
            [exe, "--no-block", "restart", unit],
            capture_output=True,
            text=True,
            timeout=SYSTEMCTL_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RestartFailed(f"systemctl restart {unit}: {exc}") from exc
    if done.returncode != 0:
        raise RestartFailed(f"systemctl restart {unit} exited {done.returncode}: {done.stderr.strip()[:300]}")
    log.info("asked systemd to restart %s", unit)


def signal_agent(pid: int, sig: int = signal.SIGHUP) -> None:
    try:
        os.kill(pid, sig)
    except OSError as exc:
        raise RestartFailed(f"cannot signal agent pid {pid}: {exc}") from exc


def restart_running_agent(config: AgentConfig, pending: lifecycle.Pending | None, origin: Origin) -> str:
    """After ``update``/``rollback`` by hand: restart the agent that runs (not this process).

    Returns what happened: ``systemd``, ``signalled`` (with a watchdog when ``pending`` is given
    and the agent is not under systemd) or ``deferred`` (no agent runs: the next start runs the
    new binary and counts its boot).
    """
    if config.restart_method == "systemd":
        systemd_restart(config.systemd_unit)
        return "systemd"
    target = Path(pending.target) if pending is not None else config.target
    record = running_agent(config.state_dir, target)
    if record is None:
        log.info("no agent is running; %s runs at the next start", target)
        return "deferred"
    pid = int(record["pid"])
    if pending is not None and not under_systemd(proc_environ(pid)):
        spawn_watchdog(config, origin, pid, Launch.of_agent(record, target), boots_at_start=pending.boots)
    signal_agent(pid)
    log.info("signalled agent pid %d to re-exec %s", pid, target)
    return "signalled"


# ---------------------------------------------------------------- the watchdog


@dataclass(frozen=True)
class WatchdogSpec:
    """Everything the watchdog process needs to guard one restart."""

    config: AgentConfig
    origin: Origin
    agent_pid: int
    launch: Launch
    boots_at_start: int


class _Watched:
    """One agent process: its death is a readable pidfd, or its /proc entry going away."""

    def __init__(self, pid: int, pidfd: int | None, starttime: int | None) -> None:
        self.pid, self.pidfd, self.starttime = pid, pidfd, starttime

    @classmethod
    def of(cls, pid: int) -> _Watched:
        found = proc_stat(pid)
        return cls(pid, _pidfd(pid), found[1] if found else None)

    def dead(self, timeout: float) -> bool:
        if self.pidfd is not None:
            readable, _, _ = select.select([self.pidfd], [], [], timeout)
            return bool(readable)
        end = time.monotonic() + timeout
        while True:
            found = proc_stat(self.pid)
            if found is None or found[0] in ("Z", "X", "x") or found[1] != self.starttime:
                return True
            if time.monotonic() >= end:
                return False
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))

    def signal(self, sig: int) -> None:
        """Signal this process, never another that reused its pid (through the pidfd if we have one)."""
        with contextlib.suppress(ProcessLookupError):
            if self.pidfd is not None and hasattr(signal, "pidfd_send_signal"):
                signal.pidfd_send_signal(self.pidfd, sig)
            elif not self.dead(0):
                os.kill(self.pid, sig)

    def close(self) -> None:
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # an old kernel or Python: fall back to /proc
        return None


def _max_fd() -> int:
    try:
        return min(os.sysconf("SC_OPEN_MAX"), 1 << 20)
    except (OSError, ValueError):
        return _FALLBACK_MAXFD


def _read_pid(fd: int) -> int | None:
    data = b""
    while chunk := os.read(fd, 64):
        data += chunk
    return int(data) if data.strip().isdigit() else None


def _isolate(*keep: int | None) -> list[int | None]:
    """In a fresh child: stdin from /dev/null, every descriptor above 2 closed but ``keep`` (-> 3, 4, ...).

    Each kept descriptor is first moved out of the way (an agent started with closed stdio may
    hold it at 0-2); returns their new numbers (None stays None).
    """
    moved = [None if fd is None else fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in keep]
    null = os.open(os.devnull, os.O_RDONLY)
    if null != 0:
        os.dup2(null, 0)
        os.close(null)
    kept: list[int | None] = []
    low = 3
    for fd in moved:
        if fd is None:
            kept.append(None)
            continue
        os.dup2(fd, low, inheritable=False)
        kept.append(low)
        low += 1
    os.closerange(low, _max_fd())
    return kept


def _read_pid_within(fd: int, timeout: float) -> int | None:
    """The pid written to the pipe ``fd`` before EOF; None at ``timeout`` or without one."""
    data = b""
    end = time.monotonic() + timeout
    while True:
        readable, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not readable:
            return None
        chunk = os.read(fd, 64)
        if not chunk:
            return int(data) if data.strip().isdigit() else None
        data += chunk


def spawn_watchdog(
    config: AgentConfig, origin: Origin, agent_pid: int, launch: Launch, *, boots_at_start: int
) -> int | None:
    """Double-fork the watchdog for ``agent_pid``; returns its pid (None if it could not start).

    The pidfd is opened here, before the fork, so the agent cannot die unnoticed in between. It
    returns once the watchdog has closed every descriptor it inherited: the caller may exec right
    after, and the new image finds the run and update locks free (a copy of their descriptors in a
    half-started watchdog would hold them).
    """
    spec = WatchdogSpec(config, origin, agent_pid, launch, boots_at_start)
    pidfd = _pidfd(agent_pid)
    found = proc_stat(agent_pid)
    starttime = found[1] if found else None
    _flush_output()
    read_end, write_end = os.pipe()
    try:
        child = os.fork()
    except OSError as exc:
        log.error("cannot fork the watchdog: %s", exc)
        for fd in (read_end, write_end, pidfd):
            if fd is not None:
                os.close(fd)
        return None
    if child == 0:  # the intermediate: new session, fork the watchdog, vanish
        code = 0
        try:
            os.close(read_end)
            os.setsid()
            if os.fork() == 0:  # the watchdog reports its own pid once it is isolated
                _watchdog_main(spec, pidfd, starttime, write_end)  # never returns
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        watchdog_pid = _read_pid_within(read_end, WATCHDOG_START_WAIT)
    finally:
        os.close(read_end)
        os.waitpid(child, 0)
        if pidfd is not None:
            os.close(pidfd)
    if watchdog_pid is None:
        log.error("the watchdog did not start; a new binary that cannot start will not be rolled back here")
    else:
        log.info("watchdog pid %d watches agent pid %d until %s", watchdog_pid, agent_pid, "commit")
    return watchdog_pid


def launch_detached(launch: Launch) -> tuple[int, _Watched]:
    """Start ``launch`` double-forked in its own session; the watcher is ready before it execs."""
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    _flush_output()
    child = os.fork()
    if child == 0:
        code = 0
        try:
            os.close(report_r)
            os.close(go_w)
            os.setsid()
            grandchild = os.fork()
            if grandchild == 0:
                code = 127
                os.close(report_w)
                os.read(go_r, 1)  # wait until the watchdog holds a pidfd for us
                os.close(go_r)
                with contextlib.suppress(OSError):
                    os.chdir(launch.cwd)
                os.closerange(3, _max_fd())
                _default_signals()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.execve(launch.target, [launch.target, *launch.args], dict(launch.env))
            os.write(report_w, str(grandchild).encode())
        except BaseException:
            code = code or 1
        finally:
            os._exit(code)
    os.close(report_w)
    os.close(go_r)
    try:
        pid = _read_pid(report_r)
    finally:
        os.close(report_r)
        os.waitpid(child, 0)
    if pid is None:
        os.close(go_w)
        raise RestartFailed(f"could not start {launch.target}")
    found = proc_stat(pid)
    watched = _Watched(pid, _pidfd(pid), found[1] if found else None)
    os.write(go_w, b"1")
    os.close(go_w)
    return pid, watched


def _watchdog_main(spec: WatchdogSpec, pidfd: int | None, starttime: int | None, report: int) -> NoReturn:
    """The watchdog process body: never returns into the caller's stack."""
    code = 0
    try:
        # Objects inherited from the agent (sockets, files) must never be collected here: their
        # finalizers would close descriptor numbers this process reuses.
        gc.freeze()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        pidfd, kept = _isolate(pidfd, report)
        assert kept is not None
        watchdog = Watchdog(spec, _Watched(spec.agent_pid, pidfd, starttime))
        watchdog.write_record()  # before the agent execs: the new version must see a watchdog runs
        with contextlib.suppress(OSError):  # EPIPE: the agent died (or gave up waiting): watch anyway
            os.write(kept, str(os.getpid()).encode())  # only now may the agent exec
        os.close(kept)
        code = watchdog.run()
    except BaseException:
        log.exception("watchdog failed")
        code = 1
    finally:
        _flush_output()
        os._exit(code)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Watchdog:
    """The supervision loop (module docstring: boot-counting protocol, hung releases)."""

    def __init__(self, spec: WatchdogSpec, agent: _Watched) -> None:
        self.spec = spec
        self.config = spec.config
        self.state_dir = spec.config.state_dir
        self.agent = agent
        self.boots_at_start = spec.boots_at_start
        self.adopted = False  # started by someone else: its deaths are not ours to count
        self.watched_since = _utcnow()

    def write_record(self) -> None:
        """``watchdog.pid``: this pid with its start time, so a reused pid is never taken for it."""
        found = proc_stat(os.getpid())
        write_json_atomic(
            self.state_dir / WATCHDOG_FILE,
            {"pid": os.getpid(), "agent_pid": self.agent.pid, "starttime": found[1] if found else None},
        )

    def run(self) -> int:
        try:
            return self._loop()
        finally:
            record = read_json(self.state_dir / WATCHDOG_FILE)
            if record is not None and record.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.state_dir / WATCHDOG_FILE)
            self.agent.close()

    def _pending(self) -> lifecycle.Pending | None:
        try:
            return lifecycle.read_pending(self.state_dir, set_aside_corrupt=False)
        except lifecycle.PendingCorrupt:
            return None  # the agent sets it aside and reports it; nothing for us to supervise

    def hung_after(self, pending: lifecycle.Pending) -> datetime:
        """When the watched agent counts as hung: it had the deadline (or, if it started later, from
        then) plus a check's worth of time (UPDATE_FETCH_TIMEOUT) and a margin to act by itself."""
        grace = timedelta(seconds=self.config.fetch_timeout + lifecycle.HANG_MARGIN)
        return max(pending.deadline_time, self.watched_since) + grace

    def _loop(self) -> int:
        while True:
            pending = self._pending()
            if pending is None:
                log.info("watchdog: no update pending any more (committed or rolled back); standing down")
                return 0
            hung = _utcnow() >= self.hung_after(pending)
            if self.agent.dead(0.0 if hung else WATCHDOG_POLL):
                if self._after_death():
                    return 0
            elif hung and self._end_hang():
                return 0

    def _after_death(self) -> bool:
        """The watched agent died: adopt, restart or roll back. True when the watchdog is done."""
        dead, adopted = self.agent.pid, self.adopted
        self.agent.close()
        if stopped_on_purpose(self.state_dir, dead):
            log.info("watchdog: agent pid %d was stopped on purpose; standing down", dead)
            return True
        other = running_agent(self.state_dir, Path(self.spec.launch.target))
        if other is not None and other["pid"] != dead:
            self._adopt(int(other["pid"]))
            return False
        with self._update_lock():
            pending = self._pending()
            if pending is None:
                log.info("watchdog: agent pid %d exited after the update finished; standing down", dead)
                return True
            reached_watch = pending.boots > self.boots_at_start  # it counted itself: it was watching
            if not reached_watch and not adopted:  # the start died before it could count itself
                pending = replace(pending, boots=pending.boots + 1)
                lifecycle.write_pending(self.state_dir, pending)
        log.warning(
            "watchdog: agent pid %d died before commit (boot %d of %d)",
            dead,
            pending.boots,
            self.config.max_boot_attempts,
        )
        died_in = lifecycle.State.WATCHING if reached_watch else lifecycle.State.RESTARTING
        if pending.boots >= self.config.max_boot_attempts:
            self._roll_back(pending, lifecycle.TOO_MANY_BOOTS, died_in)
            return True
        if _utcnow() > pending.deadline_time:  # a new start would only roll itself back
            self._roll_back(pending, lifecycle.COMMIT_DEADLINE_PASSED, died_in)
            return True
        self.boots_at_start, self.adopted, self.watched_since = pending.boots, False, _utcnow()
        started = self._launch()
        if started is None:
            return True
        pid, self.agent = started
        log.info("watchdog: started %s again as pid %d", self.spec.launch.target, pid)
        return False

    def _launch(self) -> tuple[int, _Watched] | None:
        """``launch_detached``, tried again while forks fail (a host out of processes or memory):
        a watchdog that died of it would leave no agent at all."""
        delay = 0.5
        for attempt in range(1, LAUNCH_ATTEMPTS + 1):
            try:
                return launch_detached(self.spec.launch)
            except (RestartFailed, OSError) as exc:
                log.error("watchdog: cannot start %s (attempt %d): %s", self.spec.launch.target, attempt, exc)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
        log.critical("watchdog: gave up starting %s; its next start resumes", self.spec.launch.target)
        return None

    def _adopt(self, pid: int) -> None:
        pending = self._pending()
        self.agent = _Watched.of(pid)
        self.boots_at_start = pending.boots if pending is not None else self.boots_at_start
        self.adopted, self.watched_since = True, _utcnow()
        log.info("watchdog: agent pid %d runs now (started by another supervisor); watching it", pid)

    @contextlib.contextmanager
    def _update_lock(self) -> Iterator[None]:
        """The update lock for a short step; without it if it stays busy (never block the watch)."""
        held = contextlib.ExitStack()
        try:
            held.enter_context(lifecycle.update_lock_waiting(self.state_dir, HANG_LOCK_WAIT))
        except LockBusy:
            log.warning("watchdog: the update lock stayed busy for %.0fs; going on", HANG_LOCK_WAIT)
        with held:
            yield

    def _end_hang(self) -> bool:
        """Past :meth:`hung_after`: kill the agent, roll back, start the old version. True if done.

        Under the update lock, so the agent cannot be half way through its own commit or rollback.
        """
        try:
            with lifecycle.update_lock_waiting(self.state_dir, HANG_LOCK_WAIT):
                pending = self._pending()
                if pending is None:
                    log.info("watchdog: the update finished as the deadline passed; standing down")
                    return True
                if self.agent.dead(0):
                    return False  # it died meanwhile: handled as a death
                reached_watch = pending.boots > self.boots_at_start
                log.warning(
                    "watchdog: agent pid %d did not act by its commit deadline (%s) plus %ds; "
                    "terminating it and rolling %s back",
                    self.agent.pid,
                    pending.deadline,
                    self.config.fetch_timeout + lifecycle.HANG_MARGIN,
                    pending.to_version,
                )
                self._terminate()
                died_in = lifecycle.State.WATCHING if reached_watch else lifecycle.State.RESTARTING
                sink = self._restore(pending, lifecycle.HUNG, died_in)
        except LockBusy:
            log.warning("watchdog: the update lock is busy; looking again")
            return False
        self._start_restored(sink)
        return True

    def _terminate(self) -> None:
        """SIGTERM, then SIGKILL after ``TERM_GRACE`` seconds (DESIGN section 4)."""
        pid = self.agent.pid
        self.agent.signal(signal.SIGTERM)
        if self.agent.dead(TERM_GRACE):
            log.info("watchdog: agent pid %d stopped on SIGTERM", pid)
            return
        log.warning("watchdog: agent pid %d still alive %.0f s after SIGTERM; SIGKILL", pid, TERM_GRACE)
        self.agent.signal(signal.SIGKILL)
        if not self.agent.dead(KILL_WAIT):
            log.error("watchdog: agent pid %d survived SIGKILL for %.0f s; rolling back", pid, KILL_WAIT)

    def _roll_back(self, pending: lifecycle.Pending, reason: str, died_in: lifecycle.State) -> None:
        with self._update_lock():
            sink = self._restore(pending, reason, died_in)
        self._start_restored(sink)

    def _restore(self, pending: lifecycle.Pending, reason: str, died_in: lifecycle.State) -> EventSink:
        sink = sink_for(self.config, self.spec.origin)  # this process's own queue handle
        try:
            lifecycle.rollback(self.config, sink, pending, reason, now=_utcnow(), from_state=died_in)
        except BaseException:
            _close_sink(sink)
            raise
        return sink

    def _start_restored(self, sink: EventSink) -> None:
        """Start the target (the old version again, unless the restore failed) and send the report."""
        try:
            started = self._launch()
            if started is not None:
                pid, watched = started
                watched.close()
                log.warning("watchdog: started the restored %s as pid %d", self.spec.launch.target, pid)
            sink.flush(timeout=WATCHDOG_FLUSH)  # the old version is running already: no one waits
        finally:
            _close_sink(sink)


def _close_sink(sink: EventSink) -> None:
    sink.close()
    if isinstance(sink, QueueSink) and sink.queue is not None:
        sink.queue.close()
