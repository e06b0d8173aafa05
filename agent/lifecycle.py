"""The VM update as a state machine: apply, resume after a restart, commit or roll back (DESIGN section 4).

States are DESIGN's reported names (:class:`State`); every move is one row of
:data:`TRANSITIONS` (from state, event) -> to state, and every state entered is emitted through
an :class:`agent.events.EventSink`. Asking for a move the table lacks is a ``RuntimeError``: our
bug, never a fleet condition.

    checking --found--> update_available --start--> downloading --done--> verifying
        --done--> staged --done--> restarting --booted--> watching --commit--> committed
    any step --fail--> failed           restarting | watching --rollback--> rolled_back

The one record that crosses an ``exec`` or a restart between versions is the pending record,
``<state dir>/pending.json`` (contract), written atomically BEFORE the swap::

    {"from_version", "to_version", "from_sha256", "to_sha256", "target", "backup",
     "serial", "boots", "swapped_at", "deadline"}

``deadline`` = ``swapped_at`` + ``UPDATE_COMMIT_DEADLINE`` (default: the health window + 10 min).
Absent = no update in flight. Corrupt = set aside (``pending.json.corrupt.<time>``) and reported
(``pending_corrupt``): not JSON, not an object, a field missing or of the wrong type, a hash that
is not 64 lowercase hex digits, a path that is not absolute or a backup that is not
``<target>.backup``, an unparsable time, a negative boot count, a serial outside 0 ... 2^53-1, a
file over 64 KiB, or anything that is not a regular file. No content of that file can make the
agent fail with a traceback (:func:`read_pending`).

On start (:func:`resume`) the target is hashed to learn where a killed transaction stopped
(:func:`plan_start`):

- target == ``to_sha256`` (swapped): ``boots`` += 1, durably, first; boots > max -> roll back
  (``too_many_boots``); now > deadline -> roll back (``commit_deadline_passed``); else watch.
- target == ``from_sha256`` and ``boots`` == 0: killed before the swap -> drop the record, report
  ``failed`` (``interrupted_before_swap``); the next check tries again after the back-off.
- target == ``from_sha256`` and ``boots`` > 0: killed during a rollback, after the restore ->
  finish it (drop the record, report ``rolled_back``).
- neither: the target was replaced behind our back -> restore ``.backup`` if it is the old
  binary (``target_replaced``), else drop the record.

Commit (:func:`watch_verdict`) when the process stayed up ``UPDATE_HEALTH_WINDOW`` and, since its
start, one manifest check succeeded and (when reporting is configured) one report was delivered;
past the deadline without that, roll back. A rollback (:func:`rollback`) first remembers the
bad version in ``state.json``, then restores, then drops the record, so a kill at any point
finishes it on the next start. The run loop commits and rolls back under the single-update lock
(:func:`update_lock_waiting`), so the watchdog, which takes the same lock before it kills a hung
agent, never kills one that is finishing its own update.

Why a version was rolled back decides whether it is tried again. Bad versions are remembered by
(version, sha256) with their reason:

- a crash (``too_many_boots``, ``died_before_commit``), a hang (``hung``) or an operator's
  rollback (``manual_rollback``) -- :data:`PERMANENT_REASONS` -- is never installed again unless a
  manifest names that version with other bytes: these are defects of the build;
- ``commit_deadline_passed`` is retried after the back-off: the version's loop was alive and
  rolled itself back because no manifest check or no report got through in time, which may be
  only the network.

A hang is told apart from a miss by who acts. A live loop judges its own commit at the deadline
(it wakes for it) and rolls back by itself. One that has not acted by the deadline plus a grace --
``UPDATE_FETCH_TIMEOUT`` (the longest a live loop may be inside a check) plus
:data:`HANG_MARGIN` -- is hung: outside systemd the watchdog kills it (TERM, KILL after 10 s),
restores the backup, starts the old version and reports ``rolled_back`` with ``hung``
(:mod:`agent.restart`). Under systemd the unit's ``WatchdogSec=`` restarts a loop that stops
pinging, every restart is a counted boot, and the boot cap rolls it back as ``too_many_boots``:
remembered for good as well.

:func:`blocked_pairs` (state + ``now``) is the one statement of that rule; ``check`` decides with it.
Every failed attempt at a (version, sha256) backs off: ``interval * 2**failures``, at most 6 h
(``state.attempts``), so a fleet never re-downloads a bad binary every interval.

Every change to ``state.json`` is one :func:`agent.state.state_transaction` (short: never across a
download, a restore of the binary or an exec), so a check in ``run`` and an ``update`` by hand
never lose each other's writes.

Decisions are pure functions of data and ``now`` (tested without processes); the I/O around them
is :func:`apply_update`, :func:`resume`, :func:`commit` and :func:`rollback`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import resource
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any

from agent import cache, install
from agent.config import AgentConfig
from agent.events import EventSink
from agent.fetch import ChecksumMismatch, DownloadError, DownloadStopped, Fetcher
from agent.manifest import MAX_SERIAL, Manifest, format_time, parse_time, resolve_url
from agent.state import (
    AgentState,
    LockBusy,
    fsync_dir,
    set_aside,
    state_transaction,
    update_lock,
    write_json_atomic,
)

log = logging.getLogger(__name__)


class StrEnum(str, Enum):
    """``enum.StrEnum`` (Python 3.11) on 3.9: members are their values in ``str()`` and f-strings."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


PENDING_FILE = "pending.json"
# A pending record is a few hundred bytes; anything this large is not one (and is not read whole).
MAX_RECORD_BYTES = 64 * 1024
# Past the commit deadline, a live loop may still be inside a check (UPDATE_FETCH_TIMEOUT); this
# much more covers a state-lock wait (10 s at most) and a slow disk before a loop counts as hung.
HANG_MARGIN = 20
MAX_BACKOFF = 6 * 3600
# Remembered entries are capped so a host that sees many releases keeps a small state file.
MAX_BAD_VERSIONS = 64
MAX_ATTEMPTS_KEPT = 16

TOO_MANY_BOOTS = "too_many_boots"
DIED_BEFORE_COMMIT = "died_before_commit"
COMMIT_DEADLINE_PASSED = "commit_deadline_passed"
MANUAL_ROLLBACK = "manual_rollback"
INTERRUPTED_BEFORE_SWAP = "interrupted_before_swap"
TARGET_REPLACED = "target_replaced"
PENDING_CORRUPT = "pending_corrupt"
UPDATE_IN_PROGRESS = "update_in_progress"
HUNG = "hung"
# A version that crashed, hung, or that an operator rolled back, is never installed again with the
# same bytes; one whose live loop only missed the commit deadline is retried after the back-off.
PERMANENT_REASONS = frozenset({TOO_MANY_BOOTS, DIED_BEFORE_COMMIT, HUNG, MANUAL_ROLLBACK})


# ---------------------------------------------------------------- states and transitions


class State(StrEnum):
    CHECKING = "checking"
    UPDATE_AVAILABLE = "update_available"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    RESTARTING = "restarting"
    WATCHING = "watching"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


class Event(StrEnum):
    FOUND = "found"  # a check decided to update (or, in a container, to report)
    START = "start"  # the transaction holds the lock and no record is pending
    DONE = "done"  # the state's step succeeded
    FAIL = "fail"  # the state's step failed
    BOOTED = "booted"  # the new version started and counted its boot
    COMMIT = "commit"
    ROLLBACK = "rollback"


S, E = State, Event
TRANSITIONS: Mapping[tuple[State, Event], State] = {
    (S.CHECKING,         E.FOUND):    S.UPDATE_AVAILABLE,
    (S.CHECKING,         E.FAIL):     S.FAILED,
    (S.UPDATE_AVAILABLE, E.START):    S.DOWNLOADING,
    (S.UPDATE_AVAILABLE, E.FAIL):     S.FAILED,
    (S.DOWNLOADING,      E.DONE):     S.VERIFYING,    # every byte in, size within the cap
    (S.DOWNLOADING,      E.FAIL):     S.FAILED,       # pre-flight, network, size
    (S.VERIFYING,        E.DONE):     S.STAGED,       # sha256 matched, smoke test passed
    (S.VERIFYING,        E.FAIL):     S.FAILED,
    (S.STAGED,           E.DONE):     S.RESTARTING,   # pending record written, swapped
    (S.STAGED,           E.FAIL):     S.FAILED,       # nothing swapped
    (S.RESTARTING,       E.BOOTED):   S.WATCHING,
    (S.RESTARTING,       E.ROLLBACK): S.ROLLED_BACK,
    (S.RESTARTING,       E.FAIL):     S.FAILED,
    (S.WATCHING,         E.COMMIT):   S.COMMITTED,
    (S.WATCHING,         E.ROLLBACK): S.ROLLED_BACK,
    (S.WATCHING,         E.FAIL):     S.FAILED,
}  # fmt: skip
del S, E


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise RuntimeError(f"no transition from {state} on {event}") from None


@dataclass
class Tracker:
    """One update's current state; :meth:`post` moves it by the table and reports the new state."""

    sink: EventSink
    state: State
    target_version: str | None
    serial: int | None
    in_wave: bool | None = None
    image: str | None = None
    chain: list[State] = field(default_factory=list)

    def post(self, event: Event, *, code: str | None = None, message: str | None = None) -> State:
        new = next_state(self.state, event)
        failed_state = self.state.value if new in (State.FAILED, State.ROLLED_BACK) else None
        error = None if code is None else (f"{code}: {message}" if message else code)
        self.sink.emit(
            new.value,
            target_version=self.target_version,
            manifest_serial=self.serial,
            failed_state=failed_state,
            error=error,
            image=self.image,
            in_wave=self.in_wave,
        )
        self.state = new
        self.chain.append(new)
        return new


# ---------------------------------------------------------------- the pending record


class PendingCorrupt(Exception):
    code = PENDING_CORRUPT

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Pending:
    """``pending.json`` (contract). Times are RFC 3339 UTC strings, hashes lowercase hex."""

    from_version: str
    to_version: str
    from_sha256: str
    to_sha256: str
    target: str
    backup: str
    serial: int
    boots: int
    swapped_at: str
    deadline: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: object) -> Pending:
        """Strict: every field present with its type and shape (extra fields are ignored: a newer
        writer). ``ValueError`` naming the first field that is wrong."""
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = obj.get(f.name)
            kind = int if f.type in ("int", int) else str
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"field {f.name!r} is missing or not {kind.__name__}")
            values[f.name] = value
        pending = cls(**values)
        for name in ("from_sha256", "to_sha256"):
            if not _SHA256.fullmatch(getattr(pending, name)):
                raise ValueError(f"field {name!r} is not 64 lowercase hex digits")
        if not pending.target.startswith("/") or "\0" in pending.target:
            raise ValueError("field 'target' is not an absolute path")
        if pending.backup != str(install.backup_path(Path(pending.target))):
            raise ValueError("field 'backup' is not the target's .backup")
        if not 0 <= pending.serial <= MAX_SERIAL:
            raise ValueError("field 'serial' is out of range")
        if pending.boots < 0:
            raise ValueError("field 'boots' is negative")
        for name in ("swapped_at", "deadline"):
            try:
                parse_time(getattr(pending, name))
            except (ValueError, OverflowError) as exc:
                raise ValueError(f"field {name!r}: {exc}") from None
        return pending

    @property
    def deadline_time(self) -> datetime:
        return parse_time(self.deadline)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def pending_path(state_dir: Path) -> Path:
    return state_dir / PENDING_FILE


def read_record(path: Path, limit: int = MAX_RECORD_BYTES) -> bytes | None:
    """The bytes of a small record file; None if there is none.

    ``ValueError`` if ``path`` is not a regular file (a directory, a FIFO: opened without blocking,
    a symlink is not followed) or holds more than ``limit`` bytes; ``OSError`` if it cannot be read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW on a symlink
            raise ValueError("a symbolic link, not a file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise ValueError(f"larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_pending(state_dir: Path, *, set_aside_corrupt: bool = True) -> Pending | None:
    """None if no update is in flight; ``PendingCorrupt`` (after setting the file aside) if unusable.

    Whatever the file holds, the only outcomes are a record, None or ``PendingCorrupt``.
    """
    path = pending_path(state_dir)
    try:
        data = read_record(path)
        if data is None:
            return None
        return Pending.from_dict(json.loads(data))
    # JSONDecodeError and UnicodeDecodeError are ValueErrors; deep nesting is a RecursionError.
    except (ValueError, RecursionError, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(exc, RecursionError):
            reason = "nested too deeply"
        message = f"{path} is corrupt ({reason[:200]})"
        if set_aside_corrupt:
            try:
                message += f"; set aside as {set_aside(path).name}"
            except OSError as aside_error:
                message += f"; could not set it aside: {aside_error.strerror or aside_error}"
        raise PendingCorrupt(message) from None


def write_pending(state_dir: Path, pending: Pending) -> None:
    write_json_atomic(pending_path(state_dir), pending.to_dict())


def clear_pending(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pending_path(state_dir))
    fsync_dir(state_dir)


@contextlib.contextmanager
def update_lock_waiting(state_dir: Path, timeout: float) -> Iterator[None]:
    """:func:`agent.state.update_lock`, waiting up to ``timeout`` seconds for a short holder.

    For the steps that end an update (resume, commit, rollback) and the watchdog's kill of a hung
    agent: each holds the lock for moments, so they wait for each other instead of failing.
    ``LockBusy`` if it is still held after ``timeout`` (a download by hand holds it for minutes).
    """
    held = contextlib.ExitStack()
    end = time.monotonic() + timeout
    while True:
        try:
            held.enter_context(update_lock(state_dir))
            break
        except LockBusy:
            if time.monotonic() >= end:
                raise
            time.sleep(0.05)
    with held:
        yield


# ---------------------------------------------------------------- pure decisions


def new_pending(
    *,
    from_version: str,
    to_version: str,
    from_sha256: str,
    to_sha256: str,
    target: Path,
    serial: int,
    now: datetime,
    commit_deadline: int,
) -> Pending:
    """The record of a swap at ``now``; ``commit_deadline`` is ``AgentConfig.commit_deadline_s``."""
    return Pending(
        from_version=from_version,
        to_version=to_version,
        from_sha256=from_sha256,
        to_sha256=to_sha256,
        target=str(target),
        backup=str(install.backup_path(target)),
        serial=serial,
        boots=0,
        swapped_at=format_time(now),
        deadline=format_time(_ceil_second(now + timedelta(seconds=commit_deadline))),  # never shorter
    )


class Start(StrEnum):
    WATCH = "watch"
    ROLLBACK = "rollback"
    NOT_SWAPPED = "not_swapped"
    FINISH_ROLLBACK = "finish_rollback"
    TARGET_REPLACED = "target_replaced"


@dataclass(frozen=True)
class StartPlan:
    """What a starting agent does about the record in flight (:func:`plan_start`)."""

    action: Start
    pending: Pending  # with the boot counted, for WATCH and ROLLBACK
    reason: str | None = None


def plan_start(pending: Pending, target_sha256: str | None, *, now: datetime, max_boots: int) -> StartPlan:
    """What a starting agent does about a pending record (module docstring, in this order)."""
    if target_sha256 == pending.to_sha256:
        counted = replace(pending, boots=pending.boots + 1)
        if counted.boots > max_boots:
            return StartPlan(Start.ROLLBACK, counted, TOO_MANY_BOOTS)
        if now > pending.deadline_time:
            return StartPlan(Start.ROLLBACK, counted, COMMIT_DEADLINE_PASSED)
        return StartPlan(Start.WATCH, counted)
    if target_sha256 == pending.from_sha256:
        if pending.boots == 0:
            return StartPlan(Start.NOT_SWAPPED, pending, INTERRUPTED_BEFORE_SWAP)
        return StartPlan(Start.FINISH_ROLLBACK, pending)
    return StartPlan(Start.TARGET_REPLACED, pending, TARGET_REPLACED)


class Verdict(StrEnum):
    WAIT = "wait"
    COMMIT = "commit"
    ROLLBACK = "rollback"


def watch_verdict(
    *, now: datetime, deadline: datetime, uptime: float, health_window: int, fetched: bool, reported: bool
) -> Verdict:
    """Commit once healthy (up for the window, a check and, if configured, a report succeeded)."""
    if uptime >= health_window and fetched and reported:
        return Verdict.COMMIT
    if now > deadline:
        return Verdict.ROLLBACK
    return Verdict.WAIT


def attempt_key(version: str, sha256: str) -> str:
    return f"{version}/{sha256}"


def backoff_delay(failures: int, interval: int) -> int:
    """Seconds to wait after ``failures`` failed attempts: ``interval * 2**failures``, capped at 6 h."""
    return min(interval * 2 ** min(failures, 32), MAX_BACKOFF)


def record_failure(
    attempts: Mapping[str, Any], version: str, sha256: str, code: str, *, now: datetime, interval: int
) -> dict[str, Any]:
    """``attempts`` with one more failure at (version, sha256) and its next allowed attempt."""
    key = attempt_key(version, sha256)
    previous = attempts.get(key)
    failures = (previous.get("failures", 0) if isinstance(previous, dict) else 0) + 1
    entry = {
        "version": version,
        "sha256": sha256,
        "failures": failures,
        "last_error": code,
        "last_failure": format_time(now),
        "next_attempt": format_time(_ceil_second(now + timedelta(seconds=backoff_delay(failures, interval)))),
    }
    kept = {k: v for k, v in attempts.items() if k != key}
    newest = sorted(
        kept.items(), key=lambda kv: str(kv[1].get("last_failure", "")) if isinstance(kv[1], dict) else ""
    )
    return dict(newest[-(MAX_ATTEMPTS_KEPT - 1) :]) | {key: entry}


def _ceil_second(moment: datetime) -> datetime:
    """Times are stored in whole seconds: round up, so a back-off is never shorter than asked."""
    return moment if moment.microsecond == 0 else moment.replace(microsecond=0) + timedelta(seconds=1)


def next_attempt(attempts: Mapping[str, Any], version: str, sha256: str) -> datetime | None:
    entry = attempts.get(attempt_key(version, sha256))
    if not isinstance(entry, dict):
        return None
    try:
        return parse_time(entry["next_attempt"])
    except (KeyError, ValueError):
        return None


def may_attempt(attempts: Mapping[str, Any], version: str, sha256: str, *, now: datetime) -> bool:
    when = next_attempt(attempts, version, sha256)
    return when is None or now >= when


def forget_attempts(attempts: Mapping[str, Any], version: str, sha256: str) -> dict[str, Any]:
    return {k: v for k, v in attempts.items() if k != attempt_key(version, sha256)}


def remember_bad(
    bad_versions: list[dict[str, Any]], version: str, sha256: str, reason: str, *, now: datetime
) -> list[dict[str, Any]]:
    """``bad_versions`` with (version, sha256) recorded for ``reason`` (a crash is never downgraded)."""
    old = bad_reason(bad_versions, version, sha256)
    if old in PERMANENT_REASONS and reason not in PERMANENT_REASONS:
        reason = old
    kept = [e for e in bad_versions if not _same(e, version, sha256)]
    entry = {"version": version, "sha256": sha256, "reason": reason, "time": format_time(now)}
    return [*kept[-(MAX_BAD_VERSIONS - 1) :], entry]


def forget_bad(bad_versions: list[dict[str, Any]], version: str, sha256: str) -> list[dict[str, Any]]:
    return [e for e in bad_versions if not _same(e, version, sha256)]


def _same(entry: object, version: str, sha256: str) -> bool:
    return isinstance(entry, dict) and entry.get("version") == version and entry.get("sha256") == sha256


def bad_reason(bad_versions: list[dict[str, Any]], version: str, sha256: str) -> str | None:
    for entry in bad_versions:
        if _same(entry, version, sha256):
            return str(entry.get("reason") or DIED_BEFORE_COMMIT)
    return None


def blocked_pairs(state: AgentState, *, now: datetime, ignore_backoff: bool = False) -> set[tuple[str, str]]:
    """The (version, sha256) pairs not to install at ``now`` (DESIGN section 4, bad versions).

    A pair remembered for a permanent reason (a crash, a hang, an operator's rollback) is blocked
    for good. One remembered for another reason (``commit_deadline_passed``: maybe only the network)
    is blocked while its attempt backs off (``state.attempts``), then tried again; with
    ``ignore_backoff`` (``update --force``) not at all.
    """
    blocked = set()
    for entry in state.bad_versions:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("version"), str)
            and isinstance(entry.get("sha256"), str)
        ):
            continue
        pair = (entry["version"], entry["sha256"])
        permanent = (entry.get("reason") or DIED_BEFORE_COMMIT) in PERMANENT_REASONS
        backing_off = not ignore_backoff and not may_attempt(state.attempts, *pair, now=now)
        if permanent or backing_off:
            blocked.add(pair)
    return blocked


# ---------------------------------------------------------------- I/O: apply


class UpdateFailed(Exception):
    """The transaction stopped; ``state`` is where (DESIGN section 4 name), nothing was swapped."""

    def __init__(self, code: str, message: str, state: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.state = state


class UpdateInProgress(Exception):
    code = UPDATE_IN_PROGRESS

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Steps:
    """The install steps, each replaceable (tests inject faults; Elastic's upgrade.go shape)."""

    preflight: Callable[[Path, int], Path] = install.check_room
    ask_owner: Callable[[Path, Path], install.OwnerQuery] = install.OwnerQuery
    cleanup: Callable[..., list[Path]] = install.cleanup_stale
    stage: Callable[[Path, str, Callable[[int], object]], Path] = install.stage
    smoke_test: Callable[[Path, str], None] = install.smoke_test
    hash_file: Callable[[Path], str] = install.sha256_file
    swap: Callable[[Path, Path, Path], None] = install.swap


def _fail_attempt(
    config: AgentConfig, version: str, sha256: str, code: str, message: str, state: str, now: datetime
) -> None:
    with state_transaction(config.state_dir) as saved:
        saved.attempts = record_failure(
            saved.attempts, version, sha256, code, now=now, interval=config.update_interval
        )
        saved.last_result = State.FAILED.value
        saved.last_error = {"code": code, "message": message, "state": state}


def peak_rss_kib() -> int:
    """This process's peak resident set so far, KiB: ``VmHWM`` of /proc/self/status.

    Not ``ru_maxrss``: Linux carries that across ``exec``, so it would report the parent's image
    this process was forked from (e.g. a big supervisor) rather than the agent's own peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def apply_update(
    config: AgentConfig,
    manifest: Manifest,
    *,
    platform: str,
    manifest_url: str,
    from_version: str,
    fetcher: Fetcher,
    sink: EventSink,
    restart: Callable[[Pending], None],
    now: Callable[[], datetime],
    in_wave: bool | None = None,
    steps: Steps = Steps(),
) -> Pending:
    """Download, verify, stage, record, swap, restart. The caller holds ``state.update_lock``.

    Raises ``UpdateInProgress`` if a record is pending and ``UpdateFailed`` (after reporting
    ``failed``, removing the staged file and recording the attempt for the back-off) if a step
    fails before the swap. ``restart`` may not return (exec).
    """
    if read_pending(config.state_dir) is not None:
        raise UpdateInProgress(f"an update is pending in {pending_path(config.state_dir)}")
    binary = manifest.binaries[platform]
    tracker = Tracker(
        sink,
        State.CHECKING,
        manifest.version,
        manifest.serial,
        in_wave=in_wave,
        image=manifest.container_image,
    )
    tracker.post(Event.FOUND)
    tracker.post(Event.START)
    started = time.time()
    staged: Path | None = None
    try:
        target = steps.preflight(config.target, binary.size)
        owner = steps.ask_owner(config.target, target)  # answered while the download runs
        steps.cleanup(target, before=started)
        url = resolve_url(manifest_url, binary.url)
        log.info("downloading %s (%d bytes) next to %s", url, binary.size, target)
        try:
            staged = steps.stage(
                target,
                manifest.version,
                lambda fd: fetcher.download(url, fd, binary.size, binary.sha256, stop=owner.claimed),
            )
        except DownloadStopped:
            owner.check()  # raises why it stopped: a package owns the target
            raise
        except ChecksumMismatch:
            owner.check()
            tracker.post(Event.DONE)  # every byte arrived; the digest is what failed
            raise
        owner.check()
        tracker.post(Event.DONE)
        current = install.Beside(steps.hash_file, target, name="hash-target")  # read while the test runs
        steps.smoke_test(staged, manifest.version)
        tracker.post(Event.DONE)
        pending = new_pending(
            from_version=from_version,
            to_version=manifest.version,
            from_sha256=current.result(),
            to_sha256=binary.sha256,
            target=target,
            serial=manifest.serial,
            now=now(),
            commit_deadline=config.commit_deadline_s,
        )
        write_pending(config.state_dir, pending)  # before the swap: a kill between the two is resumed
        try:
            steps.swap(staged, target, Path(pending.backup))
        except BaseException:
            clear_pending(config.state_dir)
            raise
        staged = None
    except (install.InstallError, DownloadError, OSError) as exc:
        code = getattr(exc, "code", None) or "io_error"
        message = getattr(exc, "message", None) or str(exc)
        if staged is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
        failed_in = tracker.state.value
        _fail_attempt(config, manifest.version, binary.sha256, code, message, failed_in, now())
        tracker.post(Event.FAIL, code=code, message=message)
        raise UpdateFailed(code, message, failed_in) from exc
    with state_transaction(config.state_dir) as saved:
        saved.last_result = State.RESTARTING.value
        saved.last_error = None
    tracker.post(Event.DONE)
    peak = peak_rss_kib()
    log.info(
        "swapped %s -> %s; peak rss %d KiB; restarting by %s",
        from_version,
        manifest.version,
        peak,
        config.restart_method,
        extra={"peak_rss_kib": peak},
    )
    restart(pending)
    return pending


# ---------------------------------------------------------------- I/O: resume, commit, rollback


@dataclass
class Watch:
    """The health window of a new version, in this process."""

    pending: Pending
    started: float = field(default_factory=time.monotonic)
    fetched: bool = False


class Resumed(StrEnum):
    NONE = "none"  # no update in flight
    WATCHING = "watching"
    ROLLED_BACK = "rolled_back"  # the target is the old binary again: restart into it
    DROPPED = "dropped"  # the record was dropped; the target is as it was


@dataclass(frozen=True)
class ResumeResult:
    """How :func:`resume` left the update in flight, and the watch that follows it."""

    outcome: Resumed
    watch: Watch | None = None
    pending: Pending | None = None


def _tracker(sink: EventSink, pending: Pending, state: State) -> Tracker:
    return Tracker(sink, state, pending.to_version, pending.serial)


def resume(config: AgentConfig, sink: EventSink, *, now: datetime) -> ResumeResult:
    """On start: find the update in flight, count this boot, decide (module docstring)."""
    try:
        pending = read_pending(config.state_dir)
    except PendingCorrupt as exc:
        log.error("%s", exc.message)
        with state_transaction(config.state_dir) as saved:
            saved.last_error = {"code": exc.code, "message": exc.message, "state": State.RESTARTING.value}
        sink.emit(
            State.FAILED.value,
            target_version=None,
            manifest_serial=None,
            failed_state=State.RESTARTING.value,
            error=f"{exc.code}: {exc.message}",
        )
        return ResumeResult(Resumed.DROPPED)
    if pending is None:
        return ResumeResult(Resumed.NONE)
    target = Path(pending.target)
    plan = plan_start(pending, install.sha256_or_none(target), now=now, max_boots=config.max_boot_attempts)
    log.info(
        "pending update %s -> %s (boots %d): %s",
        pending.from_version,
        pending.to_version,
        plan.pending.boots,
        plan.action,
    )
    if plan.action in (Start.WATCH, Start.ROLLBACK):
        write_pending(config.state_dir, plan.pending)  # the boot counts before anything else
    if plan.action is Start.WATCH:
        _tracker(sink, plan.pending, State.RESTARTING).post(Event.BOOTED)
        return ResumeResult(Resumed.WATCHING, Watch(plan.pending), plan.pending)
    if plan.action is Start.ROLLBACK:
        assert plan.reason is not None
        done = rollback(config, sink, plan.pending, plan.reason, now=now, from_state=State.RESTARTING)
        return ResumeResult(Resumed.ROLLED_BACK if done else Resumed.DROPPED, pending=plan.pending)
    if plan.action is Start.NOT_SWAPPED:
        message = f"killed before the swap to {pending.to_version}; the target is unchanged"
        _fail_attempt(
            config, pending.to_version, pending.to_sha256, INTERRUPTED_BEFORE_SWAP, message, "staged", now
        )
        _tracker(sink, pending, State.STAGED).post(Event.FAIL, code=INTERRUPTED_BEFORE_SWAP, message=message)
        clear_pending(config.state_dir)  # the record goes after the report, as everywhere
        return ResumeResult(Resumed.DROPPED, pending=pending)
    if plan.action is Start.FINISH_ROLLBACK:
        # The rollback remembered the bad version before it restored; if not, it died first.
        with state_transaction(config.state_dir) as saved:
            reason = bad_reason(saved.bad_versions, pending.to_version, pending.to_sha256)
            if reason is None:
                reason = DIED_BEFORE_COMMIT
                _note_bad(config, saved, pending, reason, now, State.RESTARTING)
        _tracker(sink, pending, State.RESTARTING).post(
            Event.ROLLBACK, code=reason, message="rollback finished"
        )
        clear_pending(config.state_dir)
        return ResumeResult(Resumed.DROPPED, pending=pending)
    # TARGET_REPLACED: neither binary; put the old one back if the backup still is it.
    message = f"{target} is neither {pending.from_version} nor {pending.to_version}"
    try:
        install.restore(target, Path(pending.backup), expect_sha256=pending.from_sha256)
    except install.RestoreFailed as exc:
        _fail_attempt(
            config, pending.to_version, pending.to_sha256, TARGET_REPLACED, message, "restarting", now
        )
        _tracker(sink, pending, State.RESTARTING).post(Event.FAIL, code=TARGET_REPLACED, message=exc.message)
        clear_pending(config.state_dir)
        return ResumeResult(Resumed.DROPPED, pending=pending)
    _fail_attempt(config, pending.to_version, pending.to_sha256, TARGET_REPLACED, message, "restarting", now)
    _tracker(sink, pending, State.RESTARTING).post(Event.ROLLBACK, code=TARGET_REPLACED, message=message)
    clear_pending(config.state_dir)
    return ResumeResult(Resumed.ROLLED_BACK, pending=pending)


def _remember(config: AgentConfig, pending: Pending, reason: str, now: datetime, state: State) -> None:
    with state_transaction(config.state_dir) as saved:
        _note_bad(config, saved, pending, reason, now, state)


def _note_bad(
    config: AgentConfig, saved: AgentState, pending: Pending, reason: str, now: datetime, state: State
) -> None:
    """Remember ``pending``'s version as bad for ``reason`` in ``saved`` (a state being changed)."""
    saved.bad_versions = remember_bad(
        saved.bad_versions, pending.to_version, pending.to_sha256, reason, now=now
    )
    if reason not in PERMANENT_REASONS:
        saved.attempts = record_failure(
            saved.attempts,
            pending.to_version,
            pending.to_sha256,
            reason,
            now=now,
            interval=config.update_interval,
        )
    saved.last_result = State.ROLLED_BACK.value
    saved.last_error = {
        "code": reason,
        "message": f"{pending.to_version} rolled back to {pending.from_version}",
        "state": state.value,
    }


def rollback(
    config: AgentConfig,
    sink: EventSink,
    pending: Pending,
    reason: str,
    *,
    now: datetime,
    from_state: State,
) -> bool:
    """Remember the bad version, restore ``.backup``, report, drop the record. False if no restore."""
    log.warning("rolling back %s -> %s: %s", pending.to_version, pending.from_version, reason)
    _remember(config, pending, reason, now, from_state)
    tracker = _tracker(sink, pending, from_state)
    try:
        install.restore(Path(pending.target), Path(pending.backup), expect_sha256=pending.from_sha256)
    except install.RestoreFailed as exc:
        # Keeping the record would retry a restore that cannot work at every start.
        log.critical("cannot roll back: %s; keeping %s", exc.message, pending.to_version)
        tracker.post(Event.FAIL, code=exc.code, message=exc.message)
        clear_pending(config.state_dir)  # after the report, as in commit: a kill loses nothing
        return False
    tracker.post(Event.ROLLBACK, code=reason, message=f"restored {pending.from_version}")
    clear_pending(config.state_dir)
    cache.prune_builds(pending.target, pending.backup)  # only the current and backup builds' code stays
    return True


def commit(config: AgentConfig, sink: EventSink, watch: Watch) -> None:
    """The new version is healthy: tidy the state, queue the report, drop the record (the commit
    point), in that order. The record goes last so that a kill -9 at any moment loses nothing:
    before it, the next start resumes the watch and commits again (the report may then be sent
    twice, never zero times: once the record is gone nothing would ever send it)."""
    pending = watch.pending
    with state_transaction(config.state_dir) as saved:
        saved.attempts = forget_attempts(saved.attempts, pending.to_version, pending.to_sha256)
        saved.bad_versions = forget_bad(saved.bad_versions, pending.to_version, pending.to_sha256)
        saved.last_result = State.COMMITTED.value
        saved.last_error = None
    _tracker(sink, pending, State.WATCHING).post(Event.COMMIT)  # durable: fsync'd in the queue
    clear_pending(config.state_dir)
    log.info("committed %s (after %d boot(s))", pending.to_version, pending.boots)
    cache.prune_builds(pending.target, pending.backup)  # only the current and backup builds' code stays


class NothingToRollBack(Exception):
    code = "nothing_to_roll_back"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def rollback_installed(
    config: AgentConfig, sink: EventSink, *, version: str | None, serial: int | None, now: datetime
) -> str:
    """``rollback`` by hand with no update in flight: put ``.backup`` back over a committed version.

    The version given up is remembered as ``manual_rollback`` (for good: otherwise the next check
    would install it again). Returns the sha256 of the binary that was rolled back.
    """
    target = install.resolve_target(config.target)
    backup = install.backup_path(target)
    current, previous = install.sha256_or_none(target), install.sha256_or_none(backup)
    if previous is None:
        raise NothingToRollBack(f"there is no {backup} to roll back to")
    if current == previous:
        raise NothingToRollBack(f"{target} already is {backup.name}")
    assert current is not None
    label = version or "unknown"
    message = f"{label} rolled back by hand to {backup.name}"
    with state_transaction(config.state_dir) as saved:
        saved.bad_versions = remember_bad(saved.bad_versions, label, current, MANUAL_ROLLBACK, now=now)
        saved.last_result = State.ROLLED_BACK.value
        saved.last_error = {"code": MANUAL_ROLLBACK, "message": message, "state": State.COMMITTED.value}
    install.restore(target, backup, expect_sha256=previous)
    cache.prune_builds(target, backup)  # only the current and backup builds' code stays
    sink.emit(
        State.ROLLED_BACK.value,
        target_version=version,
        manifest_serial=serial,
        failed_state=State.COMMITTED.value,
        error=f"{MANUAL_ROLLBACK}: {message}",
    )
    return current
