"""The install steps on real files (DESIGN section 4): pre-flight, stage, smoke test, swap, restore.

What is real here: the filesystem faults use real filesystems. A tiny tmpfs is mounted for "too
little free space" and ENOSPC mid-write, and a tmpfs remounted read-only for "directory not
writable" (chmod would not stop root, which these tests run as). They are skipped, saying why,
where mounting is not allowed. The package-manager check asks the real dpkg about a file it owns.
The smoke test runs real executables; the swap test reads the target from another thread
through hundreds of swaps.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent import install
from tests.agent_fixtures import sha256
from tests.agent_harness import tmpfs

OLD, NEW = b"#!/bin/sh\necho 1.0.0\n", b"#!/bin/sh\necho 1.1.0\n"


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def write_all(data: bytes):
    """A writer as the download is: it keeps writing until every byte is in or the disk says no."""

    def write(fd: int) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return write


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "avika-agent"
    path.parent.mkdir()
    path.write_bytes(OLD)
    path.chmod(0o750)
    return path


# ---------------------------------------------------------------- pre-flight


def test_preflight_returns_the_real_file_behind_a_symlink(target, tmp_path):
    link = tmp_path / "avika-agent-link"
    link.symlink_to(target)
    assert install.preflight(link, len(NEW), owner_of=lambda p: None) == target


@pytest.mark.parametrize("kind", ["missing", "directory", "fifo"])
def test_preflight_refuses_a_target_that_is_not_a_regular_file(tmp_path, kind):
    path = tmp_path / "avika-agent"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    with pytest.raises(install.TargetNotRegular) as caught:
        install.preflight(path, 10, owner_of=lambda p: None)
    assert caught.value.code == "target_not_regular"


def test_preflight_refuses_a_size_beyond_the_free_space_before_any_download(target):
    free = install.free_bytes(target.parent)
    with pytest.raises(install.InsufficientSpace) as caught:
        install.preflight(target, free + 1, owner_of=lambda p: None)
    assert caught.value.code == "insufficient_space"
    # the margin counts too: exactly the free space is not enough
    with pytest.raises(install.InsufficientSpace):
        install.preflight(target, max(1, free - install.SPACE_MARGIN + 1), owner_of=lambda p: None)


def test_preflight_on_a_small_real_filesystem(tmp_path):
    with tmpfs(tmp_path / "small", "24m", files={"avika-agent": OLD}) as mnt:
        assert install.preflight(mnt / "avika-agent", 1024, owner_of=lambda p: None) == mnt / "avika-agent"
        with pytest.raises(install.InsufficientSpace):
            install.preflight(mnt / "avika-agent", 9 * 1024 * 1024, owner_of=lambda p: None)
        assert sorted(p.name for p in mnt.iterdir()) == ["avika-agent"]


def test_preflight_refuses_a_read_only_directory(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True, files={"avika-agent": OLD}) as mnt:
        with pytest.raises(install.TargetNotWritable) as caught:
            install.preflight(mnt / "avika-agent", 10, owner_of=lambda p: None)
        assert caught.value.code == "target_not_writable"
        # and staging there fails cleanly with the same code (the check is not only access(2))
        with pytest.raises(install.TargetNotWritable):
            install.stage(mnt / "avika-agent", "1.1.0", lambda fd: os.write(fd, NEW))


def test_preflight_refuses_a_file_a_package_manager_owns():
    if shutil.which("dpkg") is None:
        pytest.skip("dpkg is not installed")
    owned = Path("/bin/sh").resolve()
    if subprocess.run(["dpkg", "-S", str(owned)], capture_output=True).returncode != 0:
        owned = Path("/bin/ls")
    owner = install.package_owner(owned)
    if owner is None:
        pytest.skip(f"dpkg does not claim {owned} on this image")
    with pytest.raises(install.OwnedByPackageManager) as caught:
        install.preflight(owned, 1)
    assert caught.value.code == "owned_by_package_manager" and "dpkg" in caught.value.message


def test_a_file_no_package_owns_passes_the_real_package_check(target):
    assert install.package_owner(target) is None


# ---------------------------------------------------------------- stage


def test_stage_writes_next_to_the_target_with_its_mode_and_owner(target):
    os.chown(target, 65534, 65534)
    staged = install.stage(target, "1.1.0", lambda fd: os.write(fd, NEW))
    assert staged.parent == target.parent
    assert staged.name == f".avika-agent.avika-staged.1.1.0.{os.getpid()}"
    assert staged.read_bytes() == NEW
    info = os.stat(staged)
    assert (info.st_mode & 0o7777, info.st_uid, info.st_gid) == (0o750, 65534, 65534)


def test_stage_removes_its_file_when_the_download_fails(target):
    def broken(fd: int) -> None:
        os.write(fd, NEW[:5])
        raise RuntimeError("connection lost")

    with pytest.raises(RuntimeError):
        install.stage(target, "1.1.0", broken)
    assert sorted(p.name for p in target.parent.iterdir()) == ["avika-agent"]


def test_stage_replaces_a_leftover_of_a_dead_process_with_our_pid(target):
    install.staged_path(target, "1.1.0").write_bytes(b"half a binary")
    staged = install.stage(target, "1.1.0", lambda fd: os.write(fd, NEW))
    assert staged.read_bytes() == NEW


def test_stage_running_out_of_space_is_insufficient_space_and_leaves_nothing(tmp_path):
    with tmpfs(tmp_path / "tiny", "64k", files={"avika-agent": OLD}) as mnt:
        with pytest.raises(install.InsufficientSpace):
            install.stage(mnt / "avika-agent", "1.1.0", write_all(b"\0" * (1 << 20)))
        assert sorted(p.name for p in mnt.iterdir()) == ["avika-agent"]


# ---------------------------------------------------------------- smoke test


def test_smoke_test_passes_a_binary_that_prints_its_version(tmp_path):
    install.smoke_test(script(tmp_path / "ok", 'echo "1.1.0"\n'), "1.1.0")
    install.smoke_test(script(tmp_path / "tagged", 'echo "v1.1.0"\n'), "1.1.0")  # same PEP 440 version


@pytest.mark.parametrize(
    "body,timeout,fragment",
    [
        ('echo "1.0.9"\n', 10, "printed '1.0.9'"),
        ('echo "1.1.0"; exit 3\n', 10, "status 3"),
        ("kill -SEGV $$\n", 10, "status -11"),
        ('sleep 30; echo "1.1.0"\n', 0.5, "did not exit within"),
        ('echo "1.1.0"; echo "and more"\n', 10, "printed"),
    ],
    ids=["wrong-version", "exit-status", "segfault", "hangs", "extra-output"],
)
def test_smoke_test_fails_a_binary_that_cannot_start_or_is_another_version(tmp_path, body, timeout, fragment):
    started = time.monotonic()
    with pytest.raises(install.SmokeTestFailed) as caught:
        install.smoke_test(script(tmp_path / "bad", body), "1.1.0", timeout=timeout)
    assert caught.value.code == "smoke_test_failed" and fragment in caught.value.message
    assert time.monotonic() - started < 9


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling-fallback"])
def test_wait_exit_returns_the_status_or_times_out(monkeypatch, pidfd):
    if not pidfd:  # an older kernel or Python: Popen's own polling wait
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    with subprocess.Popen(["sh", "-c", "exit 7"]) as done:
        assert install.wait_exit(done, 10) == 7
    with subprocess.Popen(["sleep", "30"]) as sleeping:
        with pytest.raises(subprocess.TimeoutExpired):
            install.wait_exit(sleeping, 0.2)
        assert sleeping.poll() is None  # still running: the caller decides (the smoke test kills it)
        sleeping.kill()


def test_smoke_test_fails_a_file_that_is_not_executable(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"\x7fELF garbage")
    path.chmod(0o755)
    with pytest.raises(install.SmokeTestFailed):
        install.smoke_test(path, "1.1.0")


def test_smoke_test_reads_at_most_a_little_output(tmp_path):
    chatty = script(tmp_path / "chatty", "head -c 50000000 /dev/zero | tr '\\0' 'x'\n")
    with pytest.raises(install.SmokeTestFailed) as caught:
        install.smoke_test(chatty, "1.1.0")
    assert len(caught.value.message) < 400


# ---------------------------------------------------------------- swap and restore


def stage_new(target: Path, data: bytes = NEW) -> Path:
    return install.stage(target, "1.1.0", lambda fd: os.write(fd, data))


def test_swap_keeps_the_old_binary_as_a_hard_linked_backup(target):
    old_inode = os.stat(target).st_ino
    install.swap(stage_new(target), target)
    assert target.read_bytes() == NEW
    backup = install.backup_path(target)
    assert backup.read_bytes() == OLD and os.stat(backup).st_ino == old_inode
    assert sorted(p.name for p in target.parent.iterdir()) == ["avika-agent", "avika-agent.backup"]


def test_the_target_is_always_a_whole_binary_during_swaps(target):
    """A reader opening the target during 300 swaps never misses it and never sees a partial file."""
    versions = [OLD, NEW + b"#" * 4096]
    seen: set[bytes] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.add(target.read_bytes())
            except BaseException as exc:  # any failure is the finding
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(300):
            install.swap(stage_new(target, versions[(n + 1) % 2]), target)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert seen <= set(versions) and len(seen) == 2


def test_swap_after_a_restore_leaves_no_temporary_link(target):
    install.swap(stage_new(target), target)
    install.restore(target)  # target and backup are now one file
    assert os.stat(target).st_ino == os.stat(install.backup_path(target)).st_ino
    install.swap(stage_new(target), target)
    assert target.read_bytes() == NEW and install.backup_path(target).read_bytes() == OLD
    assert sorted(p.name for p in target.parent.iterdir()) == ["avika-agent", "avika-agent.backup"]


def test_restore_puts_the_backup_back_and_keeps_it(target):
    install.swap(stage_new(target), target)
    install.restore(target, expect_sha256=sha256(OLD))
    assert target.read_bytes() == OLD and install.backup_path(target).read_bytes() == OLD
    install.restore(target)  # a second restore is a no-op
    assert target.read_bytes() == OLD


def test_restore_refuses_a_backup_that_is_not_the_old_binary(target):
    install.swap(stage_new(target), target)
    with pytest.raises(install.RestoreFailed) as caught:
        install.restore(target, expect_sha256=sha256(b"something else"))
    assert caught.value.code == "restore_failed" and target.read_bytes() == NEW


def test_restore_without_a_backup_fails_cleanly(target):
    with pytest.raises(install.RestoreFailed):
        install.restore(target)
    assert target.read_bytes() == OLD


# ---------------------------------------------------------------- cleanup


def test_cleanup_removes_only_our_stale_files(target):
    directory = target.parent
    stale = [
        directory / ".avika-agent.avika-staged.1.1.0.123",
        directory / ".avika-agent.avika-backup.456",
        directory / ".avika-agent.avika-restore.789",
    ]
    for path in stale:
        path.write_bytes(b"x")
        os.utime(path, (time.time() - 60, time.time() - 60))
    current = directory / ".avika-agent.avika-staged.1.2.0.999"
    current.write_bytes(b"being written")
    others = [
        directory / "avika-agent.backup",
        directory / ".other.avika-staged.1.0",
        directory / "notes.txt",
    ]
    for path in others:
        path.write_bytes(b"keep")
    removed = install.cleanup_stale(target, before=time.time() - 30)
    assert sorted(removed) == sorted(stale)
    assert current.exists() and all(p.exists() for p in others) and target.exists()


# ---------------------------------------------------------------- hashing a file


@pytest.mark.parametrize(
    "size", [0, 1, install.HASH_CHUNK - 1, install.HASH_CHUNK, install.HASH_CHUNK + 1, 3 * install.HASH_CHUNK]
)
def test_sha256_file_hashes_every_byte(tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    assert install.sha256_file(tmp_path / "f") == sha256(data)


def test_hashing_a_binary_keeps_no_memory_afterwards(tmp_path):
    # The update hashes the target beside the smoke test, at its peak RSS: a new 1 MiB bytes per
    # read left ~2 MiB on glibc's heap for good (its mmap threshold rises after the first free).
    (tmp_path / "f").write_bytes(os.urandom(32 << 20))
    code = (
        "import sys, threading; sys.path.insert(0, sys.argv[2])\n"
        "from agent import install\n"
        "def rss(): return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])\n"
        "install.sha256_file(sys.argv[1]); before = rss()\n"  # a first run: the code's own memory
        "t = threading.Thread(target=install.sha256_file, args=(sys.argv[1],)); t.start(); t.join()\n"
        "install.sha256_file(sys.argv[1]); print(rss() - before)\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "f"), root], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 1024, f"{int(done.stdout)} KiB more resident after hashing"
