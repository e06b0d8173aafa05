"""The durable report queue: a framed write-ahead log of events (DESIGN section 5, agent side).

Every event the agent reports is appended here (``<UPDATE_STATE_DIR>/reports/``) before anything
can send it; :mod:`agent.reports` sends from here and acknowledges what the endpoint accepted.
This module is the log alone: no network.

The queue (``queue.log`` + ``meta.json``, guarded by ``flock(queue.lock)``):

- ``queue.log`` is append-only. Each record is one line ``Q1 <len:8 hex> <crc32:8 hex> <json>\\n``
  (ASCII JSON, so a payload never holds a newline). :meth:`ReportQueue.append` returns only after
  the record is written and fsync'd, so an event is on disk before anything can send it.
- On open (and whenever another process changed the file), the log is scanned: a torn last record
  (kill -9 mid-append) is dropped and the file truncated back to the last good record; a damaged
  record in the middle (disk corruption) is skipped, the good records after it kept.
- ``meta.json`` (written atomically) holds the ``stream`` (created once per queue: 13 hex digits of
  ms since the epoch + 16 random hex digits), ``acked_seq`` (every event up to it is done: answered
  2xx, or refused alone with 400/413) and ``dropped_carry``. ``seq`` counts up from 1 within the
  stream: the next one is one above the highest seq in the log or the cursor, so a restart (or an
  ``exec``) continues the numbering and resends exactly the unacknowledged events.
- No file content can make it fail: a ``meta.json`` that is not a valid state is set aside (the
  events are then sent again; the endpoint ignores duplicates), a ``queue.log`` record that does
  not frame, check and parse as an event is skipped as damaged.
- The log is compacted (rewritten atomically without acknowledged records) once those hold
  ``compact_bytes`` and at least half the file, or all of it.
- Heartbeats (liveness, DESIGN section 5): a new ``heartbeat`` replaces every unsent older one, in
  the same atomic rewrite that appends it, so a silent endpoint never piles them up.
- Bound: ``max_events`` unacknowledged events or ``max_bytes`` of records. Past it, events are
  dropped down to 90 % of the bound, by tier (:func:`tier_of`), most expendable first, oldest
  first within a tier: heartbeats, then ``checking`` / ``update_available``, then check failures
  (``failed`` in ``checking`` without a target: they belong to no install attempt).
  Install-attempt (lifecycle) events are never dropped: with only those left, the queue grows past
  its bound and says so loudly. The number dropped travels on the next event queued (field
  ``dropped``; a dropped or replaced event's own count moves on with it); a crash at the wrong
  instant may count a drop twice, never lose the count.
- Several processes may share a queue (``run``, ``update`` by hand, the watchdog): every change
  happens under the lock; acknowledgements only move the cursor forward.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from agent.state import fsync_dir, set_aside, write_bytes_atomic, write_json_atomic
from infra.reports.validation import HEARTBEAT as HEARTBEAT_STATE
from infra.reports.validation import MAX_BODY_BYTES, MAX_EVENTS, MAX_INT, STREAM_RE

log = logging.getLogger(__name__)

REPORTS_DIR = "reports"
LOG_FILE = "queue.log"
META_FILE = "meta.json"
LOCK_FILE = "queue.lock"

MAX_QUEUE_EVENTS = 10_000
MAX_QUEUE_BYTES = 8 * 1024 * 1024
LOW_WATER = 0.9  # a full queue drops down to 90 % of its bound, so drops (and rewrites) come in bulk
MAX_RECORD_BYTES = 64 * 1024  # an event is a few KiB at most; a bigger length field is corruption
COMPACT_BYTES = 256 * 1024
BATCH_EVENTS = MAX_EVENTS
BATCH_BYTES = MAX_BODY_BYTES - 48 * 1024  # events' JSON per request, leaving room under the 256 KiB cap

ROUTINE_STATES = frozenset({"checking", "update_available"})
# Drop tiers, most expendable last: a full queue drops HEARTBEAT first, then ROUTINE, then
# CHECK_FAILURE, never LIFECYCLE.
LIFECYCLE, CHECK_FAILURE, ROUTINE, HEARTBEAT = 0, 1, 2, 3
DROP_ORDER = (HEARTBEAT, ROUTINE, CHECK_FAILURE)

_HEADER_RE = re.compile(rb"Q1 ([0-9a-f]{8}) ([0-9a-f]{8}) ")
_HEADER_LEN = 21
_RESYNC = b"\nQ1 "
META_FORMAT = 1


def tier_of(event: dict[str, Any]) -> int:
    """How expendable an event is when the queue is full (see the module docstring)."""
    state = event.get("state")
    if not isinstance(state, str):  # a record from a damaged (or hostile) log: keep it, never crash
        return LIFECYCLE
    if state == HEARTBEAT_STATE:
        return HEARTBEAT
    if state in ROUTINE_STATES:
        return ROUTINE
    if state == "failed" and event.get("failed_state") == "checking" and event.get("target_version") is None:
        return CHECK_FAILURE
    return LIFECYCLE


def new_stream(now: float | None = None) -> str:
    """13 hex digits of ms since the epoch, then 16 random hex digits (DESIGN section 5)."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:013x}{secrets.token_hex(8)}"


def file_ident(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime): changes whenever another process replaces or appends to the file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _count(value: object) -> int | None:
    """A non-negative integer that fits the endpoint's columns, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT:
        return value
    return None


# ---------------------------------------------------------------- framing


def encode_frame(payload: bytes) -> bytes:
    return b"Q1 %08x %08x " % (len(payload), zlib.crc32(payload)) + payload + b"\n"


def encode_event(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=True).encode("ascii")


@dataclass(frozen=True)
class _Entry:
    """Where one record sits in the log (payloads stay on disk; the agent has 64 MiB)."""

    seq: int
    offset: int
    size: int  # the whole frame
    tier: int
    carried: int = 0  # the record's own ``dropped`` count (it moves on if the record goes)


def _frame_at(data: bytes, pos: int) -> tuple[dict[str, Any], int] | None:
    """The event and the end offset of a valid record at ``pos``, else None."""
    m = _HEADER_RE.match(data, pos)
    if m is None:
        return None
    length, crc = int(m.group(1), 16), int(m.group(2), 16)
    start = pos + _HEADER_LEN
    end = start + length
    if length > MAX_RECORD_BYTES or end >= len(data) or data[end] != 0x0A:
        return None
    payload = data[start:end]
    if zlib.crc32(payload) != crc:
        return None
    try:
        event = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        return None
    if not isinstance(event, dict):
        return None
    seq = _count(event.get("seq"))
    if not seq or not isinstance(event.get("stream"), str):
        return None
    return event, end + 1


class Scan(NamedTuple):
    entries: list[_Entry]
    streams: list[str]  # each entry's stream
    torn_at: int | None  # offset of a torn tail (no valid record after it)
    skipped: list[tuple[int, int]]  # damaged regions with valid records after them


def scan(data: bytes) -> Scan:
    """Index a log's records; see the module docstring for torn and damaged records."""
    entries: list[_Entry] = []
    streams: list[str] = []
    skipped: list[tuple[int, int]] = []
    pos = 0
    while pos < len(data):
        found = _frame_at(data, pos)
        if found is not None:
            event, end = found
            carried = _count(event.get("dropped")) or 0
            entries.append(_Entry(event["seq"], pos, end - pos, tier_of(event), carried))
            streams.append(event["stream"])
            pos = end
            continue
        resume = _resync(data, pos + 1)
        if resume is None:
            return Scan(entries, streams, pos, skipped)
        skipped.append((pos, resume))
        pos = resume
    return Scan(entries, streams, None, skipped)


def _resync(data: bytes, start: int) -> int | None:
    """The offset of the next valid record at or after ``start``, if any."""
    at = data.find(_RESYNC, start - 1)
    while at != -1:
        if _frame_at(data, at + 1) is not None:
            return at + 1
        at = data.find(_RESYNC, at + 1)
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# ---------------------------------------------------------------- the queue


class ReportQueue:
    """The write-ahead log of events not yet acknowledged (see the module docstring)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        max_events: int = MAX_QUEUE_EVENTS,
        max_bytes: int = MAX_QUEUE_BYTES,
        compact_bytes: int = COMPACT_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dir = Path(directory)
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.compact_bytes = compact_bytes
        self.clock = clock
        self.log_path = self.dir / LOG_FILE
        self.meta_path = self.dir / META_FILE
        #: Events this process dropped (bound, or refused alone by the endpoint).
        self.dropped_total = 0
        self.refused_total = 0
        self._tlock = threading.RLock()
        self._entries: list[_Entry] = []
        self._log_id: tuple[int, int, int] | None = None
        self._meta_id: tuple[int, int, int] | None = None
        self._stream: str | None = None
        self._acked = 0
        self._carry = 0
        self._scan_stream: str | None = None
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with self._locked():  # load, repair, create the stream
            self._remove_stale_temps()

    def close(self) -> None:
        with self._tlock:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    # -- public

    @property
    def stream(self) -> str:
        with self._locked():
            assert self._stream is not None
            return self._stream

    @property
    def acked_seq(self) -> int:
        with self._locked():
            return self._acked

    def count(self) -> int:
        """Events waiting for an acknowledgement."""
        with self._locked():
            return len(self._unacked())

    def size(self) -> int:
        """Bytes of the records waiting for an acknowledgement."""
        with self._locked():
            return sum(e.size for e in self._unacked())

    def append(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """Number ``event`` (stream, seq), write it durably; None if the bound dropped it at once.

        A heartbeat replaces the unsent heartbeats before it; a full queue drops by tier.
        """
        with self._locked():
            assert self._stream is not None
            stored = {**event, "stream": self._stream, "seq": self._next_seq()}
            stored.pop("dropped", None)
            tier = tier_of(stored)
            replaced = [e for e in self._unacked() if e.tier == HEARTBEAT] if tier == HEARTBEAT else []
            size = len(encode_frame(encode_event(stored))) + 16  # + room for a "dropped" field
            victims, drop_new = self._plan_bound(tier, size, leaving=replaced)
            if drop_new:  # only install-attempt events are left: the newcomer goes, its kind with it
                victims, replaced = victims + replaced, []
            dropped = len(victims) + int(drop_new)
            carry = self._carry + dropped - int(drop_new) + sum(e.carried for e in (*victims, *replaced))
            if dropped:
                self.dropped_total += dropped
                log.warning(
                    "report queue full (%d events / %d bytes bound): dropped %d expendable event(s)",
                    self.max_events,
                    self.max_bytes,
                    dropped,
                )
            gone = [*victims, *replaced]
            if drop_new:
                # The count first, then the drops: a crash in between counts twice, never loses.
                self._carry = carry + 1
                self._write_meta()
                if gone:
                    self._rewrite(self._keep(gone))
                return None
            if carry:
                stored["dropped"] = carry
            frame = encode_frame(encode_event(stored))
            if len(frame) > MAX_RECORD_BYTES:
                raise ValueError(f"report event of {len(frame)} bytes exceeds {MAX_RECORD_BYTES}")
            entry = _Entry(stored["seq"], 0, len(frame), tier, carry)
            if gone:
                self._rewrite(self._keep(gone), (entry, frame))  # drops, replacements and count, atomically
            else:
                self._append_frame(entry, frame)
            if self._carry:
                self._carry = 0
                self._write_meta()
            self._warn_if_over_bound()
            return stored

    def pending(self, limit: int = BATCH_EVENTS, max_bytes: int = BATCH_BYTES) -> list[dict[str, Any]]:
        """The first unacknowledged events in queue order: at most ``limit``, ~``max_bytes`` (>= 1)."""
        out: list[dict[str, Any]] = []
        with self._locked():
            todo = self._unacked()
            if not todo:
                return out
            total = 0
            with open(self.log_path, "rb") as fh:
                for entry in todo:
                    payload_size = entry.size - _HEADER_LEN - 1
                    if out and (len(out) >= limit or total + payload_size > max_bytes):
                        break
                    fh.seek(entry.offset)
                    frame = fh.read(entry.size)
                    out.append(json.loads(frame[_HEADER_LEN:-1]))
                    total += payload_size
        return out

    def ack(self, seq: int) -> None:
        """Every event up to ``seq`` is done; the cursor never moves back."""
        with self._locked():
            if seq <= self._acked:
                return
            self._acked = seq
            self._write_meta()
            self._maybe_compact()

    # -- locking and loading

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._tlock:
            if self._lock_fd < 0:
                raise ValueError("report queue is closed")
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                self._sync()
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _remove_stale_temps(self) -> None:
        """Temp files of a rewrite killed half-way (every write here happens under the lock)."""
        for leftover in self.dir.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                leftover.unlink()

    def _sync(self) -> None:
        """Reload what another process (or a crash) changed since this process last looked."""
        meta_id = file_ident(self.meta_path)
        if meta_id is None or meta_id != self._meta_id:
            self._load_meta()
        log_id = file_ident(self.log_path)
        if log_id is None or log_id != self._log_id:
            self._load_log()
        if self._stream is None:
            # A lost meta.json: the log says which stream its events belong to; else a new queue.
            found = self._scan_stream
            self._stream = found if found and STREAM_RE.fullmatch(found) else new_stream(self.clock())
            self._write_meta()

    def _load_meta(self) -> None:
        self._stream, self._acked, self._carry = None, 0, 0
        try:
            raw = self.meta_path.read_bytes()
        except FileNotFoundError:
            self._meta_id = None
            return
        try:
            meta = json.loads(raw)
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
            stream, acked, carry = meta["stream"], meta["acked_seq"], meta["dropped_carry"]
            if not (isinstance(stream, str) and re.fullmatch(r"[0-9a-f]{29}", stream)):
                raise ValueError("bad stream")
            if _count(acked) is None or _count(carry) is None:
                raise ValueError("bad counters")
        except (ValueError, KeyError, RecursionError) as exc:
            aside = set_aside(self.meta_path)
            log.error(
                "report queue state %s is corrupt (%s); set aside as %s: unacknowledged-state lost, "
                "queued events will be sent again (the endpoint ignores duplicates)",
                self.meta_path,
                exc,
                aside,
            )
            self._meta_id = None
            return
        self._stream, self._acked, self._carry = stream, acked, carry
        self._meta_id = file_ident(self.meta_path)

    def _load_log(self) -> None:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            self._entries, self._log_id, self._scan_stream = [], None, None
            return
        found = scan(data)
        self._entries = found.entries
        self._scan_stream = found.streams[0] if found.streams else None
        if found.skipped:
            lost = sum(end - start for start, end in found.skipped)
            log.error(
                "report queue %s: %d damaged byte(s) in %d place(s) skipped; the records around them kept",
                self.log_path,
                lost,
                len(found.skipped),
            )
        if found.torn_at is not None:
            log.warning(
                "report queue %s: torn last record (%d bytes at offset %d) dropped",
                self.log_path,
                len(data) - found.torn_at,
                found.torn_at,
            )
        if found.skipped:
            self._rewrite(self._entries, data=data)
        elif found.torn_at is not None:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, found.torn_at)
                os.fsync(fd)
            finally:
                os.close(fd)
        self._log_id = file_ident(self.log_path)

    # -- writing

    def _write_meta(self) -> None:
        assert self._stream is not None
        write_json_atomic(
            self.meta_path,
            {
                "format": META_FORMAT,
                "stream": self._stream,
                "acked_seq": self._acked,
                "dropped_carry": self._carry,
            },
        )
        self._meta_id = file_ident(self.meta_path)

    def _append_frame(self, entry: _Entry, frame: bytes) -> None:
        created = not self.log_path.exists()
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            offset = os.fstat(fd).st_size
            try:
                _write_all(fd, frame)
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, offset)  # never leave our own torn record behind (ENOSPC)
                raise
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.dir)
        self._entries.append(_Entry(entry.seq, offset, entry.size, entry.tier, entry.carried))
        self._log_id = (st.st_ino, st.st_size, st.st_mtime_ns)

    def _rewrite(
        self, keep: Sequence[_Entry], extra: tuple[_Entry, bytes] | None = None, data: bytes | None = None
    ) -> None:
        """Atomically replace the log with ``keep`` (+ ``extra``): temp, fsync, rename, dir fsync."""
        if data is None:
            try:
                data = self.log_path.read_bytes()
            except FileNotFoundError:
                data = b""
        chunks, entries, offset = [], [], 0
        for entry in keep:
            chunks.append(data[entry.offset : entry.offset + entry.size])
            entries.append(_Entry(entry.seq, offset, entry.size, entry.tier, entry.carried))
            offset += entry.size
        if extra is not None:
            entry, frame = extra
            chunks.append(frame)
            entries.append(_Entry(entry.seq, offset, len(frame), entry.tier, entry.carried))
        write_bytes_atomic(self.log_path, b"".join(chunks), mode=0o600)
        self._entries = entries
        self._log_id = file_ident(self.log_path)

    # -- bookkeeping

    def _unacked(self) -> list[_Entry]:
        return [e for e in self._entries if e.seq > self._acked]

    def _keep(self, gone: Sequence[_Entry]) -> list[_Entry]:
        seqs = {e.seq for e in gone}
        return [e for e in self._unacked() if e.seq not in seqs]

    def _next_seq(self) -> int:
        return max(max((e.seq for e in self._entries), default=0), self._acked) + 1

    def _plan_bound(
        self, new_tier: int, new_size: int, leaving: Sequence[_Entry] = ()
    ) -> tuple[list[_Entry], bool]:
        """(existing events to drop, drop the new one too) so the queue fits its bound again.

        ``leaving`` are on their way out anyway (replaced heartbeats): they count for nothing.
        """
        out = {e.seq for e in leaving}
        unacked = [e for e in self._unacked() if e.seq not in out]
        count = len(unacked) + 1
        size = sum(e.size for e in unacked) + new_size
        if count <= self.max_events and size <= self.max_bytes:
            return [], False
        low_count = int(self.max_events * LOW_WATER)
        low_bytes = int(self.max_bytes * LOW_WATER)
        order: list[_Entry | None] = []  # None stands for the new event
        for tier in DROP_ORDER:
            order += [e for e in unacked if e.tier == tier]
            if new_tier == tier:
                order.append(None)
        victims: list[_Entry] = []
        drop_new = False
        for candidate in order:
            if count <= low_count and size <= low_bytes:
                break
            if candidate is None:
                drop_new = True
                size -= new_size
            else:
                victims.append(candidate)
                size -= candidate.size
            count -= 1
        return victims, drop_new

    def _warn_if_over_bound(self) -> None:
        unacked = self._unacked()
        size = sum(e.size for e in unacked)
        if len(unacked) > self.max_events or size > self.max_bytes:
            log.error(
                "report queue %s holds %d events / %d bytes, over its bound (%d / %d), and only "
                "install-attempt events are left: growing rather than losing them; is the reports "
                "endpoint reachable?",
                self.dir,
                len(unacked),
                size,
                self.max_events,
                self.max_bytes,
            )

    def _maybe_compact(self) -> None:
        done = sum(e.size for e in self._entries if e.seq <= self._acked)
        if not done:
            return
        total = sum(e.size for e in self._entries)
        if done == total or (done >= self.compact_bytes and 2 * done >= total):
            self._rewrite(self._unacked())
