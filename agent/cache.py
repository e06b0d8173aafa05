"""Where an agent file unpacks its code, and keeping that place small (DESIGN section 4).

An agent file (packaging/build_agent.py) is a zip archive holding code for every supported
Python. Its ``__main__`` imports this module from the archive (as ``_avika_cache``: the agent
package is not on the path yet) and calls :func:`boot`, which makes the running interpreter's
part of the build importable:

- ``<root>/<build id>/<tag>/`` holds ``site.zip`` (the agent's code, bytecode compiled at build
  time, imported straight from that zip), ``deps.zip`` (the dependencies' pure-Python code, the
  same way) and ``native/`` (the extension modules, which cannot be imported from a zip); a build
  is unpacked once, at its first start, and reused after that. ``deps.zip`` and the native
  libraries are named by content in the file: a blob another build in the root already unpacked
  is hard-linked, not inflated (``blobs.json`` in each tag dir says which file is which blob);
- the root is ``$AVIKA_AGENT_CACHE``, else ``/var/cache/avika-agent``, else
  ``$XDG_CACHE_HOME/avika-agent`` (``~/.cache/avika-agent``) when the first is not writable; a root
  must be a directory this user owns that nobody else can write to (it holds code this user runs);
- unpacking goes to a private temporary directory, every file fsynced, then one rename into place:
  a start sees a complete build or none, whatever was killed when (or lost power);
- after :func:`boot` the agent file is never read again: an update may replace it while this
  process runs, and anything imported late comes from this build's own ``site.zip``.

Bounded: after a commit or a rollback :func:`prune_builds` keeps the builds of the target and of
its backup only (and temporary directories of live processes). A smoke test runs the new file
with :func:`private_root`, removed afterwards; when the test passes, :func:`adopt` first keeps
what it unpacked as that build's code, so the new version's first start after the swap (the
restart's hot path) unpacks nothing. Standard library only, and nothing from the agent: this
module runs before anything else of the build is importable.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from importlib.machinery import ExtensionFileLoader, ModuleSpec
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_VAR = "AVIKA_AGENT_CACHE"
SYSTEM_ROOT = Path("/var/cache/avika-agent")
# The metadata every agent file carries (DESIGN section 6); a copy sits in each unpacked build's dir.
BUILD_INFO = "avika-build.json"
# The name this module has when the agent file's __main__ imports it from the archive.
BOOT_MODULE = "_avika_cache"
SITE = "site.zip"
DEPS = "deps.zip"
DEPS_BLOBS = "deps"  # in the agent file: deps/<sha256>, one dependencies' zip per Python
NATIVE = "native"
BLOBS_INDEX = "blobs.json"  # in an unpacked tag dir: {path in the tag dir: blob}, for sharing by link
TMP_PREFIX = ".tmp-"  # an unpacking in progress: .tmp-<pid>-<random>
PRIVATE_PREFIX = ".private-"  # a throwaway root for a smoke test: .private-<pid>-<random>
# A temporary directory of a live process is kept unless it is older than this (pid reuse).
STALE_AFTER = 3600.0
COPY_CHUNK = 1024 * 1024
# <version>-<16 hex digits>: a build dir's name even before its avika-build.json is written.
_BUILD_ID = re.compile(r"^[0-9A-Za-z.+!_-]+-[0-9a-f]{16}$")

# What boot() did in this process (the copy imported as _avika_cache holds it); None otherwise.
BOOTED: dict[str, Any] | None = None


class CacheError(Exception):
    """No usable cache directory, or the build could not be unpacked into it."""


# ---------------------------------------------------------------- where


def candidates(environ: Mapping[str, str]) -> list[Path]:
    explicit = environ.get(ENV_VAR)
    if explicit:
        return [Path(explicit)]
    home = environ.get("HOME") or os.path.expanduser("~")
    user = environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    return [SYSTEM_ROOT, Path(user) / "avika-agent"]


def unusable(path: Path) -> str | None:
    """Why ``path`` (created if missing) cannot hold this user's code, or None if it can."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.stat(path)
        read_only = os.statvfs(path).f_flag & os.ST_RDONLY
    except OSError as exc:
        return exc.strerror or str(exc)
    if not stat.S_ISDIR(info.st_mode):
        return "not a directory"
    if info.st_uid != os.geteuid():
        return f"owned by uid {info.st_uid}, not by this user ({os.geteuid()})"
    if info.st_mode & 0o022:
        return f"writable by others (mode {stat.S_IMODE(info.st_mode):o})"
    if read_only or not os.access(path, os.W_OK | os.X_OK):
        return "not writable"
    return None


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """The first usable candidate; ``CacheError`` naming each one and why not."""
    environ = os.environ if environ is None else environ
    reasons = []
    for path in candidates(environ):
        why = unusable(path)
        if why is None:
            return path
        reasons.append(f"{path}: {why}")
    raise CacheError(
        f"no usable directory for the agent's code ({'; '.join(reasons)}); "
        f"set {ENV_VAR} to a directory this user owns"
    )


# ---------------------------------------------------------------- unpack and import


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_member(archive: zipfile.ZipFile, member: str, dest: Path, mode: int, durable: bool = True) -> int:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(member) as src, open(dest, "xb") as out:
        shutil.copyfileobj(src, out, COPY_CHUNK)
        out.flush()
        os.fchmod(out.fileno(), mode)
        if durable:
            os.fsync(out.fileno())
        return out.tell()


def _write_build_info(archive: zipfile.ZipFile, build_dir: Path, durable: bool = True) -> None:
    """A copy of the metadata beside the unpacked code: what an operator (or a prune) looks at."""
    final = build_dir / BUILD_INFO
    if final.exists():
        return
    tmp = build_dir / f"{TMP_PREFIX}{os.getpid()}-{BUILD_INFO}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    _copy_member(archive, BUILD_INFO, tmp, 0o644, durable)
    os.replace(tmp, final)


def _donors(root: Path) -> dict[str, Path]:
    """Blob -> an unpacked file with that content, in ``root`` or, for a private root, in the root
    it sits in: a build whose dependencies did not change links them, not inflates."""
    roots = [root, root.parent] if root.name.startswith(PRIVATE_PREFIX) else [root]
    found: dict[str, Path] = {}
    for top in roots:
        for index in top.glob(f"*/cp*/{BLOBS_INDEX}"):
            try:
                entries = json.loads(index.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(entries, dict):
                for relative, blob in entries.items():
                    path = Path(os.path.normpath(index.parent / str(relative)))
                    if index.parent in path.parents:  # an index names files of its own dir only
                        found.setdefault(str(blob), path)
    return found


def _place(
    archive: zipfile.ZipFile, member: str, dest: Path, donor: Path | None, mode: int, durable: bool
) -> None:
    """Link ``donor`` (same blob: same bytes) at ``dest`` if it is intact, else inflate ``member``."""
    if donor is not None:
        try:
            if donor.stat().st_size == archive.getinfo(member).file_size:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.link(donor, dest)
                return
        except OSError:
            pass
    _copy_member(archive, member, dest, mode, durable)


def unpack(archive: str, build: Mapping[str, Any], tag: str, root: Path) -> Path:
    """Unpack ``tag``'s part of the build under ``root`` (once: a concurrent start may win).

    The dependencies' zip and native libraries another build in the root already unpacked (same
    blob) are hard-linked, not inflated. In a :func:`private_root` (a smoke test's) nothing is
    fsynced.
    """
    build_dir = root / build["build_id"]
    home = build_dir / tag
    part = build["tags"][tag]
    durable = not root.name.startswith(PRIVATE_PREFIX)
    for _ in range(2):  # a prune may remove a fresh build dir between mkdir and rename: once more
        build_dir.mkdir(mode=0o700, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=root))
        try:
            donors = _donors(root)
            blobs = {f"{NATIVE}/{rel}": (member, 0o755) for rel, member in part["natives"].items()}
            if part.get("deps"):
                blobs[DEPS] = (part["deps"], 0o644)
            index = {rel: member.rsplit("/", 1)[-1] for rel, (member, _) in blobs.items()}
            with zipfile.ZipFile(archive) as zf:
                _write_build_info(zf, build_dir, durable)
                _copy_member(zf, f"{tag}/{SITE}", tmp / SITE, 0o644, durable)
                for relative, (member, mode) in sorted(blobs.items()):
                    _place(zf, member, tmp / relative, donors.get(index[relative]), mode, durable)
            (tmp / BLOBS_INDEX).write_text(json.dumps(index, sort_keys=True))
            for directory in sorted({p for p in tmp.rglob("*") if p.is_dir()} | {tmp}, reverse=True):
                if durable:
                    _fsync(directory)
            try:
                os.rename(tmp, home)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue
                if not home.is_dir():
                    raise
            if durable:
                _fsync(build_dir)
            return home
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise CacheError(f"{build_dir} disappeared twice while unpacking into it")


class NativeFinder:
    """Finds the build's extension modules in its ``native/`` directory (not importable from a zip)."""

    def __init__(self, modules: Mapping[str, str]) -> None:
        self.modules = dict(modules)

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        location = self.modules.get(fullname)
        if location is None:
            return None
        spec = ModuleSpec(fullname, ExtensionFileLoader(fullname, location), origin=location)
        spec.has_location = True
        return spec


def boot(archive: str, build: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Make this interpreter's part of the build importable (unpacking it on its first start).

    The archive leaves ``sys.path``: from here on nothing is read from the agent file.
    """
    global BOOTED
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    part = build["tags"][tag]
    root = cache_root(environ)
    home = root / build["build_id"] / tag
    if not home.is_dir():
        try:
            unpack(archive, build, tag, root)
        except (OSError, zipfile.BadZipFile, KeyError) as exc:
            raise CacheError(f"cannot unpack {archive} into {root}: {exc}") from exc
    real = os.path.realpath(archive)
    ours = [str(home / SITE)] + ([str(home / DEPS)] if part.get("deps") else [])
    sys.path[:] = ours + [
        p for p in sys.path if os.path.realpath(p) != real and not p.startswith(archive + os.sep)
    ]
    natives = {name: str(home / NATIVE / relative) for name, relative in part["modules"].items()}
    sys.meta_path.insert(0, NativeFinder(natives))
    BOOTED = {
        "root": str(root),
        "build_id": build["build_id"],
        "tag": tag,
        "archive": real,
        "bytes": int(part["bytes"]),
    }
    return BOOTED


def booted() -> dict[str, Any] | None:
    """What :func:`boot` did for this process, or None when it does not run from an agent file."""
    return getattr(sys.modules.get(BOOT_MODULE), "BOOTED", None)


# ---------------------------------------------------------------- metadata


def read_build_info(path: Path | str) -> dict[str, Any]:
    """The ``avika-build.json`` of an agent file, read without running it.

    Raises ``ValueError`` naming what is wrong (not a zip archive, no metadata, not a JSON object).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            try:
                raw = archive.read(BUILD_INFO)
            except KeyError:
                raise ValueError(f"{path} is a zip archive without {BUILD_INFO}") from None
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a zip archive (an agent file is one)") from None
    try:
        info = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{BUILD_INFO} in {path} is not JSON: {exc}") from None
    if not isinstance(info, dict):
        raise ValueError(f"{BUILD_INFO} in {path} is not a JSON object")
    return info


def build_id_of(path: Path | str) -> str | None:
    """The build id of the agent file at ``path``; None for a missing file or another program."""
    try:
        build_id = read_build_info(path).get("build_id")
    except (OSError, ValueError):
        return None
    return build_id if isinstance(build_id, str) and _BUILD_ID.match(build_id) else None


# ---------------------------------------------------------------- keeping it small


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temporary_in_use(name: str, mtime: float, now: float) -> bool:
    """A ``.tmp-``/``.private-`` directory another live process is still using."""
    found = re.match(r"^\.[a-z]+-(\d+)-", name)
    return bool(found) and _pid_alive(int(found[1])) and now - mtime < STALE_AFTER


def prune(root: Path, keep: Iterable[str], *, now: float | None = None) -> list[str]:
    """Remove every build under ``root`` but ``keep``, and temporary directories nobody uses.

    Only what this module creates is touched (build dirs, ``.tmp-*``, ``.private-*``): a root
    pointed at a shared directory by mistake loses nothing else. Returns the names removed.
    """
    now = time.time() if now is None else now
    keep = set(keep)
    removed = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir(follow_symlinks=False):
            continue
        name = entry.name
        if name.startswith((TMP_PREFIX, PRIVATE_PREFIX)):
            if _temporary_in_use(name, entry.stat(follow_symlinks=False).st_mtime, now):
                continue
        elif name in keep or not (
            _BUILD_ID.match(name) or os.path.isfile(os.path.join(entry.path, BUILD_INFO))
        ):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.exists(entry.path):
            removed.append(name)
    return removed


def prune_builds(target: Path | str, backup: Path | str) -> list[str]:
    """After a commit or a rollback: keep the target's and the backup's builds, nothing else.

    A process not started from an agent file has no cache of its own: nothing to do. When neither
    file is an agent build (``UPDATE_TARGET`` names another program) this process's build stays.
    Never raises: a cache that cannot be tidied is logged, not a failed update.
    """
    facts = booted()
    if facts is None:
        return []
    root = Path(facts["root"])
    try:
        keep = {b for b in (build_id_of(target), build_id_of(backup)) if b is not None}
        removed = prune(root, keep or {facts["build_id"]})
    except OSError as exc:
        log.warning("cannot tidy the agent's code cache %s: %s", root, exc)
        return []
    if removed:
        log.info("removed %d unused build(s) from %s: %s", len(removed), root, ", ".join(removed))
    return removed


@contextlib.contextmanager
def private_root() -> Iterator[Path]:
    """A throwaway cache root for running another agent file once (the smoke test), then removed.

    It sits in this process's own root, so on the filesystem the pre-flight counted, and the
    file's unpacked code is gone when the block ends, whatever happened in it.
    """
    facts = booted()
    base = facts["root"] if facts else None
    path = Path(tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{os.getpid()}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(top: Path) -> None:
    for path in sorted(top.rglob("*"), reverse=True):
        if path.is_file() or path.is_dir():
            _fsync(path)
    _fsync(top)


def adopt(private: Path, build_id: str | None) -> bool:
    """Keep a passed smoke test's unpacking (in ``private``) as ``build_id``'s code in this root.

    Made durable here (the smoke test itself fsyncs nothing), then moved in with one rename per
    Python; False if there is nothing to keep (not running from an agent file, not an agent build).
    """
    facts = booted()
    if facts is None or build_id is None or not (private / build_id).is_dir():
        return False
    source, dest = private / build_id, Path(facts["root"]) / build_id
    _fsync_tree(source)
    if not dest.exists():
        with contextlib.suppress(FileExistsError, OSError):
            os.rename(source, dest)
    else:  # another Python's code of this build is there already: add this one's
        for part in source.iterdir():
            if not (dest / part.name).exists():
                with contextlib.suppress(OSError):
                    os.rename(part, dest / part.name)
    _fsync(Path(facts["root"]))
    if dest.is_dir():
        _fsync(dest)
        return True
    return False


def space_needed() -> tuple[Path, int] | None:
    """(root, bytes) a new build's unpacked code will take, estimated by this build's; None if
    this process does not run from an agent file (nothing will be unpacked for it)."""
    facts = booted()
    return (Path(facts["root"]), int(facts["bytes"])) if facts else None
