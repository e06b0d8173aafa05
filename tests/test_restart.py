"""Restart methods and the watchdog, with real processes (DESIGN section 4).

- ``systemd``: a recording ``systemctl`` stand-in first on PATH proves the calls (``reset-failed``,
  then ``restart UNIT``); one stand-in also behaves like systemd (SIGTERM the agent, start the
  target again) so the whole systemd path runs. The unit files pass ``systemd-analyze verify``;
  the agent unit is ``Type=notify`` with ``WatchdogSec=``.
- the notify protocol: a real ``avika-agent run`` under a ``$NOTIFY_SOCKET`` the test binds (an
  abstract ``@name`` and a path; ``SO_PASSCRED`` tells which process sent what) sends ``READY=1``,
  then ``WATCHDOG=1`` again and again with a small ``$WATCHDOG_USEC``; one whose loop hangs stops
  pinging; the update under the systemd stand-in is announced by both processes.
- ``signal``: the agent re-execs on SIGHUP (same PID); ``update`` by hand signals the running agent
  or leaves the new binary for the next start.
- the watchdog: restarts an agent killed before commit and counts each start exactly once, rolls
  back past the cap and starts the old version, stands down on commit and on SIGTERM, and holds
  no inherited descriptor (no flock, no socket) -- checked in /proc/<watchdog>/fd; the agents it
  starts are never its children, and the intermediate it forks for each is reaped at once (no
  zombie of the watchdog's ever stays) -- checked in /proc/*/stat.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent import restart, sdnotify
from agent.config import AgentConfig
from agent.events import Origin
from tests.agent_harness import Host, alive, dev_binary, keys_of, site, wait_for

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "packaging" / "systemd"

pytestmark = pytest.mark.slow


def recording_systemctl(
    directory: Path, record: Path, *, act: bool = False, host: Host | None = None
) -> Path:
    """A ``systemctl`` that appends its argv to ``record``; with ``act``, restarts like systemd."""
    directory.mkdir(parents=True, exist_ok=True)
    body = f'printf "%s\\n" "$*" >> {record}\n'
    if act:
        assert host is not None
        # systemd's restart: SIGTERM the unit's main process, wait for it, start ExecStart again.
        body += textwrap.dedent(
            f"""\
            case "$*" in *" restart "*|"restart "*)
              pid=$(sed -n 's/.*"pid": \\([0-9]*\\).*/\\1/p' {host.state_dir}/agent.pid)
              (
                kill -TERM "$pid"
                while [ -d /proc/$pid ] && [ "$(cut -d' ' -f3 /proc/$pid/stat)" != Z ]; do sleep 0.05; done
                exec setsid {host.target} run --config {host.config} >> {host.log_path} 2>&1 < /dev/null
              ) > /dev/null 2>&1 &
            ;; esac
            """
        )
    path = directory / "systemctl"
    path.write_text("#!/bin/sh\n" + body + "exit 0\n")
    path.chmod(0o755)
    return path


def path_with(directory: Path) -> str:
    return f"{directory}:{os.environ.get('PATH', '/usr/bin:/bin')}"


# ---------------------------------------------------------------- systemd


def test_systemd_restart_resets_failed_then_restarts_the_unit(tmp_path, monkeypatch):
    record = tmp_path / "calls"
    recording_systemctl(tmp_path / "bin", record)
    monkeypatch.setenv("PATH", path_with(tmp_path / "bin"))
    restart.systemd_restart("avika-agent")
    assert record.read_text().splitlines() == ["reset-failed avika-agent", "--no-block restart avika-agent"]


def test_systemd_restart_failure_is_a_named_error(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    failing = tmp_path / "bin" / "systemctl"
    failing.write_text("#!/bin/sh\necho 'Unit avika-agent.service not found.' >&2\nexit 5\n")
    failing.chmod(0o755)
    monkeypatch.setenv("PATH", path_with(tmp_path / "bin"))
    with pytest.raises(restart.RestartFailed) as caught:
        restart.systemd_restart("avika-agent")
    assert caught.value.code == "restart_failed" and "not found" in caught.value.message
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(restart.RestartFailed, match="not on PATH"):
        restart.systemd_restart("avika-agent")


# ---------------------------------------------------------------- the notify socket


@dataclass
class Notification:
    pid: int
    lines: list[str]
    at: float


@dataclass
class NotifySocket:
    """A datagram socket standing in for systemd's: records each message with its sender's pid."""

    name: str  # $NOTIFY_SOCKET: "@abstract" or a path
    sock: socket.socket
    got: list[Notification] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def bind(cls, path: Path | None = None) -> NotifySocket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if path is None:
            name = f"@avika-test-{uuid.uuid4().hex}"
            sock.bind("\0" + name[1:])
        else:
            name = str(path)
            sock.bind(name)
        sock.settimeout(0.1)
        found = cls(name, sock)
        threading.Thread(target=found._receive, daemon=True).start()
        return found

    def _receive(self) -> None:
        creds = struct.calcsize("3i")
        while not self.stop.is_set():
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = next(
                (
                    struct.unpack("3i", cdata[:creds])[0]
                    for level, kind, cdata in ancdata
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
                ),
                -1,
            )
            self.got.append(Notification(pid, data.decode().split("\n"), time.monotonic()))

    def close(self) -> None:
        self.stop.set()
        self.sock.close()

    def from_pid(self, pid: int) -> list[Notification]:
        return [n for n in self.got if n.pid == pid]

    @staticmethod
    def pings(notes: list[Notification]) -> list[Notification]:
        return [n for n in notes if "WATCHDOG=1" in n.lines]


def systemd_env(notify: NotifySocket, usec: int) -> dict[str, str]:
    """What systemd sets for a Type=notify unit with WatchdogSec= (no WATCHDOG_PID: exec keeps it)."""
    return {"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": str(usec), "INVOCATION_ID": uuid.uuid4().hex}


@pytest.mark.parametrize("where", ["abstract", "path"])
def test_a_real_agent_sends_ready_then_keeps_pinging_the_watchdog(tmp_path, where):
    notify = NotifySocket.bind(None if where == "abstract" else tmp_path / "notify.sock")
    try:
        with site() as s:
            host = Host(tmp_path / "h", s.url, {"UPDATE_INTERVAL": "1h"})  # the loop mostly waits
            host.install("1.0.0", keys_of(s.signer))
            s.release("1.0.0", host.target.read_bytes())
            proc = host.start(**systemd_env(notify, 300_000))  # ping at least every 0.15 s
            try:
                wait_for(lambda: len(NotifySocket.pings(notify.from_pid(proc.pid))) >= 12, 30, "pings")
                mine = notify.from_pid(proc.pid)
                assert mine[0].lines[0] == "READY=1", mine[0]
                assert "WATCHDOG_USEC=300000" in mine[0].lines  # the unit's own value, put back
                assert any(line.startswith("STATUS=avika-agent 1.0.0") for line in mine[0].lines)
                assert all(n.pid == proc.pid for n in notify.got)  # nothing from anyone else
                assert "watchdog pid" not in host.log_text()  # systemd is the watchdog here
                os.kill(proc.pid, signal.SIGTERM)
                assert proc.wait(timeout=15) == 0
                assert notify.from_pid(proc.pid)[-1].lines == ["STOPPING=1"]
            finally:
                host.kill_all()
    finally:
        notify.close()


def test_a_hung_loop_stops_pinging(tmp_path):
    """The pings come from the loop itself: once it hangs (inside a check, stretched to the fetch
    deadline + margin) none come any more, so systemd would kill and restart it."""
    notify = NotifySocket.bind()
    try:
        with site() as s:
            host = Host(tmp_path / "h", s.url, {"UPDATE_FETCH_TIMEOUT": "1s"})
            host.install("1.0.0", keys_of(s.signer), variant="hang_after_boot")
            proc = host.start(**systemd_env(notify, 200_000))
            try:
                stretched = wait_for(
                    lambda: next(
                        (n for n in notify.from_pid(proc.pid) if "WATCHDOG_USEC=16000000" in n.lines), None
                    ),
                    30,
                    "the check to stretch the watchdog to its own bound (1 s + 15 s)",
                )
                assert notify.from_pid(proc.pid)[0].lines[0] == "READY=1"
                time.sleep(2.0)  # 30 of the unit's ping intervals
                after = [n for n in notify.from_pid(proc.pid) if n.at > stretched.at]
                assert after == [], [n.lines for n in after]
                assert alive(proc.pid)
            finally:
                host.kill_all()
    finally:
        notify.close()


def test_notifier_sends_nothing_without_a_socket_or_for_another_pid(tmp_path):
    assert not sdnotify.Notifier({}).enabled
    assert sdnotify.Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).address is None
    notify = NotifySocket.bind()
    try:
        env = {"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
        other = sdnotify.Notifier(env)  # the watchdog is meant for pid 1, not for us
        assert other.enabled and other.ping_interval is None
        other.ping()
        other.send("STATUS=still reaches systemd")
        ours = sdnotify.Notifier({**env, "WATCHDOG_PID": str(os.getpid())})
        assert ours.ping_interval == pytest.approx(1 / 3)
        ours.ping()
        wait_for(lambda: len(notify.got) == 2, 5, "two notifications")
        assert [n.lines for n in notify.got] == [["STATUS=still reaches systemd"], ["WATCHDOG=1"]]
    finally:
        notify.close()


def test_a_long_step_stretches_the_watchdog_and_puts_it_back(tmp_path):
    notify = NotifySocket.bind()
    try:
        notifier = sdnotify.Notifier({"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "120000000"})
        # 60 s is shorter than the unit's: nothing to say; 1815 s stretches; 200 s inside it does not.
        with notifier.busy(60), notifier.busy(1815), notifier.busy(200):
            pass
        wait_for(lambda: len(notify.got) == 2, 5, "two notifications")
        assert [n.lines for n in notify.got] == [
            ["WATCHDOG_USEC=1815000000", "WATCHDOG=1"],
            ["WATCHDOG_USEC=120000000", "WATCHDOG=1"],
        ]
        unreachable = sdnotify.Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
        assert unreachable.send("READY=1") is False  # logged once, never raised
    finally:
        notify.close()


def test_systemd_method_end_to_end_with_a_systemd_stand_in(tmp_path):
    """The agent swaps, asks systemctl (reset-failed, restart); "systemd" stops it with SIGTERM and
    starts the target again, which counts its boot and commits. No watchdog under this method;
    both processes say READY=1 on the notify socket, the old one STOPPING=1."""
    notify = NotifySocket.bind()
    with site() as s:
        host = Host(tmp_path / "h", s.url)
        keys = keys_of(s.signer)
        host.install("1.0.0", keys)
        new = dev_binary(tmp_path / "rel" / "new", "1.1.0", keys)
        record = tmp_path / "calls"
        recording_systemctl(tmp_path / "sbin", record, act=True, host=host)
        host.env_extra.update(
            UPDATE_RESTART_METHOD="systemd",
            PATH=path_with(tmp_path / "sbin"),
            **systemd_env(notify, 2_000_000),
        )
        s.release("1.1.0", new)
        first = host.start()
        try:
            wait_for(lambda: host.converged(new), 30, "the systemd-restarted agent to commit")
            assert record.read_text().splitlines() == [
                "reset-failed avika-agent",
                "--no-block restart avika-agent",
            ]
            assert first.wait(timeout=10) == 0  # the old process stopped cleanly on SIGTERM
            assert host.agent_record()["pid"] != first.pid
            stopped = [line for line in host.log_lines() if line["msg"] == "agent stopped"]
            assert stopped[0]["pid"] == first.pid
            assert "watchdog pid" not in host.log_text()
            assert host.chain("1.1.0")[-2:] == ["watching", "committed"]
            second = host.agent_record()["pid"]
            old_notes, new_notes = notify.from_pid(first.pid), notify.from_pid(second)
            assert old_notes[0].lines[0] == "READY=1" and old_notes[-1].lines == ["STOPPING=1"]
            assert new_notes[0].lines[0] == "READY=1"
            assert any("watching the update from 1.0.0" in line for line in new_notes[0].lines)
        finally:
            host.kill_all()
            notify.close()


def unit_text(name: str) -> str:
    return (UNITS / name).read_text()


def test_unit_pair_declares_start_limits_the_watchdog_and_the_rollback_unit():
    agent = unit_text("avika-agent.service")
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=2min",
        "MemoryMax=64M",
        "Restart=on-failure",
        "OnFailure=avika-agent-rollback.service",
        "Environment=UPDATE_RESTART_METHOD=systemd",
        "CacheDirectory=avika-agent",
    ):
        assert re.search(rf"^{re.escape(line)}$", agent, re.M), line
    assert re.search(r"^StartLimitIntervalSec=\d+", agent, re.M) and re.search(
        r"^StartLimitBurst=\d+", agent, re.M
    )
    rollback = unit_text("avika-agent-rollback.service")
    assert re.search(r"^Type=oneshot$", rollback, re.M)
    assert re.search(r"^ExecStart=/usr/local/bin/avika-agent\.backup rollback\b", rollback, re.M)
    assert re.search(r"^ConditionPathExists=/usr/local/bin/avika-agent\.backup$", rollback, re.M)
    assert re.search(r"^ConditionPathExists=/var/lib/avika-agent/pending\.json$", rollback, re.M)


def verify_units(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(p) for p in sorted(directory.glob("*.service")))],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unit_files_pass_systemd_analyze_verify(tmp_path):
    """The shipped units, with ExecStart pointed at a real executable (the binaries are not
    installed here); a deliberately broken copy must be flagged, so the check is not vacuous."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    stand_in = tmp_path / "avika-agent"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    good = tmp_path / "units"
    good.mkdir()
    for unit in UNITS.glob("*.service"):
        text = unit.read_text().replace("/usr/local/bin/avika-agent.backup ", f"{stand_in} ")
        (good / unit.name).write_text(text.replace("/usr/local/bin/avika-agent ", f"{stand_in} "))
    done = verify_units(good)
    assert done.returncode == 0 and done.stdout.strip() == "" and done.stderr.strip() == "", done

    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    text = (broken / "avika-agent.service").read_text().replace("Restart=on-failure", "Restart=sometimes")
    (broken / "avika-agent.service").write_text(text)
    assert "restart specifier" in verify_units(broken).stderr


# ---------------------------------------------------------------- signal


def test_signal_method_re_execs_the_same_process(tmp_path):
    with site() as s:
        host = Host(tmp_path / "h", s.url, {"UPDATE_RESTART_METHOD": "signal"})
        keys = keys_of(s.signer)
        host.install("1.0.0", keys)
        new = dev_binary(tmp_path / "rel" / "new", "1.1.0", keys)
        s.release("1.1.0", new)
        proc = host.start()
        try:
            wait_for(lambda: host.converged(new), 30, "commit after SIGHUP re-exec")
            assert host.agent_record()["pid"] == proc.pid
            assert "SIGHUP: re-exec" in host.log_text()
        finally:
            host.kill_all()


def test_update_by_hand_signals_the_running_agent(tmp_path):
    with site() as s:
        host = Host(tmp_path / "h", s.url, {"UPDATE_INTERVAL": "1h"})  # the timer stays out of the way
        keys = keys_of(s.signer)
        host.install("1.0.0", keys)
        new = dev_binary(tmp_path / "rel" / "new", "1.1.0", keys)
        proc = host.start()
        try:
            wait_for(lambda: host.running_version() == "1.0.0", 15, "the old agent to run")
            s.release("1.1.0", new)
            done = host.cli("update")
            assert done.returncode == 0, done
            assert '"restart": "signalled"' in done.stdout
            wait_for(lambda: host.converged(new), 30, "the signalled agent to commit")
            assert host.agent_record()["pid"] == proc.pid
        finally:
            host.kill_all()


def test_update_by_hand_without_a_running_agent_leaves_the_binary_for_the_next_start(tmp_path):
    with site() as s:
        host = Host(tmp_path / "h", s.url)
        keys = keys_of(s.signer)
        host.install("1.0.0", keys)
        new = dev_binary(tmp_path / "rel" / "new", "1.1.0", keys)
        s.release("1.1.0", new)
        done = host.cli("update")
        assert done.returncode == 0 and '"restart": "deferred"' in done.stdout, done
        assert host.target.read_bytes() == new and host.pending()["boots"] == 0
        host.start()
        try:
            wait_for(lambda: host.converged(new), 30, "the next start to commit")
            assert host.chain("1.1.0")[-2:] == ["watching", "committed"]
        finally:
            host.kill_all()


# ---------------------------------------------------------------- the watchdog


def watched_update(tmp_path: Path, s, *, variant: str = "ok", **env: str) -> tuple[Host, bytes, bytes]:
    host = Host(tmp_path / "h", s.url, env)
    keys = keys_of(s.signer)
    old = host.install("1.0.0", keys)
    new = dev_binary(tmp_path / "rel" / "new", "1.1.0", keys, variant)
    s.release("1.1.0", new)
    return host, old, new


def test_watchdog_restarts_an_agent_killed_before_commit_and_counts_each_start_once(tmp_path):
    with site() as s:
        host, _, new = watched_update(tmp_path, s, UPDATE_HEALTH_WINDOW="30s", UPDATE_MAX_BOOT_ATTEMPTS="5")
        proc = host.start()
        try:
            wait_for(lambda: (host.pending() or {}).get("boots") == 1, 30, "the new version's first boot")
            watchdog = wait_for(host.watchdog_pid, 10, "the watchdog")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
            # The killed start had counted itself (boots 1); the restart counts itself: 2, not 3.
            record = wait_for(
                lambda: host.agent_record() if (host.pending() or {}).get("boots") == 2 else None,
                30,
                "a restarted agent",
            )
            assert record["pid"] != proc.pid and record["version"] == "1.1.0"
            assert host.watchdog_pid() == watchdog and host.target.read_bytes() == new
            assert f"agent pid {proc.pid} died before commit (boot 1 of 5)" in host.log_text()
        finally:
            host.kill_all()


def test_watchdog_counts_starts_that_die_before_our_code_and_rolls_back_past_the_cap(tmp_path):
    with site() as s:
        host, old, _ = watched_update(tmp_path, s, variant="segfault")
        host.start()
        try:
            # The restored agent's first check may already have replaced last_result ("none": the
            # release is bad), so the rollback is read from what lasts: bad_versions and the chain.
            wait_for(lambda: host.running_version() == "1.0.0" and host.pending() is None and
                     host.state().get("bad_versions"), 30, "the rollback")  # fmt: skip
            assert host.target.read_bytes() == old
            assert host.chain("1.1.0")[-1] == "rolled_back"
            text = host.log_text()
            for boot in (1, 2, 3):
                assert f"died before commit (boot {boot} of 3)" in text
            assert "boot 4 of 3" not in text
            bad = host.state()["bad_versions"]
            assert [(b["version"], b["reason"]) for b in bad] == [("1.1.0", "too_many_boots")]
            wait_for(lambda: host.watchdog_pid() is None, 10, "the watchdog to exit")
        finally:
            host.kill_all()


def test_watchdog_stands_down_when_the_update_commits(tmp_path):
    with site() as s:
        host, _, new = watched_update(tmp_path, s)
        host.start()
        try:
            watchdog = wait_for(host.watchdog_pid, 20, "the watchdog")
            wait_for(lambda: host.converged(new), 30, "the commit")
            wait_for(lambda: not alive(watchdog), 5, "the watchdog to stand down")
            assert not (host.state_dir / "watchdog.pid").exists()
            assert "no update pending any more" in host.log_text()
        finally:
            host.kill_all()


def test_watchdog_stands_down_when_the_agent_is_stopped_on_purpose(tmp_path):
    with site() as s:
        host, _, _ = watched_update(tmp_path, s, UPDATE_HEALTH_WINDOW="30s")
        proc = host.start()
        try:
            wait_for(lambda: (host.pending() or {}).get("boots") == 1, 30, "the new version's first boot")
            watchdog = wait_for(host.watchdog_pid, 10, "the watchdog")
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
            wait_for(lambda: not alive(watchdog), 5, "the watchdog to stand down")
            assert host.processes() == []  # nothing restarted the agent
            assert host.pending()["boots"] == 1  # the clean stop is not a counted crash
            assert "stopped on purpose" in host.log_text()
            assert not (host.state_dir / "agent.pid").exists()
        finally:
            host.kill_all()


def test_watchdog_holds_no_inherited_descriptor(tmp_path):
    with site() as s:
        host, _, _ = watched_update(tmp_path, s, UPDATE_HEALTH_WINDOW="30s")
        host.start()
        try:
            watchdog = wait_for(host.watchdog_pid, 30, "the watchdog")
            fds = {int(fd.name): os.readlink(fd) for fd in Path(f"/proc/{watchdog}/fd").iterdir()}
            extra = {fd: what for fd, what in fds.items() if fd > 2}
            assert list(extra.values()) in (["anon_inode:[pidfd]"], []), fds  # [] on a kernel without pidfd
            locks = Path("/proc/locks").read_text()
            assert not re.search(rf"\bFLOCK\s+\S+\s+\S+\s+{watchdog}\b", locks)
            # the update lock is free while the watchdog lives
            fd = os.open(host.state_dir / "update.lock", os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
            agent = host.agent_record()["pid"]
            assert os.getsid(watchdog) not in (os.getsid(agent), watchdog)  # own session, not its leader
            assert int(restart_ppid(watchdog)) != agent  # never the agent's child
        finally:
            host.kill_all()


def test_the_watchdog_holds_no_inherited_lock_once_spawn_returns(tmp_path):
    """The caller execs right after ``spawn_watchdog``: by then the watchdog must have let go of
    every descriptor it inherited. It used to report its pid before closing them, so the exec'd
    new version could find its own run lock held by the half-started watchdog, exit with
    ``already_running`` and lose a boot."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    config = AgentConfig(state_dir=state_dir, target=tmp_path / "avika-agent")
    agent = subprocess.Popen(["sleep", "60"])
    held = os.open(tmp_path / "agent.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        for _ in range(10):
            launch = restart.Launch(str(config.target), ("run",))
            watchdog = restart.spawn_watchdog(
                config, Origin("h", "1.0.0", "vm", None), agent.pid, launch, boots_at_start=0
            )
            assert watchdog is not None
            try:
                fds = {os.readlink(fd) for fd in Path(f"/proc/{watchdog}/fd").glob("*") if int(fd.name) > 2}
            except FileNotFoundError:
                fds = set()  # it saw no update pending and is gone already: holding nothing either
            assert not any("agent.lock" in fd for fd in fds), fds
            wait_for(lambda watchdog=watchdog: not alive(watchdog), 10, "the watchdog to stand down")
    finally:
        os.close(held)
        agent.kill()
        agent.wait()


def test_a_watchdog_whose_agent_stopped_listening_still_supervises(tmp_path):
    """The soak killed an agent right after it forked its watchdog: the watchdog's report of its
    pid hit a closed pipe (EPIPE) and it died, leaving the update unsupervised. It must go on."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    config = AgentConfig(state_dir=state_dir, target=tmp_path / "avika-agent")
    agent = subprocess.Popen(["sleep", "60"])
    spec = restart.WatchdogSpec(
        config, Origin("h", "1.0.0", "vm", None), agent.pid, restart.Launch(str(config.target), ("run",)), 0
    )
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody listens any more
    child = os.fork()
    if child == 0:
        restart._watchdog_main(spec, None, None, write_end)  # never returns
    os.close(write_end)
    try:
        _, status = os.waitpid(child, 0)
        # It got past the report and ran its loop: no update pending, so it stood down cleanly.
        assert os.waitstatus_to_exitcode(status) == 0
        assert not (state_dir / "watchdog.pid").exists()
    finally:
        agent.kill()
        agent.wait()


def children_of(pid: int) -> dict[int, str]:
    """Every process whose parent is ``pid``, with its state letter (``Z`` = zombie)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        rest = text[text.rindex(")") + 2 :].split()
        if int(rest[1]) == pid:
            found[int(entry.name)] = rest[0]
    return found


def lingering_zombies(pid: int, seconds: float, grace: float = 0.5) -> set[int]:
    """Zombie children of ``pid`` still unreaped ``grace`` seconds after they were first seen."""
    first_seen: dict[int, float] = {}
    stayed: set[int] = set()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        now = time.monotonic()
        for child, state in children_of(pid).items():
            if state == "Z" and now - first_seen.setdefault(child, now) > grace:
                stayed.add(child)
        time.sleep(0.02)
    return stayed


def restarted_agent(host: Host, first: int) -> tuple[int, int] | None:
    """(pid, parent pid) of a live agent other than ``first``, read while it lives."""
    record = host.agent_record()
    if record is None or record["pid"] == first:
        return None
    try:
        return record["pid"], int(restart_ppid(record["pid"]))
    except OSError:  # it died between the two reads (this variant dies 0.5 s after each boot)
        return None


def test_the_watchdog_reaps_what_it_forks_and_the_agents_it_starts_are_not_its_children(tmp_path):
    with site() as s:
        host, _, _ = watched_update(
            tmp_path, s, variant="die_after_boot", UPDATE_HEALTH_WINDOW="30s", UPDATE_MAX_BOOT_ATTEMPTS="8"
        )
        first = host.start()
        try:
            watchdog = wait_for(host.watchdog_pid, 30, "the watchdog")
            # The new version dies 0.5 s after each boot: the watchdog restarts it again and again.
            wait_for(lambda: (host.pending() or {}).get("boots", 0) >= 3, 30, "two restarts by the watchdog")
            assert lingering_zombies(watchdog, seconds=2.5) == set()
            assert (host.pending() or {}).get("boots", 0) >= 4  # it kept restarting while we watched
            pid, parent = wait_for(lambda: restarted_agent(host, first.pid), 10, "a restarted agent")
            assert parent != watchdog, f"agent pid {pid} is the watchdog's child"
        finally:
            host.kill_all()


def restart_ppid(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()[1]


def test_a_zombie_is_dead(tmp_path):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        wait_for(lambda: restart.proc_stat(pid) and restart.proc_stat(pid)[0] == "Z", 5, "the zombie")
        assert not restart.pid_alive(pid)
        assert restart.pid_alive(os.getpid())
    finally:
        os.waitpid(pid, 0)
    assert not restart.pid_alive(pid)
