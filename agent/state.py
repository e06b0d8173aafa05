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
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.manifest import MAX_SERIAL

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_LOCK_FILE = "state.json.lock"
# Holders keep the lock for milliseconds; this long a wait means something is stuck.
STATE_LOCK_TIMEOUT = 10.0
STATE_LOCK_POLL = 0.005
LOCK_FILE = "update.lock"
CACHED_ENVELOPE = "manifest.json"
CACHED_ETAG = "manifest.etag"
STATE_CORRUPT = "state_corrupt"  # last_error code of a state.json that was set aside


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
    """Move a corrupt file out of the way (``<name>.corrupt.<time>``) so start-up never blocks.

    Never over another set-aside file: each is evidence the operator may want to read.
    """
    stem = f"{path.name}.corrupt.{int(time.time())}"
    aside = path.with_name(stem)
    n = 1
    while aside.exists():
        aside, n = path.with_name(f"{stem}.{n}"), n + 1
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
        """The fields of ``obj`` that type-check (:func:`check_state`); the others take defaults."""
        return check_state(obj)[0]


# ---------------------------------------------------------------- type-checking state.json
#
# DESIGN section 4: "state.json is type-checked field by field on load". A field that does not check
# takes its default (an entry of a list or map that does not check is dropped) and is named as a
# problem; the rest is kept, so a broken last_check never costs the bad-version memory. Unknown
# fields are ignored (a newer agent, or a Go one, may write more).

MAX_STATE_BYTES = 1 << 20  # the agent writes a few KiB; a bigger file is corruption, never read whole
_TEXT_MAX = 4096
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# Old agents accepted serial 0 (DESIGN before issue 10); no manifest can carry more than MAX_SERIAL,
# so a higher "highest" would refuse every release forever.
_SERIAL_RANGE = (0, MAX_SERIAL)


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_text(value: object, limit: int = _TEXT_MAX) -> bool:
    return isinstance(value, str) and len(value) <= limit


def _entry_problem(
    entry: object, types: dict[str, Callable[[object], bool]], required: tuple[str, ...]
) -> str:
    """Why a ``bad_versions`` / ``attempts`` entry does not check ('' if it does)."""
    if not isinstance(entry, dict):
        return f"is {type(entry).__name__}, not an object"
    for name in required:
        if name not in entry:
            return f"has no {name!r}"
    for name, ok in types.items():
        if name in entry and not ok(entry[name]):
            return f"has {name} {_show(entry[name])}"
    return ""


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _optional_text(value: object) -> bool:
    return value is None or _is_text(value)


_BAD_VERSION_FIELDS: dict[str, Callable[[object], bool]] = {
    "version": _is_text,
    "sha256": _is_text,
    "reason": _optional_text,
    "time": _optional_text,
}
_ATTEMPT_FIELDS: dict[str, Callable[[object], bool]] = {
    "version": _is_text,
    "sha256": _is_text,
    "failures": lambda v: _is_int(v, 0, 1 << 31),
    "last_error": _optional_text,
    "last_failure": _optional_text,
    "next_attempt": _optional_text,
}
_ERROR_FIELDS: dict[str, Callable[[object], bool]] = {
    "code": _optional_text,
    "message": _optional_text,
    "state": _optional_text,
}


def check_state(obj: object) -> tuple[AgentState, list[str]]:
    """``state.json``'s object, field by field: the state that checks and one problem per field
    that does not (empty when the whole file is fine)."""
    if not isinstance(obj, dict):
        return AgentState(), [f"the file holds {type(obj).__name__}, not an object"]
    state, problems = AgentState(), []

    def scalar(name: str, ok: Callable[[object], bool], what: str) -> None:
        value = obj.get(name)
        if value is None:
            return
        if ok(value):
            setattr(state, name, value)
        else:
            problems.append(f"{name} {_show(value)} is not {what}")

    scalar(
        "highest_serial", lambda v: _is_int(v, *_SERIAL_RANGE), f"an integer {_SERIAL_RANGE[0]}..{MAX_SERIAL}"
    )
    scalar("highest_digest", lambda v: isinstance(v, str) and _SHA256_RE.fullmatch(v) is not None, "64 hex")
    scalar("last_check", _is_text, "a string")
    scalar("last_result", _is_text, "a string")
    scalar("corrupt", _is_text, "a string")
    scalar("last_error", lambda v: _entry_problem(v, _ERROR_FIELDS, ()) == "", "an error object")

    bad_versions = obj.get("bad_versions")
    if isinstance(bad_versions, list):
        for i, entry in enumerate(bad_versions):
            why = _entry_problem(entry, _BAD_VERSION_FIELDS, ("version", "sha256"))
            if why:
                problems.append(f"bad_versions[{i}] {why}")
            else:
                state.bad_versions.append(entry)
    elif bad_versions is not None:
        problems.append(f"bad_versions {_show(bad_versions)} is not a list")

    attempts = obj.get("attempts")
    if isinstance(attempts, dict):
        for key, entry in attempts.items():
            why = _entry_problem(entry, _ATTEMPT_FIELDS, ())
            if why:
                problems.append(f"attempts[{key!r}] {why}")
            else:
                state.attempts[key] = entry
    elif attempts is not None:
        problems.append(f"attempts {_show(attempts)} is not an object")
    return state, problems


def read_state(state_dir: Path) -> tuple[AgentState, list[str]]:
    """``state.json`` as it is, never written: (what type-checks, the problems). Missing = fresh.

    Raises ``OSError`` only when the file cannot be read at all (not a file, no permission).
    """
    path = state_dir / STATE_FILE
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return AgentState(), []
    if len(data) > MAX_STATE_BYTES:
        return AgentState(), [f"the file is larger than {MAX_STATE_BYTES} bytes"]
    try:
        obj = json.loads(data)
    except RecursionError:
        return AgentState(), ["the JSON is nested too deeply"]
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return AgentState(), [f"not JSON ({exc})"]
    return check_state(obj)


def load_state(state_dir: Path, *, set_aside_corrupt: bool = False) -> AgentState:
    """``state.json``, type-checked (:func:`check_state`); missing = fresh. Never raises for content.

    With ``set_aside_corrupt`` (:func:`state_transaction` does it, under the state lock) a file with
    any problem is moved aside (kept for the operator), logged, and recorded in ``corrupt`` and
    ``last_error`` (``state_corrupt``); the state that checked is returned and saved over it. A plain
    reader never writes. The trust state (highest serial and digest) a broken file loses is rebuilt
    from the cached verified envelope by the next check (:func:`agent.check.rebuild_trust`).
    """
    path = state_dir / STATE_FILE
    state, problems = read_state(state_dir)
    if not problems or not set_aside_corrupt:
        return state
    try:
        aside = set_aside(path)
    except FileNotFoundError:  # gone meanwhile (a process that does not hold the state lock)
        return state
    message = f"{path} was corrupt ({'; '.join(problems[:5])}); set aside as {aside.name}"
    log.error("%s", message)
    state.corrupt = str(aside)
    state.last_error = {"code": STATE_CORRUPT, "message": message[:_TEXT_MAX], "state": "checking"}
    return state


def state_warnings(state_dir: Path) -> tuple[AgentState, list[str]]:
    """``status``: the state as read (never written) and what an operator should know about it."""
    path = state_dir / STATE_FILE
    try:
        state, problems = read_state(state_dir)
    except OSError as exc:
        return AgentState(), [f"cannot read {path}: {exc}"]
    warnings = []
    if problems:
        warnings.append(
            f"{path} is corrupt ({'; '.join(problems[:5])}): the next check sets it aside and rebuilds "
            "the trust state from the cached manifest"
        )
    if state.corrupt and Path(state.corrupt).exists():
        warnings.append(
            f"an earlier {STATE_FILE} was corrupt and is kept as {state.corrupt} (the agent's log says "
            "what was rebuilt); remove it once inspected"
        )
    return state, warnings


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
        state = load_state(state_dir, set_aside_corrupt=True)
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
