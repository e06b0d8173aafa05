"""The VM self-update end to end: real agent processes, loopback HTTP (DESIGN sections 3, 4, 7).

Every test starts real ``avika-agent run`` processes (development builds from
``tests/agent_harness.py``; the first test uses real ``make agent-binary`` builds published by
``avika-publish release`` and served by ``avika-publish serve``) and asserts what a host would
see: the bytes of the target, the state dir, the reported event chain (the JSON log), the
requests the server received, the processes that run.

What must hold (DESIGN section 4):
- the happy path downloads, verifies, swaps and execs into the new version in the same PID,
  then commits;
- a version that crashes on start is rolled back within UPDATE_MAX_BOOT_ATTEMPTS and never tried
  again with the same bytes, re-signs or not;
- a smoke-test failure, a download fault or a filesystem fault never swaps, leaves no stray file,
  and backs off before the next attempt;
- a kill -9 at any moment leaves the old or the new binary, whole, and the next start converges;
- one update at a time; container and signal-only agents never touch the target;
- the signing key rotates through releases with no change on the host.

Filesystem faults: "too little free space" is real everywhere (the manifest declares a size
beyond the free space of the target's real filesystem, and on a mounted 20 MiB tmpfs a real
5 MiB binary does not fit with the margin); "read-only directory" is a real tmpfs remounted
read-only (root ignores chmod), skipped where mounting is not allowed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import install, lifecycle
from agent.manifest import format_time
from tests.agent_harness import (
    COMMITTED_CHAIN,
    PLATFORM,
    Host,
    alive,
    dev_binary,
    keys_of,
    new_signer,
    run_concurrently,
    sha256,
    site,
    tmpfs,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def setup(
    tmp_path: Path, s, *, variant: str = "ok", name: str = "h", **env: str
) -> tuple[Host, bytes, bytes]:
    """A host running nothing yet with 1.0.0 installed, and a 1.1.0 build (not yet released)."""
    keys = keys_of(s.signer)
    host = Host(tmp_path / name, s.url, env)
    old = host.install("1.0.0", keys)
    new = dev_binary(tmp_path / f"{name}-release" / "avika-agent", "1.1.0", keys, variant)
    return host, old, new


def events_with(host: Host, state: str) -> list[dict[str, Any]]:
    return [e for e in host.events() if e["state"] == state]


def event_times(host: Host, state: str) -> list[datetime]:
    return [
        datetime.fromisoformat(line["time"])
        for line in host.log_lines()
        if isinstance(line.get("event"), dict) and line["event"]["state"] == state
    ]


# ---------------------------------------------------------------- the happy path


def run_tool(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done
    return done


def test_happy_path_with_real_agent_binaries_and_avika_publish_serve(tmp_path):
    """make agent-binary (two versions) -> avika-publish release -> avika-publish serve -> the old
    binary, running, downloads, verifies, swaps and execs into the new one (same PID), commits."""
    bin_dir = Path(sys.executable).parent
    key = tmp_path / "signing.pem"
    out = run_tool(str(bin_dir / "avika-publish"), "keygen", "--out", str(key), cwd=tmp_path).stdout
    public = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("public key"))
    store = tmp_path / "store"
    host = Host(tmp_path / "host", "")
    release = tmp_path / "dist" / f"avika-agent-{PLATFORM}"
    for version, path in (("1.0.0", host.target), ("1.1.0", release)):
        path.parent.mkdir(parents=True, exist_ok=True)
        # -o: never let this test reinstall the venv (no network), whatever pyproject's mtime says
        make = ["make", "-s", "-o", ".venv/.installed-stamp", "agent-binary"]
        run_tool(*make, f"VERSION={version}", f"OUT={path}", f"PUBLIC_KEYS={public}", cwd=ROOT)
    run_tool(
        str(bin_dir / "avika-publish"),
        "release",
        "1.1.0",
        "--init",
        "--binary",
        f"{PLATFORM}={release}",
        "--key",
        str(key),
        "--store",
        str(store),
        cwd=tmp_path,
    )
    serve = subprocess.Popen(
        [str(bin_dir / "avika-publish"), "serve", "--root", str(store), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline()
        host.update_server = line[line.index("http://") :].split()[0]
        proc = host.start()
        new = release.read_bytes()
        wait_for(lambda: host.converged(new, "1.1.0"), 60, "the real binary to update and commit")
        assert host.agent_record()["pid"] == proc.pid  # exec: the same process
        assert host.chain("1.1.0") == COMMITTED_CHAIN
        status = host.status()
        assert status["version"] == "1.1.0" and status["running"] == {"pid": proc.pid, "version": "1.1.0"}
        assert status["pending"] is None and status["highest_serial"] == 1
        assert host.backup.read_bytes() != new and host.stray_files() == []
    finally:
        host.kill_all()
        serve.terminate()
        serve.wait(timeout=10)


def test_happy_path_status_while_running(tmp_path):
    with site() as s:
        host, old, new = setup(tmp_path, s)
        s.release("1.1.0", new)
        proc = host.start()
        try:
            wait_for(lambda: host.converged(new, "1.1.0"), 30, "the commit")
            status = host.status()
            assert {
                k: status[k] for k in ("version", "running", "target", "mode", "pending", "bad_versions")
            } == {
                "version": "1.1.0",
                "running": {"pid": proc.pid, "version": "1.1.0"},
                "target": str(host.target),
                "mode": "vm",
                "pending": None,
                "bad_versions": [],
            }
            assert status["highest_serial"] == 1 and status["last_error"] is None
            assert datetime.fromisoformat(status["last_check"].replace("Z", "+00:00")) > datetime.now(
                UTC
            ) - timedelta(minutes=1)
            text = host.cli("status").stdout
            assert "version:        1.1.0" in text and f"pid {proc.pid} (1.1.0)" in text
            assert host.backup.read_bytes() == old and host.stray_files() == []
            assert s.downloads("1.1.0", new) == 1
        finally:
            host.kill_all()


# ---------------------------------------------------------------- bad releases


def test_a_version_that_crashes_on_start_is_rolled_back_and_never_retried(tmp_path):
    with site() as s:
        host, old, bad = setup(tmp_path, s, variant="crash")
        s.release("1.1.0", bad)
        host.start()
        try:
            wait_for(
                lambda: host.running_version() == "1.0.0" and "rolled_back" in host.chain("1.1.0"),
                30,
                "the rollback to 1.0.0",
            )
            assert host.target.read_bytes() == old and host.pending() is None
            rolled = events_with(host, "rolled_back")[-1]
            assert rolled["error"].startswith("too_many_boots") and rolled["target_version"] == "1.1.0"
            text = host.log_text()
            assert "boot 3 of 3" in text and "boot 4 of 3" not in text
            assert host.state()["bad_versions"][0] | {"time": None} == {
                "version": "1.1.0",
                "sha256": sha256(bad),
                "reason": "too_many_boots",
                "time": None,
            }
            # Routine re-signs (new serial, same binary) do not clear it.
            for _ in range(2):
                serial = s.resign().serial
                wait_for(
                    lambda serial=serial: host.state().get("highest_serial") == serial, 15, "the re-sign"
                )
            wait_for(lambda: host.state().get("last_check") is not None, 5, "a check")
            assert s.downloads("1.1.0", bad) == 1
            assert host.target.read_bytes() == old and events_with(host, "downloading").__len__() == 1
            # The same version with other bytes (a fixed build) is installed.
            fixed = dev_binary(tmp_path / "fixed" / "avika-agent", "1.1.0", keys_of(s.signer))
            s.release("1.1.0", fixed)
            wait_for(lambda: host.converged(fixed, "1.1.0"), 30, "the fixed 1.1.0 to commit")
        finally:
            host.kill_all()


# Small durations: commit deadline 3 s after the swap; the hang is called at the deadline plus
# UPDATE_FETCH_TIMEOUT plus the watchdog's margin (a live loop may be in a check that long).
HANG_ENV = {"UPDATE_COMMIT_DEADLINE": "3s", "UPDATE_FETCH_TIMEOUT": "1s"}


def test_a_version_that_hangs_after_its_boot_is_killed_rolled_back_and_never_retried(tmp_path):
    """Outside systemd: the new version starts, counts its boot, reports watching, then its loop
    hangs (alive, never commits, deaf to SIGTERM). The watchdog kills it (TERM, KILL after 10 s),
    restores the old binary byte for byte, starts it and reports ``rolled_back`` with ``hung``."""
    with site() as s:
        host, old, bad = setup(tmp_path, s, variant="hang_after_boot", **HANG_ENV)
        s.release("1.1.0", bad)
        host.start()
        try:
            record = wait_for(
                lambda: (
                    host.agent_record()
                    if host.running_version() == "1.1.0" and "watching" in host.chain("1.1.0")
                    else None
                ),
                30,
                "the new version to boot and watch",
            )
            hung = record["pid"]
            assert host.pending()["boots"] == 1 and host.watchdog_pid() is not None
            wait_for(
                lambda: host.running_version() == "1.0.0" and "rolled_back" in host.chain("1.1.0"),
                90,
                "the watchdog to roll the hung version back",
            )
            assert not alive(hung) and host.target.read_bytes() == old and host.pending() is None
            rolled = events_with(host, "rolled_back")[-1]
            assert rolled["error"].startswith("hung") and rolled["target_version"] == "1.1.0"
            assert rolled["failed_state"] == "watching"
            assert [(b["version"], b["sha256"], b["reason"]) for b in host.state()["bad_versions"]] == [
                ("1.1.0", sha256(bad), "hung")
            ]
            text = host.log_text()
            assert f"agent pid {hung} did not act by its commit deadline" in text
            assert "still alive 10 s after SIGTERM; SIGKILL" in text
            status = host.status()  # (last_error is the next check's: it passed)
            assert status["running"]["version"] == "1.0.0" and status["pending"] is None
            assert [b["reason"] for b in status["bad_versions"]] == ["hung"]
            wait_for(lambda: host.watchdog_pid() is None, 10, "the watchdog to exit")
            # Remembered for good: a re-sign does not bring it back.
            serial = s.resign().serial
            wait_for(lambda: host.state().get("highest_serial") == serial, 15, "a check of the re-sign")
            assert s.downloads("1.1.0", bad) == 1 and host.target.read_bytes() == old
        finally:
            host.kill_all()


def test_a_live_loop_that_cannot_commit_rolls_itself_back_and_is_retried_after_the_backoff(tmp_path):
    """The other side of the rule: reports are refused (503), so the new version, alive and
    checking, cannot commit. Its own loop rolls back at the deadline (``commit_deadline_passed``,
    not ``hung``: the watchdog leaves it alone); once reports get through, the retry commits."""
    with site() as s:
        reports = s.server.serve("/v1/reports", b"busy\n", status=503)
        host, old, new = setup(
            tmp_path,
            s,
            UPDATE_REPORT_URL=s.server.url("/v1/reports"),
            UPDATE_REPORT_TOKEN="0" * 64,
            **HANG_ENV,
        )
        s.release("1.1.0", new)
        host.start()
        try:
            rolled = wait_for(lambda: events_with(host, "rolled_back"), 60, "the rollback at the deadline")[0]
            assert rolled["error"].startswith("commit_deadline_passed")
            assert rolled["failed_state"] == "watching"
            assert "did not act by its commit deadline" not in host.log_text()
            line = next(x for x in host.log_lines() if x.get("event", {}).get("state") == "rolled_back")
            agent_pid = line["pid"]  # the agent itself rolled back: it keeps its pid (exec), no kill
            wait_for(lambda: host.running_version() == "1.0.0", 15, "the old version to run again")
            assert host.agent_record()["pid"] == agent_pid and host.target.read_bytes() == old
            assert host.state()["bad_versions"][0]["reason"] == "commit_deadline_passed"
            reports.status = 202
            wait_for(lambda: host.converged(new, "1.1.0"), 60, "the retry after the back-off to commit")
            rolled_at, retried_at = event_times(host, "rolled_back")[0], event_times(host, "downloading")[1]
            assert (retried_at - rolled_at).total_seconds() >= 2.0  # backed off: interval 1 s * 2**1
            assert host.state()["bad_versions"] == [] and s.downloads("1.1.0", new) == 2
        finally:
            host.kill_all()


def test_a_binary_that_fails_the_smoke_test_is_never_swapped(tmp_path):
    with site() as s:
        host, old, bad = setup(tmp_path, s, variant="smoke_fail")
        before = os.stat(host.target)
        s.release("1.1.0", bad)
        host.start()
        try:
            wait_for(lambda: len(events_with(host, "failed")) >= 2, 30, "two failed attempts")
            failed = events_with(host, "failed")[0]
            assert failed["failed_state"] == "verifying" and failed["error"].startswith("smoke_test_failed")
            assert host.target.read_bytes() == old and os.stat(host.target).st_mtime_ns == before.st_mtime_ns
            assert not host.backup.exists() and host.stray_files() == [] and host.pending() is None
            assert host.running_version() == "1.0.0"
            failed_at, retried_at = event_times(host, "failed")[0], event_times(host, "downloading")[1]
            assert (retried_at - failed_at).total_seconds() >= 2.0  # interval 1 s * 2**1
            entry = host.state()["attempts"][f"1.1.0/{sha256(bad)}"]
            assert entry["failures"] >= 2 and entry["last_error"] == "smoke_test_failed"
        finally:
            host.kill_all()


# ---------------------------------------------------------------- download faults


def _download_fault(base: Path, fault: str) -> dict[str, Any]:
    """One fault on the first attempts; then the server is mended and the retry must succeed."""
    with site() as s:
        host, old, new = setup(base, s, name=fault)
        before = os.stat(host.target)
        if fault == "corrupt_body":
            s.release("1.1.0", new)
            s.route("1.1.0", new).body = new[:-2] + b"!\n"  # same length, other bytes
        elif fault == "more_bytes_than_manifest":
            s.release("1.1.0", new, size=len(new) - 10)
        elif fault == "fewer_bytes_than_manifest":
            s.release("1.1.0", new, size=len(new) + 10)
        elif fault == "dropped_every_time":
            s.release("1.1.0", new, route={"drop_plan": [0] * 20})
        elif fault == "server_error":
            s.release("1.1.0", new, route={"status": 500, "body": b"oops"})
        host.start()
        try:
            wait_for(lambda: events_with(host, "failed"), 60, f"the {fault} failure")
            seen = {
                "failed": events_with(host, "failed")[0],
                "old_intact": host.target.read_bytes() == old
                and os.stat(host.target).st_mtime_ns == before.st_mtime_ns,
                "stray": host.stray_files(),
                "pending": host.pending(),
                "attempt": host.state()["attempts"].get(f"1.1.0/{sha256(new)}"),
            }
            # Mend the server (or the manifest); the agent retries after its back-off.
            if fault in ("more_bytes_than_manifest", "fewer_bytes_than_manifest"):
                s.release("1.1.0", new)
            else:
                s.route("1.1.0", new).__dict__.update(body=new, status=200, drop_plan=[])
            wait_for(lambda: host.converged(new, "1.1.0"), 60, f"the retry after {fault}")
            first, second = event_times(host, "downloading")[:2]
            seen["retry_gap"] = (second - first).total_seconds()
            seen["first_failure_at"] = event_times(host, "failed")[0]
            seen["second_download_at"] = second
            return seen
        finally:
            host.kill_all()


DOWNLOAD_FAULTS = {
    "corrupt_body": ("verifying", "checksum_mismatch"),
    "more_bytes_than_manifest": ("downloading", "size_exceeded"),
    "fewer_bytes_than_manifest": ("downloading", "size_mismatch"),
    "dropped_every_time": ("downloading", "fetch_failed"),
    "server_error": ("downloading", "fetch_failed"),
}


@pytest.fixture(scope="module")
def download_faults(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("faults")
    return run_concurrently({f: (lambda f=f: _download_fault(base, f)) for f in DOWNLOAD_FAULTS}, workers=5)


@pytest.mark.parametrize("fault", list(DOWNLOAD_FAULTS))
def test_a_download_fault_swaps_nothing_and_backs_off(download_faults, fault):
    seen = download_faults[fault]
    if isinstance(seen, BaseException):
        raise seen
    failed_state, code = DOWNLOAD_FAULTS[fault]
    assert seen["failed"]["failed_state"] == failed_state
    assert seen["failed"]["error"].startswith(code), seen["failed"]
    assert seen["old_intact"] and seen["stray"] == [] and seen["pending"] is None
    assert seen["attempt"]["failures"] == 1 and seen["attempt"]["last_error"] == code
    next_attempt = datetime.fromisoformat(seen["attempt"]["next_attempt"].replace("Z", "+00:00"))
    last_failure = datetime.fromisoformat(seen["attempt"]["last_failure"].replace("Z", "+00:00"))
    assert next_attempt - last_failure in (
        timedelta(seconds=2),
        timedelta(seconds=3),
    )  # 1 s * 2**1, rounded up
    assert (seen["second_download_at"] - seen["first_failure_at"]).total_seconds() >= 2.0  # it waited


def test_a_dropped_connection_resumes_with_range(tmp_path):
    with site() as s:
        host, _, new = setup(tmp_path, s)
        new += b"#" + b"x" * (2 << 20) + b"\n"  # big enough that whole chunks arrive before the drop
        s.release("1.1.0", new, route={"drop_plan": [(1 << 20) + 1234]})
        host.start()
        try:
            wait_for(lambda: host.converged(new, "1.1.0"), 30, "the resumed download to commit")
            path = s.binary_path("1.1.0", new)
            ranges = [r.headers.get("range") for r in s.server.requests if r.path == path]
            assert len(ranges) == 2 and ranges[0] is None, ranges
            resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
            assert 0 < resumed_at <= (1 << 20) + 1234  # from what arrived, not from byte 0
            assert "failed" not in host.chain()
        finally:
            host.kill_all()


# ---------------------------------------------------------------- filesystem faults


def assert_refused_cleanly(host: Host, s, new: bytes, code: str, old: bytes) -> None:
    """Start the agent on ``old``: the update to ``new`` fails with ``code`` before any byte is fetched."""
    before = os.stat(host.target)
    host.start()
    try:
        failed = wait_for(lambda: events_with(host, "failed"), 30, f"the {code} failure")[0]
        assert failed["error"].startswith(code) and failed["failed_state"] == "downloading"
        assert s.downloads("1.1.0", new) == 0  # refused before any byte was fetched
        assert os.stat(host.target).st_mtime_ns == before.st_mtime_ns and host.stray_files() == []
        assert host.pending() is None and host.state()["last_error"]["code"] == code
        assert host.target.read_bytes() == old
    finally:
        host.kill_all()


def test_a_size_beyond_the_free_space_is_refused_before_downloading(tmp_path):
    with site() as s:
        host, old, new = setup(tmp_path, s)
        free = install.free_bytes(host.target.parent)
        s.release("1.1.0", new, size=free + (1 << 30))
        assert_refused_cleanly(host, s, new, "insufficient_space", old)


def test_a_binary_too_big_for_a_real_small_filesystem_is_refused(tmp_path):
    with site() as s:
        host, old, _ = setup(tmp_path, s)
        with tmpfs(host.target.parent, "20m", files={"avika-agent": old}):
            big = dev_binary(tmp_path / "big" / "avika-agent", "1.1.0", keys_of(s.signer))
            big = big + b"#" + b"x" * (5 << 20) + b"\n"  # 5 MiB + the 16 MiB margin > 20 MiB
            s.release("1.1.0", big)
            assert_refused_cleanly(host, s, big, "insufficient_space", old)


def test_a_read_only_target_directory_is_refused_cleanly(tmp_path):
    with site() as s:
        host, old, new = setup(tmp_path, s)
        with tmpfs(host.target.parent, "1m", read_only=True, files={"avika-agent": old}):
            s.release("1.1.0", new)
            assert_refused_cleanly(host, s, new, "target_not_writable", old)


# ---------------------------------------------------------------- one update at a time


def test_a_concurrent_update_by_hand_and_timer_run_exactly_one_proceeds(tmp_path):
    with site() as s:
        host, _, new = setup(tmp_path, s)
        host.start()
        try:
            wait_for(lambda: host.running_version() == "1.0.0", 15, "the agent to run")
            s.release("1.1.0", new, route={"delay": 2.5})  # a slow download: the lock is held for a while
            by_hand = host.cli("update")
            wait_for(lambda: host.converged(new, "1.1.0"), 30, "the commit")
            assert s.downloads("1.1.0", new) == 1  # exactly one transaction fetched the binary
            timer_refused = (
                "update_in_progress" in host.log_text() or "an update is in flight" in host.log_text()
            )
            if by_hand.returncode == 0:  # the hand won; the timer was refused (lock, or the pending record)
                assert timer_refused, host.log_text()[-3000:]
            else:  # the timer won; the hand was refused
                assert json.loads(by_hand.stdout)["error"] == "update_in_progress"
            assert host.chain("1.1.0").count("committed") == 1
            assert host.chain("1.1.0").count("downloading") == 1
        finally:
            host.kill_all()


def test_two_updates_by_hand_exactly_one_proceeds(tmp_path):
    with site() as s:
        host, _, new = setup(tmp_path, s)
        s.release("1.1.0", new, route={"delay": 1.5})
        with open(host.log_path, "ab") as log:
            procs = [
                subprocess.Popen(
                    [str(host.target), "update", "--config", str(host.config)],
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env=host.env(),
                    text=True,
                )
                for _ in range(2)
            ]
        outs = [(p.wait(timeout=30), json.loads(p.stdout.read())) for p in procs]  # type: ignore[union-attr]
        assert sorted(code for code, _ in outs) == [0, 1]
        assert [o["error"] for code, o in outs if code == 1] == ["update_in_progress"]
        assert [o["result"] for code, o in outs if code == 0] == ["swapped"]
        assert s.downloads("1.1.0", new) == 1 and host.target.read_bytes() == new


# ---------------------------------------------------------------- deployment modes


@pytest.mark.parametrize(
    "deployment,update_mode",
    [("container", "auto"), ("vm", "signal-only"), ("container", "signal-only")],
)
def test_container_and_signal_only_report_and_never_touch_the_target(tmp_path, deployment, update_mode):
    with site() as s:
        host, old, new = setup(tmp_path, s, DEPLOYMENT_MODE=deployment, UPDATE_MODE=update_mode)
        before = os.stat(host.target)
        s.release("1.1.0", new)
        host.start()
        try:
            available = wait_for(lambda: events_with(host, "update_available"), 15, "the report")[0]
            assert available["image"] == "hellodk/avika-agent:1.1.0" and available["in_wave"] is True
            assert available["mode"] == deployment and available["target_version"] == "1.1.0"
            serial = s.resign().serial  # keep checking for a while: still nothing touched
            wait_for(lambda: host.state().get("highest_serial") == serial, 15, "another check")
            done = host.cli("update", "--force")
            assert done.returncode == 0 and json.loads(done.stdout)["action"] == "report"
            assert host.target.read_bytes() == old and os.stat(host.target).st_mtime_ns == before.st_mtime_ns
            assert s.downloads("1.1.0", new) == 0 and host.stray_files() == [] and not host.backup.exists()
            assert set(host.chain()) == {"update_available"}
        finally:
            host.kill_all()


def test_vm_only_in_a_container_does_nothing_at_all(tmp_path):
    with site() as s:
        host, old, new = setup(tmp_path, s, DEPLOYMENT_MODE="container", UPDATE_MODE="vm-only")
        s.release("1.1.0", new)
        host.start()
        try:
            wait_for(lambda: host.state().get("last_result") == "none", 15, "a check")
            assert json.loads(host.cli("update").stdout)["reason"] == "vm_only_in_container"
            assert host.events() == [] and host.target.read_bytes() == old and s.downloads("1.1.0", new) == 0
        finally:
            host.kill_all()


def test_disabled_does_not_even_check_and_status_says_so(tmp_path):
    with site() as s:
        host, old, new = setup(tmp_path, s, UPDATE_MODE="disabled")
        s.release("1.1.0", new)
        host.start("run", "--log-format", "text")
        try:
            wait_for(lambda: "updates are disabled" in host.log_text(), 15, "the agent to start")
            assert not host.log_text().lstrip().startswith("{")  # --log-format text wins over the env
            status = host.status()
            assert status["updates"] == "disabled" and status["update_mode"] == "disabled"
            assert "disabled" in host.cli("status").stdout
            assert json.loads(host.cli("update").stdout)["reason"] == "disabled"
            time.sleep(1.5)  # a disabled agent's interval would have fired: nothing may be asked
            assert s.server.requests == [] and host.target.read_bytes() == old
        finally:
            host.kill_all()


# ---------------------------------------------------------------- kill -9 at random moments


KILL_SEEDS = list(range(50))
LIFECYCLE = ("downloading", "verifying", "staged", "restarting", "watching", "committed")


def _kill_scenario(base: Path, seed: int) -> dict[str, Any]:
    """Start the old agent with an update published, SIGKILL at a random moment, start again.

    Even seeds kill the agent's process group only (a watchdog, if forked, survives and may
    restart it too); odd seeds kill every process of the host, as a power cut would.
    """
    rng = random.Random(seed)
    with site() as s:
        host, old, new = setup(base, s, name=f"seed{seed}")
        s.release("1.1.0", new, route={"delay": 0.3})
        try:
            first = host.start()
            time.sleep(rng.uniform(0.3, 2.4))
            chain = [state for state in host.chain("1.1.0") if state in LIFECYCLE]
            killed_in = chain[-1] if chain else "before_update"
            if seed % 2:
                host.kill_all()
            else:
                os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
            after_kill = host.target.read_bytes()
            host.start()
            wait_for(lambda: host.converged(new, "1.1.0"), 45, f"convergence after a kill in {killed_in}")
            return {
                "killed_in": killed_in,
                "target_after_kill": "new" if after_kill == new else "old" if after_kill == old else "torn",
                "stray": host.stray_files(),
                "bad_versions": host.state().get("bad_versions"),
            }
        finally:
            host.kill_all()


@pytest.fixture(scope="module")
def kill_results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Any]:
    base = tmp_path_factory.mktemp("kills")
    results = run_concurrently(
        {str(seed): (lambda seed=seed: _kill_scenario(base, seed)) for seed in KILL_SEEDS}, 8
    )
    return {int(k): v for k, v in results.items()}


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_kill_9_at_a_random_moment_leaves_a_whole_binary_and_converges(kill_results, seed):
    result = kill_results[seed]
    if isinstance(result, BaseException):
        raise result
    assert result["target_after_kill"] in ("old", "new"), result
    assert result["stray"] == [] and result["bad_versions"] == [], result


def test_the_kills_landed_in_many_states(kill_results):
    states = {r["killed_in"] for r in kill_results.values() if isinstance(r, dict)}
    assert len(states) >= 3, states  # timing varies; the spread must not collapse to one moment


# ---------------------------------------------------------------- killed in a state: the disk a kill leaves


def leave_disk_as_killed_in(
    host: Host, state: str, old: bytes, new: bytes, now: datetime, deadline: timedelta = timedelta(minutes=10)
) -> None:
    boots = {"staged": 0, "restarting": 0, "watching_last_boot": 3}[state]
    host.state_dir.mkdir(parents=True, exist_ok=True)
    if state != "staged":
        host.backup.write_bytes(old)
        host.target.write_bytes(new)
        host.backup.chmod(0o755)
    record = {
        "from_version": "1.0.0",
        "to_version": "1.1.0",
        "from_sha256": sha256(old),
        "to_sha256": sha256(new),
        "target": str(host.target),
        "backup": str(host.backup),
        "serial": 1,
        "boots": boots,
        "swapped_at": format_time(now),
        "deadline": format_time(now + deadline),
    }
    (host.state_dir / "pending.json").write_text(json.dumps(record))


@pytest.mark.parametrize(
    "state,ends_on,reported",
    [
        ("staged", "1.1.0", ["failed", "update_available", "downloading"]),  # not swapped: retried later
        ("restarting", "1.1.0", ["watching", "committed"]),  # swapped, never booted: this start counts
        ("watching_last_boot", "1.0.0", ["rolled_back"]),  # the 4th boot exceeds the cap
    ],
)
def test_killed_in_state_the_next_start_converges(tmp_path, state, ends_on, reported):
    with site() as s:
        host, old, new = setup(tmp_path, s)
        s.release("1.1.0", new)
        leave_disk_as_killed_in(host, state, old, new, datetime.now(UTC))
        host.start()
        try:
            if ends_on == "1.1.0":
                wait_for(lambda: host.converged(new, "1.1.0"), 30, f"convergence after a kill in {state}")
            else:
                wait_for(
                    lambda: host.running_version() == "1.0.0" and host.pending() is None, 30, "the rollback"
                )
                assert host.target.read_bytes() == old
                assert host.state()["bad_versions"][0]["reason"] == "too_many_boots"
            assert host.chain("1.1.0")[: len(reported)] == reported
            assert host.stray_files() == []
        finally:
            host.kill_all()


def test_after_a_host_crash_a_hung_version_forks_its_own_watchdog_and_is_still_rolled_back(tmp_path):
    """Power cut right after the swap: no process survived, so no watchdog either. The next start
    (the hung new version, started by init) counts its boot, finds no watchdog alive and forks one
    for itself, which ends the hang as the old version's would have."""
    with site() as s:
        host, old, bad = setup(tmp_path, s, variant="hang_after_boot", **HANG_ENV)
        s.release("1.1.0", bad)
        leave_disk_as_killed_in(host, "restarting", old, bad, datetime.now(UTC), timedelta(seconds=3))
        first = host.start()
        try:
            watchdog = wait_for(host.watchdog_pid, 30, "a watchdog forked by the new version itself")
            # The watchdog writes watchdog.pid itself; the agent logs it once the pid reaches it.
            line = f"watchdog pid {watchdog} watches agent pid {first.pid}"
            wait_for(lambda: line in host.log_text(), 10, f"the agent's log line {line!r}")
            wait_for(
                lambda: host.running_version() == "1.0.0" and "rolled_back" in host.chain("1.1.0"),
                90,
                "the rollback of the hung version",
            )
            assert not alive(first.pid) and host.target.read_bytes() == old and host.pending() is None
            assert events_with(host, "rolled_back")[-1]["error"].startswith("hung")
            assert [b["reason"] for b in host.state()["bad_versions"]] == ["hung"]
        finally:
            host.kill_all()


def test_a_missed_commit_deadline_rolls_back_and_retries_after_the_backoff(tmp_path):
    with site() as s:
        host, old, new = setup(tmp_path, s)
        s.release("1.1.0", new)
        leave_disk_as_killed_in(host, "restarting", old, new, datetime.now(UTC) - timedelta(minutes=20))
        host.start()
        try:
            wait_for(lambda: host.converged(new, "1.1.0"), 30, "the retry to commit")
            chain = host.chain("1.1.0")
            assert chain[0] == "rolled_back" and chain[-1] == "committed"
            assert events_with(host, "rolled_back")[0]["error"].startswith("commit_deadline_passed")
            rolled, retried = event_times(host, "rolled_back")[0], event_times(host, "downloading")[0]
            assert (retried - rolled).total_seconds() >= 2.0  # backed off: interval 1 s * 2**1
            assert host.state()["bad_versions"] == []  # forgotten once it committed
        finally:
            host.kill_all()


STATUS_KEYS = keys_of(new_signer())
RECORD = {
    "from_version": "1.0.0",
    "to_version": "1.1.0",
    "from_sha256": "a" * 64,
    "to_sha256": "b" * 64,
    "target": "/opt/avika/avika-agent",
    "backup": "/opt/avika/avika-agent.backup",
    "serial": 3,
    "boots": 1,
    "swapped_at": "2026-02-15T20:00:00Z",
    "deadline": "2026-02-15T20:11:00Z",
}
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
STATE_FILES = st.one_of(
    st.binary(max_size=300),
    st.fixed_dictionaries({k: st.one_of(st.just(v), ANY_JSON) for k, v in RECORD.items()}).map(
        lambda r: json.dumps(r).encode()
    ),
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pending=STATE_FILES, pid_record=STATE_FILES)
def test_status_of_a_real_agent_shows_any_pending_json_without_a_traceback(
    tmp_path_factory, pending, pid_record
):
    """``avika-agent status`` (text and --json) on random or mistyped pending.json and agent.pid:
    exit 0, the record or ``{"corrupt": true, ...}``, nothing written, no traceback."""
    host = Host(tmp_path_factory.mktemp("status") / "h", "http://127.0.0.1:9/updates")
    host.install("1.0.0", STATUS_KEYS)
    host.state_dir.mkdir(parents=True)
    (host.state_dir / "pending.json").write_bytes(pending)
    (host.state_dir / "agent.pid").write_bytes(pid_record)
    as_json, as_text = host.cli("status", "--json"), host.cli("status")
    assert as_json.returncode == 0 and as_text.returncode == 0, host.log_text()[-2000:]
    assert "Traceback" not in host.log_text()
    shown = json.loads(as_json.stdout)["pending"]
    try:
        valid = lifecycle.Pending.from_dict(json.loads(pending)).to_dict()
    except (ValueError, RecursionError):
        valid = None
    if valid is None:
        assert shown["corrupt"] is True and "pending.json is corrupt" in shown["error"]
        assert "pending:        corrupt record" in as_text.stdout
    else:
        assert shown == valid
    assert json.loads(as_json.stdout)["running"] is None  # no live agent of this target
    assert (host.state_dir / "pending.json").read_bytes() == pending  # status only reads
    assert sorted(p.name for p in host.state_dir.iterdir()) == ["agent.pid", "pending.json"]


def test_files_a_killed_transaction_left_are_removed_at_the_next_start(tmp_path):
    with site() as s:
        host, old, _ = setup(tmp_path, s)
        s.release("1.0.0", old)  # nothing to update to: no transaction will clean up
        leftovers = [".avika-agent.avika-staged.1.1.0.4242", ".avika-agent.avika-backup.4242"]
        for name in leftovers:
            (host.target.parent / name).write_bytes(b"half")
            os.utime(host.target.parent / name, (time.time() - 60, time.time() - 60))
        host.start()
        try:
            wait_for(lambda: host.stray_files() == [], 15, "the stale files to go")
            assert host.target.read_bytes() == old
        finally:
            host.kill_all()


# ---------------------------------------------------------------- rollback by hand


def test_rollback_by_hand_restores_the_backup_and_remembers_the_version(tmp_path):
    with site() as s:
        host, old, new = setup(tmp_path, s)
        s.release("1.1.0", new)
        proc = host.start()
        try:
            wait_for(lambda: host.converged(new, "1.1.0"), 30, "the commit")
            done = host.cli("rollback")
            assert done.returncode == 0, done
            out = json.loads(done.stdout)
            assert out == {
                "rolled_back": "1.1.0",
                "sha256": sha256(new),
                "reason": "manual_rollback",
                "restart": "signalled",
            }
            wait_for(lambda: host.running_version() == "1.0.0", 15, "the agent to re-exec the old version")
            assert host.agent_record()["pid"] == proc.pid and host.target.read_bytes() == old
            serial = s.resign().serial
            wait_for(
                lambda: host.state().get("highest_serial") == serial, 15, "a check of the re-signed manifest"
            )
            assert s.downloads("1.1.0", new) == 1 and host.target.read_bytes() == old
            again = host.cli("rollback")
            assert again.returncode == 1 and json.loads(again.stdout)["error"] == "nothing_to_roll_back"
        finally:
            host.kill_all()


# ---------------------------------------------------------------- key rotation


def test_key_rotation_across_three_releases_without_touching_the_host(tmp_path):
    """A (signed by old, embeds old+new), B (signed by new, embeds old+new), C (signed by new,
    embeds new only); UPDATE_PUBLIC_KEYS is never set: each binary trusts what it embeds."""
    old_key, new_key = new_signer(), new_signer()
    with site(old_key) as s:
        host = Host(tmp_path / "h", s.url)
        host.install("1.0.0", keys_of(old_key))
        assert "UPDATE_PUBLIC_KEYS" not in host.env()
        builds = {
            "1.1.0": (keys_of(old_key, new_key), old_key),
            "1.2.0": (keys_of(old_key, new_key), new_key),
            "1.3.0": (keys_of(new_key), new_key),
        }
        host.start()
        try:
            for version, (embedded, signer) in builds.items():
                data = dev_binary(tmp_path / version / "avika-agent", version, embedded)
                s.release(version, data, signers=[signer])
                wait_for(lambda data=data, version=version: host.converged(data, version), 30, f"{version}")
            current = host.target.read_bytes()
            forged = dev_binary(tmp_path / "1.4.0" / "avika-agent", "1.4.0", keys_of(new_key))
            s.release("1.4.0", forged, signers=[old_key])
            failed = wait_for(
                lambda: events_with(host, "failed"), 15, "the old key's manifest to be refused"
            )[0]
            assert failed["failed_state"] == "checking" and failed["error"].startswith("signature_invalid")
            done = host.cli("check")
            assert done.returncode == 3 and json.loads(done.stdout)["error"] == "signature_invalid"
            assert host.target.read_bytes() == current and s.downloads("1.4.0", forged) == 0
            assert host.running_version() == "1.3.0"
        finally:
            host.kill_all()
