"""Durable agent state: atomic JSON files, the state lock and the single-update lock.

Every write is temp file + fsync + ``os.replace`` + directory fsync, so a kill -9 at any
instant leaves either the old or the new file, never a torn one (DESIGN section 4).

``state.json`` is written by several processes (the ``run`` loop's checks, ``update`` and
``rollback`` by hand, the watchdog's rollback). Every read-modify-write is one
:func:`state_transaction`: an exclusive ``flock`` on ``state.json.lock`` (a file of its own, so
the lock survives ``os.replace`` of the state), load, change, save, release. It is held for
milliseconds -- never across a download, a swap or an exec -- so waiting for it is a short
blocking wait with a timeout (:class:`StateBusy` past it). Plain reads need no lock: a reader sees
the old or the new file, whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_LOCK_FILE = "state.json.lock"
# Holders keep the lock for milliseconds; this long a wait means something is stuck.
STATE_LOCK_TIMEOUT = 10.0
STATE_LOCK_POLL = 0.005
LOCK_FILE = "update.lock"
CACHED_ENVELOPE = "manifest.json"
CACHED_ETAG = "manifest.etag"


class LockBusy(Exception):
    """Another update holds the lock: only one runs at a time."""

    code = "update_in_progress"


class StateBusy(TimeoutError):
    """The state lock was not free within the timeout (an ``OSError``: an operational failure)."""

    code = "state_busy"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), mode)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def set_aside(path: Path) -> Path:
    """Move a corrupt file out of the way (``<name>.corrupt.<time>``) so start-up never blocks."""
    aside = path.with_name(f"{path.name}.corrupt.{int(time.time())}")
    os.replace(path, aside)
    return aside


@dataclass
class AgentState:
    """What the agent remembers between runs (``state.json``)."""

    highest_serial: int | None = None
    highest_digest: str | None = None
    last_check: str | None = None
    last_result: str | None = None
    last_error: dict[str, Any] | None = None
    bad_versions: list[dict[str, Any]] = field(default_factory=list)
    attempts: dict[str, dict[str, Any]] = field(default_factory=dict)
    corrupt: str | None = None

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> AgentState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in known})


def load_state(state_dir: Path) -> AgentState:
    """Missing = fresh; corrupt = set aside, logged, and recorded in ``corrupt``."""
    path = state_dir / STATE_FILE
    try:
        obj = json.loads(path.read_bytes())
        if not isinstance(obj, dict):
            raise ValueError("not an object")
        return AgentState.from_dict(obj)
    except FileNotFoundError:
        return AgentState()
    except (ValueError, TypeError) as exc:
        aside = set_aside(path)
        log.error("state file %s is corrupt (%s); set aside as %s", path, exc, aside)
        return AgentState(corrupt=str(aside))


def save_state(state_dir: Path, state: AgentState) -> None:
    write_json_atomic(state_dir / STATE_FILE, asdict(state))


@contextlib.contextmanager
def state_lock(state_dir: Path, timeout: float = STATE_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold ``<state dir>/state.json.lock`` exclusively; ``StateBusy`` after ``timeout`` seconds.

    Close-on-exec, so an exec'd process or a forked-then-exec'd one never inherits it. Not
    re-entrant: a second acquisition in the same process waits for the first (flock locks belong
    to open file descriptions), so never nest transactions.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / STATE_LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StateBusy(f"{path} is still locked after {timeout:g}s") from None
                time.sleep(STATE_LOCK_POLL)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def state_transaction(state_dir: Path, *, timeout: float = STATE_LOCK_TIMEOUT) -> Iterator[AgentState]:
    """Load ``state.json`` under the state lock, yield it to change, save it if no error was raised.

    Keep the body short and free of I/O beyond the state dir: no network, no exec.
    """
    with state_lock(state_dir, timeout):
        state = load_state(state_dir)
        yield state
        save_state(state_dir, state)


@contextlib.contextmanager
def update_lock(state_dir: Path) -> Iterator[int]:
    """Hold the single-update lock; ``LockBusy`` if another process has it.

    The descriptor is close-on-exec (Python's default), so it never leaks into a watchdog or
    an exec'd new version.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockBusy(f"another update holds {state_dir / LOCK_FILE}") from None
        yield fd
    finally:
        os.close(fd)
