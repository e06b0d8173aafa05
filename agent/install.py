"""Putting a verified binary in place: pre-flight, stage, smoke test, swap, restore (DESIGN section 4).

One function per step; the lifecycle (:mod:`agent.lifecycle`) calls them in order and owns the
pending record. What each step guarantees:

- :func:`preflight` refuses before any byte is downloaded: the target must be a regular file
  (a symlink is followed to the real file, which is what gets replaced), its directory writable,
  with room for the new binary plus :data:`SPACE_MARGIN`, and the file not owned by dpkg or rpm
  (a package manager would later overwrite or "repair" our binary; ``dpkg -S`` / ``rpm -qf`` are
  asked only if installed, with a timeout). An update asks the package manager on a thread while
  it downloads instead (:class:`OwnerQuery`): the answer stops the download, and is awaited
  before the staged file runs. An agent file also unpacks its code into the cache
  (:mod:`agent.cache`) at its first start: that space, estimated by this build's, is counted on
  the cache's filesystem (the same one or another).
- :func:`stage` creates ``.<name>.avika-staged.<version>.<pid>`` with ``O_EXCL`` in the
  *target's* directory (never /tmp: ``rename`` across filesystems fails with ``EXDEV``), lets the
  caller stream the download into it, fsyncs it and gives it the target's mode and owner.
- :func:`smoke_test` runs ``<staged> version`` (10 s): a binary that cannot even start, or that
  is not the version the manifest names, never replaces a working one. It runs with a private
  code cache (:func:`agent.cache.private_root`), removed afterwards: it leaves nothing behind but,
  when it passes, the staged build's unpacked code, kept for that build's first start after the
  swap (:func:`agent.cache.adopt`).
- :func:`swap` keeps the current binary as ``<target>.backup`` through a hard link, then moves the
  staged file over the target with one ``os.replace`` and fsyncs the directory: at every instant
  the target path names a complete binary, the old one or the new one.
- :func:`restore` puts ``.backup`` back the same way (the backup stays, so a second restore is a
  no-op).
- :func:`cleanup_stale` removes what a killed attempt left next to the target, and in the code
  cache any build that is neither the target's nor its backup's (a smoke test's code kept for an
  attempt that then failed).

Errors are :class:`InstallError` subclasses whose ``code`` is the reported error code.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import select
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion

from agent import cache
from agent.manifest import parse_version
from agent.state import fsync_dir

log = logging.getLogger(__name__)

# Room kept free beyond the new binary: the filesystem's own metadata, the state dir and logs that
# may share it. A disk filled to the last block by an update breaks the host worse than no update.
SPACE_MARGIN = 16 * 1024 * 1024
SMOKE_TIMEOUT = 10.0
PACKAGE_QUERY_TIMEOUT = 5.0
# `version` prints one short line; more than this is not a version, and never held in memory.
MAX_VERSION_OUTPUT = 4096
HASH_CHUNK = 256 * 1024
STAGED_TAG = ".avika-staged."
BACKUP_SUFFIX = ".backup"
# Temporary names of the swap and the restore: a hard link that becomes .backup or the target.
_LINK_TAGS = (".avika-backup.", ".avika-restore.")
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class InstallError(Exception):
    """An install step failed; nothing was swapped unless the subclass says otherwise."""

    code = "install_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InsufficientSpace(InstallError):
    code = "insufficient_space"


class TargetNotWritable(InstallError):
    code = "target_not_writable"


class TargetNotRegular(InstallError):
    code = "target_not_regular"


class OwnedByPackageManager(InstallError):
    code = "owned_by_package_manager"


class SmokeTestFailed(InstallError):
    code = "smoke_test_failed"


class SwapFailed(InstallError):
    code = "swap_failed"


class RestoreFailed(InstallError):
    code = "restore_failed"


# ---------------------------------------------------------------- names


def backup_path(target: Path) -> Path:
    return target.with_name(target.name + BACKUP_SUFFIX)


def staged_path(target: Path, version: str, pid: int | None = None) -> Path:
    safe = "".join(c if c.isalnum() or c in "._+-" else "_" for c in version)
    return target.with_name(f".{target.name}{STAGED_TAG}{safe}.{os.getpid() if pid is None else pid}")


def _link_path(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}{tag}{os.getpid()}")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read into one buffer (a binary is never held in memory).

    One ``readinto`` buffer, not a new 1 MiB ``bytes`` per read: glibc raises its mmap threshold
    after the first such piece is freed and keeps the next ones on the heap, ~2 MiB of resident
    memory the process never gave back (the update's peak RSS is measured: bench/update_memory.py).
    """
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while size := fh.readinto(buffer):
            digest.update(view[:size])
        _drop_cache(fh.fileno())
    return digest.hexdigest()


def _drop_cache(fd: int) -> None:
    """Let the kernel drop this file's cached pages: under ``MemoryMax=64M`` the page cache of a
    512 MiB binary is charged to the agent's cgroup."""
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def sha256_or_none(path: Path) -> str | None:
    """The file's hash, or None when there is no readable file there (whatever the path is)."""
    try:
        return sha256_file(path)
    except (OSError, ValueError):  # missing, a directory, ENOTDIR, ELOOP, ENAMETOOLONG, a NUL byte
        return None


# ---------------------------------------------------------------- pre-flight


def resolve_target(target: Path) -> Path:
    """The real file behind ``target`` (symlinks followed); ``TargetNotRegular`` otherwise."""
    real = Path(os.path.realpath(target))
    try:
        info = os.stat(real)
    except FileNotFoundError:
        raise TargetNotRegular(f"target {target} does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise TargetNotRegular(f"target {target} ({real}) is not a regular file")
    return real


def _writable(directory: Path) -> bool:
    # access(2) with the effective ids answers EROFS and immutable directories even for root;
    # the O_EXCL create in stage() is the final word.
    if not os.access(directory, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        return False
    return not os.statvfs(directory).f_flag & os.ST_RDONLY


def free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def package_owner(path: Path, timeout: float = PACKAGE_QUERY_TIMEOUT) -> str | None:
    """``dpkg -S`` / ``rpm -qf`` answer, if either tool is installed and claims ``path``."""
    queries = (("dpkg", ["-S"]), ("rpm", ["-qf"]))
    for tool, args in queries:
        exe = shutil.which(tool)
        if exe is None:
            continue
        try:
            done = subprocess.run(
                [exe, *args, str(path)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("cannot ask %s who owns %s: %s", tool, path, exc)
            continue
        lines = [ln for ln in done.stdout.splitlines() if ln.strip() and not ln.startswith("diversion by")]
        if done.returncode == 0 and lines:
            return f"{tool}: {lines[0].strip()}"
    return None


def _check_space(directory: Path, size: int, unpacked: tuple[Path, int] | None) -> None:
    """Room for the new binary next to the target and for its unpacked code in the cache, each
    filesystem with :data:`SPACE_MARGIN` to spare."""
    needs = {os.stat(directory).st_dev: [directory, size, f"the new binary needs {size}"]}
    if unpacked is not None and unpacked[1] > 0:
        root, code = unpacked
        need = needs.setdefault(os.stat(root).st_dev, [root, 0, ""])
        need[1] += code
        need[2] = ", ".join(filter(None, [need[2], f"its unpacked code in {root} about {code}"]))
    for where, need, what in needs.values():
        free = free_bytes(where)
        if free < need + SPACE_MARGIN:
            raise InsufficientSpace(f"{where} has {free} bytes free; {what} + {SPACE_MARGIN} margin")


def check_room(target: Path, size: int, *, unpacked: tuple[Path, int] | bool | None = True) -> Path:
    """The pre-flight without the package query: the real target, writable, with room; returns it.

    ``unpacked``: (cache root, bytes) the new build's code will take there; by default this
    build's own (:func:`agent.cache.space_needed`; None when not running from an agent file).
    """
    real = resolve_target(target)
    directory = real.parent
    if not _writable(directory):
        raise TargetNotWritable(f"directory {directory} of the target is not writable")
    _check_space(directory, size, cache.space_needed() if unpacked is True else unpacked or None)
    return real


def _names(target: Path, real: Path) -> list[Path]:
    """The paths a package could claim: the configured one and the file it resolves to."""
    return list(dict.fromkeys((Path(os.path.abspath(target)), real)))


def _claimed(path: Path, owner: str) -> OwnedByPackageManager:
    return OwnedByPackageManager(f"{path} belongs to a package ({owner}); update it with that")


def preflight(
    target: Path,
    size: int,
    *,
    owner_of: Callable[[Path], str | None] = package_owner,
    unpacked: tuple[Path, int] | bool | None = True,
) -> Path:
    """Everything that can be known before downloading ``size`` bytes; returns the real target."""
    real = check_room(target, size, unpacked=unpacked)
    for candidate in _names(target, real):
        owner = owner_of(candidate)
        if owner is not None:
            raise _claimed(candidate, owner)
    return real


class Beside:
    """``work(*args)`` on a thread, beside what the caller does next; :meth:`result` waits for it
    and returns what it returned or raises what it raised (the update's own thread decides)."""

    def __init__(self, work: Callable[..., Any], *args: Any, name: str = "beside") -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work, args), name=name, daemon=True)
        self._thread.start()

    def _run(self, work: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self._value = work(*args)
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class OwnerQuery:
    """The package query of :func:`preflight`, asked on a thread while the binary downloads.

    ``dpkg -S`` reads the whole package database (~80 ms here), time the update need not wait:
    the download starts at once, ``claimed`` is set the moment a package claims the target (the
    download stops at its next piece), and :meth:`check` (before the staged file is run or
    swapped) raises :class:`OwnedByPackageManager`, or what the query itself raised.
    """

    def __init__(
        self, target: Path, real: Path, owner_of: Callable[[Path], str | None] = package_owner
    ) -> None:
        self.claimed = threading.Event()
        self._query = Beside(self._ask, _names(target, real), owner_of, name="package-query")

    def _ask(self, paths: list[Path], owner_of: Callable[[Path], str | None]) -> None:
        try:
            for path in paths:
                owner = owner_of(path)
                if owner is not None:
                    raise _claimed(path, owner)
        except BaseException:
            self.claimed.set()
            raise

    def check(self) -> None:
        self._query.result()


# ---------------------------------------------------------------- stage


def _os_error(exc: OSError, what: str) -> InstallError:
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return InsufficientSpace(f"{what}: {exc.strerror}")
    if exc.errno in _NOT_WRITABLE:
        return TargetNotWritable(f"{what}: {exc.strerror}")
    return InstallError(f"{what}: {exc}")


def stage(target: Path, version: str, write: Callable[[int], object]) -> Path:
    """Create the staged file next to ``target`` and let ``write(fd)`` fill it.

    ``write`` streams the download into the descriptor (``agent.fetch.Fetcher.download``). On
    any error the staged file is removed and the error raised (``OSError`` as an
    ``InstallError``); on success the file is fsynced, has the target's mode and owner, and its
    path is returned.
    """
    info = os.stat(target)
    path = staged_path(target, version)
    try:
        with contextlib.suppress(FileNotFoundError):  # a leftover of a dead process with our pid
            os.unlink(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _os_error(exc, f"cannot create {path}") from None
    try:
        try:
            write(fd)
            os.fchmod(fd, stat.S_IMODE(info.st_mode))
            if (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid()):
                try:
                    os.fchown(fd, info.st_uid, info.st_gid)
                except PermissionError:
                    log.warning("cannot give %s the target's owner %d:%d", path, info.st_uid, info.st_gid)
            os.fsync(fd)
            _drop_cache(fd)  # written back by the fsync: clean pages, free to drop
        finally:
            os.close(fd)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if isinstance(exc, OSError):
            raise _os_error(exc, f"cannot write {path}") from exc
        raise
    return path


# ---------------------------------------------------------------- smoke test


def _head(fh: object) -> str:
    fh.seek(0)  # type: ignore[attr-defined]
    return fh.read(MAX_VERSION_OUTPUT).decode("utf-8", "replace")  # type: ignore[attr-defined]


def run_version(
    binary: Path, timeout: float = SMOKE_TIMEOUT, env: Mapping[str, str] | None = None
) -> tuple[int, str, str]:
    """Run ``<binary> version``: (exit status, stdout, stderr), each output at most 4 KiB read.

    Output goes to temporary files, not pipes, so a chatty binary neither blocks nor fills memory.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(
                [str(binary), "version"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            return -1, "", f"cannot run: {exc}"
        with proc:
            try:
                status = wait_exit(proc, timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return -1, "", f"did not exit within {timeout:.0f}s"
        return status, _head(out), _head(err)


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """``proc.wait(timeout)``, woken by the exit itself: ``Popen.wait`` with a timeout polls,
    sleeping up to 50 ms between looks (half of that lost on average, on every update's smoke
    test); a pidfd (Linux 5.3+, Python 3.9+) becomes readable when the process exits."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # an older kernel or Python: the polling wait
        return proc.wait(timeout)
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not readable:
        raise subprocess.TimeoutExpired(proc.args, timeout)
    return proc.wait()


def same_version(printed: str, expected: str) -> bool:
    """Exactly the manifest's version, or the same PEP 440 version (``v0.1.44`` = ``0.1.44``)."""
    if printed == expected:
        return True
    try:
        return parse_version(printed) == parse_version(expected)
    except InvalidVersion:
        return False


def binary_version(binary: Path, timeout: float = SMOKE_TIMEOUT) -> str | None:
    """What ``<binary> version`` prints, or None if it fails."""
    status, out, _ = run_version(binary, timeout)
    printed = out.strip()
    return printed if status == 0 and printed and "\n" not in printed else None


def smoke_test(staged: Path, version: str, timeout: float = SMOKE_TIMEOUT) -> None:
    """``<staged> version`` must exit 0 and print ``version``; ``SmokeTestFailed`` otherwise.

    The staged file unpacks its code (if it is an agent file) into a private cache root, removed
    when this returns; if the test passes, that code is first kept as the staged build's, so its
    first start after the swap does not unpack it again.
    """
    with cache.private_root() as root:
        status, out, err = run_version(staged, timeout, {**os.environ, cache.ENV_VAR: str(root)})
        _check_smoke(staged, version, status, out, err)
        cache.adopt(root, cache.build_id_of(staged))


def _check_smoke(staged: Path, version: str, status: int, out: str, err: str) -> None:
    if status != 0:
        tail = err.strip().splitlines()[-1:] or [""]
        raise SmokeTestFailed(f"`{staged.name} version` failed (status {status}): {tail[0][:200]}")
    printed = out.strip()
    if not same_version(printed, version):
        raise SmokeTestFailed(
            f"`{staged.name} version` printed {printed[:100]!r}, the manifest says {version!r}"
        )


# ---------------------------------------------------------------- swap and restore


def _link_over(source: Path, dest: Path, tag: str) -> None:
    """Make ``dest`` another name of ``source``'s file, atomically (link to a temp name, rename)."""
    tmp = _link_path(dest, tag)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.link(source, tmp)
    try:
        os.replace(tmp, dest)
    finally:
        # rename(2) between two names of one file does nothing and leaves the temp name behind.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def swap(staged: Path, target: Path, backup: Path | None = None) -> None:
    """Keep the current binary as ``.backup`` (hard link), then one ``os.replace`` onto the target."""
    backup = backup or backup_path(target)
    try:
        _link_over(target, backup, _LINK_TAGS[0])
        os.replace(staged, target)
        fsync_dir(target.parent)
    except OSError as exc:
        raise SwapFailed(f"cannot swap {staged.name} onto {target}: {exc}") from exc
    log.info("swapped %s into place (previous binary kept as %s)", target, backup.name)


def restore(target: Path, backup: Path | None = None, *, expect_sha256: str | None = None) -> None:
    """Put ``.backup`` back onto the target (same atomic way); the backup stays."""
    backup = backup or backup_path(target)
    try:
        info = os.stat(backup)
    except FileNotFoundError:
        raise RestoreFailed(f"no backup {backup} to restore") from None
    except OSError as exc:
        raise RestoreFailed(f"cannot read the backup {backup}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise RestoreFailed(f"backup {backup} is not a regular file")
    if expect_sha256 is not None:
        actual = sha256_or_none(backup)
        if actual != expect_sha256:
            raise RestoreFailed(f"backup {backup} has sha256 {actual}, expected {expect_sha256}")
    try:
        _link_over(backup, target, _LINK_TAGS[1])
        fsync_dir(target.parent)
    except OSError as exc:
        raise RestoreFailed(f"cannot restore {backup} onto {target}: {exc}") from exc
    log.warning("restored %s from %s", target, backup.name)


def cleanup_stale(target: Path, *, keep: Path | None = None, before: float | None = None) -> list[Path]:
    """Remove staged files and swap/restore temp links of ours left next to ``target``.

    Only files older than ``before`` (a ``time.time()``; default now) go, so an attempt never
    removes what it is writing. Call it under the update lock: then every such file is stale.
    The code cache keeps the target's and the backup's builds (:func:`agent.cache.prune_builds`).
    """
    cache.prune_builds(target, backup_path(target))
    before = time.time() if before is None else before
    prefixes = tuple(f".{target.name}{tag}" for tag in (STAGED_TAG, *_LINK_TAGS))
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError as exc:
        log.warning("cannot list %s for stale files: %s", target.parent, exc)
        return removed
    for entry in entries:
        path = Path(entry.path)
        if not entry.name.startswith(prefixes) or path == keep:
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime >= before:
                continue
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove stale %s: %s", path, exc)
            continue
        removed.append(path)
        log.info("removed stale %s", path.name)
    return removed
