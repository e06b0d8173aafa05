"""The durable report queue and its sender (DESIGN section 5, agent side).

Every event the lifecycle emits goes through :class:`QueueSink` (the :class:`agent.events.EventSink`
of a configured agent) into :class:`ReportQueue`, a write-ahead log under
``<UPDATE_STATE_DIR>/reports/``, and only from there to the reports endpoint.

The queue (``queue.log`` + ``meta.json``, guarded by ``flock(queue.lock)``):

- ``queue.log`` is append-only. Each record is one line ``Q1 <len:8 hex> <crc32:8 hex> <json>\\n``
  (ASCII JSON, so a payload never holds a newline). ``emit`` returns only after the record is
  written and fsync'd, so an event is on disk before anything can send it.
- On open (and whenever another process changed the file), the log is scanned: a torn last record
  (kill -9 mid-append) is dropped and the file truncated back to the last good record; a damaged
  record in the middle (disk corruption) is skipped, the good records after it kept.
- ``meta.json`` (written atomically) holds the ``stream`` (created once per queue: 13 hex digits of
  ms since the epoch + 16 random hex digits), ``acked_seq`` (every event up to it is done: answered
  2xx, or refused alone with 400/413) and ``dropped_carry``. ``seq`` counts up from 1 within the
  stream: the next one is one above the highest seq in the log or the cursor, so a restart (or an
  ``exec``) continues the numbering and resends exactly the unacknowledged events.
- The log is compacted (rewritten atomically without acknowledged records) once those hold
  ``compact_bytes`` and at least half the file, or all of it.
- Bound: ``max_events`` unacknowledged events or ``max_bytes`` of records. Past it, events are
  dropped down to 90 % of the bound: first ``checking`` / ``update_available`` (heartbeat-like),
  oldest first, then check failures (``failed`` in ``checking`` without a target: they belong to no
  install attempt), oldest first. Install-attempt (lifecycle) events are never dropped: with only
  those left, the queue grows past its bound and says so loudly. The number dropped travels on the
  next event queued (field ``dropped``); a crash at the wrong instant may count a drop twice, never
  lose the count.
- Several processes may share a queue (``run``, ``update`` by hand, the watchdog): every change
  happens under the lock; acknowledgements only move the cursor forward.

The sender (:func:`send_pending`): batches of up to 100 events (and at most ``BATCH_BYTES``) in queue
order, one batch at a time, ``Authorization: Bearer <token>``. 2xx acknowledges the batch; 400 is
narrowed down by resending the batch's events one by one, 413 splits the batch in halves; an event
refused alone (400 or 413) is dropped and logged, so a bad event never blocks the queue. Network
errors, 401, 429 and 5xx keep the events and back off exponentially with jitter (capped at 10 min,
``Retry-After`` honoured); any other answer (403, 404, 405, 411, a redirect...) also keeps them and
backs off, with an error log. The token never goes over plain http except to loopback (127.0.0.0/8,
::1, ``localhost``): such a URL is refused without opening a connection.

Where reports go: ``UPDATE_REPORT_URL``, else the ``reports_url`` of the last verified manifest
(given by the runner with :meth:`QueueSink.set_manifest_reports_url`, else read from the verified
envelope the check caches in the state dir). ``UPDATE_REPORT_URL=disabled`` turns reporting off:
events are then only logged, never queued.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import random
import re
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urljoin, urlsplit

import requests

from agent import buildinfo
from agent.config import AgentConfig
from agent.events import MAX_ERROR_CHARS, EventSink, LogSink, Origin
from agent.manifest import ManifestError, PublicKey, parse_manifest, verify_envelope
from agent.state import CACHED_ENVELOPE, fsync_dir, set_aside, write_bytes_atomic, write_json_atomic
from infra.reports.core import MAX_BODY_BYTES
from infra.reports.validation import CONTROL_RE, MAX_EVENTS, SURROGATE_RE, valid_agent_id

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
MAX_IMAGE_CHARS = 256
BACKOFF_BASE = 2.0
BACKOFF_CAP = 600.0
IDLE_POLL = 30.0  # with events waiting but no endpoint known yet, look again this often
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0

HEARTBEAT_STATES = frozenset({"checking", "update_available"})
# Drop tiers, most expendable last: a full queue drops HEARTBEAT first, then CHECK_FAILURE, never LIFECYCLE.
LIFECYCLE, CHECK_FAILURE, HEARTBEAT = 0, 1, 2

_HEADER_RE = re.compile(rb"Q1 ([0-9a-f]{8}) ([0-9a-f]{8}) ")
_HEADER_LEN = 21
_RESYNC = b"\nQ1 "
META_FORMAT = 1


def tier_of(event: dict[str, Any]) -> int:
    """How expendable an event is when the queue is full (see the module docstring)."""
    state = event.get("state")
    if state in HEARTBEAT_STATES:
        return HEARTBEAT
    if state == "failed" and event.get("failed_state") == "checking" and event.get("target_version") is None:
        return CHECK_FAILURE
    return LIFECYCLE


def new_stream(now: float | None = None) -> str:
    """13 hex digits of ms since the epoch, then 16 random hex digits (DESIGN section 5)."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:013x}{secrets.token_hex(8)}"


def clean_text(text: str, limit: int) -> str:
    """Control characters (the endpoint's definition) and lone surrogates replaced; at most ``limit``."""
    text = SURROGATE_RE.sub("\ufffd", CONTROL_RE.sub(" ", text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def token_allowed(url: str) -> bool:
    """May the token go to ``url``? https anywhere; plain http only to a loopback address."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    if parts.scheme.lower() == "https" and host:
        return True
    if parts.scheme.lower() != "http" or not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    except ValueError:
        return None
    seq = event.get("seq") if isinstance(event, dict) else None
    if (
        not isinstance(seq, int)
        or isinstance(seq, bool)
        or seq < 1
        or not isinstance(event.get("stream"), str)
    ):
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
            entries.append(_Entry(event["seq"], pos, end - pos, tier_of(event)))
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
        """Number ``event`` (stream, seq), write it durably; None if the bound dropped it at once."""
        with self._locked():
            assert self._stream is not None
            stored = {**event, "stream": self._stream, "seq": self._next_seq()}
            stored.pop("dropped", None)
            tier = tier_of(stored)
            size = len(encode_frame(encode_event(stored))) + 16  # + room for a "dropped" field
            victims, drop_new = self._plan_bound(tier, size)
            dropped = len(victims) + int(drop_new)
            if dropped:
                self.dropped_total += dropped
                log.warning(
                    "report queue full (%d events / %d bytes bound): dropped %d heartbeat event(s)",
                    self.max_events,
                    self.max_bytes,
                    dropped,
                )
            if drop_new:
                # The count first, then the drops: a crash in between counts twice, never loses.
                self._carry += dropped
                self._write_meta()
                if victims:
                    self._rewrite(self._keep(victims))
                return None
            carry = self._carry + len(victims)
            if carry:
                stored["dropped"] = carry
            frame = encode_frame(encode_event(stored))
            if len(frame) > MAX_RECORD_BYTES:
                raise ValueError(f"report event of {len(frame)} bytes exceeds {MAX_RECORD_BYTES}")
            entry = _Entry(stored["seq"], 0, len(frame), tier)
            if victims:
                self._rewrite(self._keep(victims), (entry, frame))  # drops and their count, atomically
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

    @staticmethod
    def _ident(path: Path) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _sync(self) -> None:
        """Reload what another process (or a crash) changed since this process last looked."""
        meta_id = self._ident(self.meta_path)
        if meta_id is None or meta_id != self._meta_id:
            self._load_meta()
        log_id = self._ident(self.log_path)
        if log_id is None or log_id != self._log_id:
            self._load_log()
        if self._stream is None:
            # A lost meta.json: the log says which stream its events belong to; else a new queue.
            self._stream = self._scan_stream or new_stream(self.clock())
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
            stream, acked, carry = meta["stream"], meta["acked_seq"], meta["dropped_carry"]
            if not (isinstance(stream, str) and re.fullmatch(r"[0-9a-f]{29}", stream)):
                raise ValueError("bad stream")
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (acked, carry)):
                raise ValueError("bad counters")
        except (ValueError, KeyError, TypeError) as exc:
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
        self._meta_id = self._ident(self.meta_path)

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
        self._log_id = self._ident(self.log_path)

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
        self._meta_id = self._ident(self.meta_path)

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
        self._entries.append(_Entry(entry.seq, offset, entry.size, entry.tier))
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
            entries.append(_Entry(entry.seq, offset, entry.size, entry.tier))
            offset += entry.size
        if extra is not None:
            entry, frame = extra
            chunks.append(frame)
            entries.append(_Entry(entry.seq, offset, len(frame), entry.tier))
        write_bytes_atomic(self.log_path, b"".join(chunks), mode=0o600)
        self._entries = entries
        self._log_id = self._ident(self.log_path)

    # -- bookkeeping

    def _unacked(self) -> list[_Entry]:
        return [e for e in self._entries if e.seq > self._acked]

    def _keep(self, victims: Sequence[_Entry | None]) -> list[_Entry]:
        gone = {e.seq for e in victims if e is not None}
        return [e for e in self._unacked() if e.seq not in gone]

    def _next_seq(self) -> int:
        return max(max((e.seq for e in self._entries), default=0), self._acked) + 1

    def _plan_bound(self, new_tier: int, new_size: int) -> tuple[list[_Entry], bool]:
        """(existing events to drop, drop the new one too) so the queue fits its bound again."""
        unacked = self._unacked()
        count = len(unacked) + 1
        size = sum(e.size for e in unacked) + new_size
        if count <= self.max_events and size <= self.max_bytes:
            return [], False
        low_count = int(self.max_events * LOW_WATER)
        low_bytes = int(self.max_bytes * LOW_WATER)
        order: list[_Entry | None] = []  # None stands for the new event
        for tier in (HEARTBEAT, CHECK_FAILURE):
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


# ---------------------------------------------------------------- sending


class Answer(NamedTuple):
    """One POST's outcome: ``status`` None when no answer came (network error, refused URL)."""

    status: int | None
    reason: str
    retry_after: float | None = None


NOT_CONFIGURED = "not configured"
DEADLINE = "flush deadline reached"


@dataclass
class Delivery:
    """What one send round did; ``failure`` says why it stopped before the queue was empty."""

    sent: int = 0  # events acknowledged with a 2xx
    refused: int = 0  # events dropped after a 400/413 for them alone
    failure: Answer | None = None

    @property
    def retryable(self) -> bool:
        return self.failure is not None and self.failure.reason not in (NOT_CONFIGURED, DEADLINE)


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def _reason(response: requests.Response) -> str:
    try:
        body = response.json()
        reason = body.get("reason") or body.get("error") if isinstance(body, dict) else None
    except ValueError:
        reason = None
    return clean_text(str(reason or response.reason or ""), 300)


class Poster:
    """POSTs batches with the token; refuses (without connecting) a URL the token may not go to."""

    def __init__(
        self, token: str, session: requests.Session | None = None, timeout: tuple[float, float] | None = None
    ) -> None:
        self.token = token
        self.session = session or requests.Session()
        self.timeout = timeout or (CONNECT_TIMEOUT, READ_TIMEOUT)

    def post(self, url: str, events: list[dict[str, Any]], deadline: float | None = None) -> Answer:
        if not token_allowed(url):
            return Answer(None, "refusing to send the report token over plain http to a non-loopback host")
        timeout = self.timeout
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return Answer(None, DEADLINE)
            timeout = (min(timeout[0], left), min(timeout[1], left))
        body = json.dumps({"events": events}, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        headers = {
            "Authorization": f"Bearer {self.token}",
            "Content-Type": "application/json",
            "User-Agent": f"avika-agent/{buildinfo.VERSION}",
        }
        try:
            response = self.session.post(
                url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            text = str(exc) or type(exc).__name__
            return Answer(None, text if len(text) <= 300 else text[:300] + "...")
        try:
            return Answer(
                response.status_code, _reason(response), _retry_after(response.headers.get("Retry-After"))
            )
        finally:
            response.close()


def send_pending(
    queue: ReportQueue,
    post: Callable[[list[dict[str, Any]]], Answer],
    *,
    batch_events: int = BATCH_EVENTS,
    batch_bytes: int = BATCH_BYTES,
) -> Delivery:
    """Send the queue in order, batch by batch, until it is empty or an answer says wait."""
    done = Delivery()

    def deliver(events: list[dict[str, Any]]) -> bool:
        answer = post(events)
        status = answer.status
        if status is not None and 200 <= status < 300:
            queue.ack(events[-1]["seq"])
            done.sent += len(events)
            return True
        if status in (400, 413):
            if len(events) == 1:
                event = events[0]
                log.error(
                    "report event seq %s (%s, %s) refused with %d (%s); dropped",
                    event.get("seq"),
                    event.get("state"),
                    event.get("event_id"),
                    status,
                    answer.reason,
                )
                queue.ack(event["seq"])
                queue.refused_total += 1
                done.refused += 1
                return True
            if status == 400:  # which event is bad? ask about each alone
                parts = [[event] for event in events]
            else:  # too large: halves
                half = len(events) // 2
                parts = [events[:half], events[half:]]
            return all(deliver(part) for part in parts)
        done.failure = answer
        return False

    while True:
        batch = queue.pending(batch_events, batch_bytes)
        if not batch or not deliver(batch):
            return done


class Backoff:
    """Exponential back-off with jitter: base * 2^n, capped, times a random factor in [0.5, 1]."""

    def __init__(
        self, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP, rng: random.Random | None = None
    ) -> None:
        self.base = base
        self.cap = cap
        self.rng = rng or random.Random()
        self.failures = 0

    def failed(self, retry_after: float | None = None) -> float:
        """Record a failure; the delay before the next attempt."""
        delay = min(self.cap, self.base * 2 ** min(self.failures, 40)) * self.rng.uniform(0.5, 1.0)
        self.failures += 1
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.cap))
        return delay

    def succeeded(self) -> None:
        self.failures = 0


def _log_failure(failure: Answer, url: str) -> None:
    status = failure.status
    if status is None or status == 429 or status >= 500:
        log.warning("reports to %s not delivered (%s); kept, retrying later", url, status or failure.reason)
    elif status == 401:
        log.error(
            "reports to %s refused: 401 %s (is UPDATE_REPORT_TOKEN this agent's `avika-publish enroll` "
            "token?); kept, retrying later",
            url,
            failure.reason,
        )
    else:
        log.error("reports to %s refused: HTTP %d %s; kept, retrying later", url, status, failure.reason)


# ---------------------------------------------------------------- the sink


@dataclass
class _UrlCache:
    ident: tuple[int, int, int] | None = None
    url: str | None = None
    warned: set[str] = field(default_factory=set)


class QueueSink(LogSink):
    """The production event sink: log, queue durably, send (DESIGN section 5).

    ``start()`` runs the sender in a daemon thread (the ``run`` loop); ``flush(timeout)`` sends now
    in the caller's thread (one-shot commands, the watchdog); ``close()`` stops the thread.
    ``delivered`` counts events answered 2xx since this process started (the commit rule of DESIGN
    section 4); ``configured`` is true when reports can be sent (endpoint known, token set, the URL
    safe for the token).
    """

    def __init__(
        self,
        origin: Origin,
        *,
        state_dir: str | Path,
        report_url: str | None = None,
        token: str | None = None,
        disabled: bool = False,
        manifest_url: str | None = None,
        public_keys: Sequence[PublicKey] = (),
        threshold: int = 1,
        clock: Callable[[], datetime] | None = None,
        session: requests.Session | None = None,
        max_events: int = MAX_QUEUE_EVENTS,
        max_bytes: int = MAX_QUEUE_BYTES,
        batch_bytes: int = BATCH_BYTES,
        backoff: Backoff | None = None,
        on_delivery: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(origin, clock)
        self.state_dir = Path(state_dir)
        self.disabled = disabled
        self.token = token
        self.batch_bytes = batch_bytes
        self.backoff = backoff or Backoff()
        self.on_delivery = on_delivery
        self._report_url = report_url
        self._manifest_url = manifest_url
        self._public_keys = list(public_keys)
        self._threshold = threshold
        self._manifest_reports_url: str | None = None
        self._url_cache = _UrlCache()
        # The run loop (``configured``) and the sender thread both look the URL up: one at a time,
        # or the second would read the half-filled cache (ident set, URL not yet) as "no endpoint".
        self._url_lock = threading.Lock()
        self._poster = Poster(token or "", session)
        self._delivered = 0
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_attempt = 0.0
        self.queue: ReportQueue | None = None
        if not disabled:
            self.queue = ReportQueue(self.state_dir / REPORTS_DIR, max_events=max_events, max_bytes=max_bytes)
            if not token:
                log.warning("UPDATE_REPORT_TOKEN is not set: reports are queued but not sent")

    @classmethod
    def from_config(cls, config: AgentConfig, origin: Origin, **kwargs: Any) -> QueueSink:
        return cls(
            origin,
            state_dir=config.state_dir,
            report_url=config.report_url,
            token=config.report_token,
            disabled=config.report_disabled,
            manifest_url=None if config.updates_disabled else config.manifest_url,
            public_keys=config.public_keys,
            threshold=config.signature_threshold,
            **kwargs,
        )

    # -- the EventSink interface

    @property
    def configured(self) -> bool:  # type: ignore[override]
        url = self.report_url()
        return bool(url and self.token and token_allowed(url) and valid_agent_id(self.origin.agent_id))

    @property
    def delivered(self) -> int:
        return self._delivered

    def _deliver(self, event: dict[str, Any]) -> None:
        if self.queue is not None:
            self._sanitise(event)
            if not valid_agent_id(event.get("agent_id")):
                log.error("report not queued: agent id %r is not valid", event.get("agent_id"))
            else:
                try:
                    stored = self.queue.append(event)
                except (OSError, ValueError) as exc:
                    log.error(
                        "report %s (%s) could not be queued: %s", event["event_id"], event["state"], exc
                    )
                else:
                    if stored is not None:
                        event.update({k: stored[k] for k in ("stream", "seq", "dropped") if k in stored})
                    self._wake.set()
        super()._deliver(event)

    @staticmethod
    def _sanitise(event: dict[str, Any]) -> None:
        """What the endpoint would refuse and we can repair: control characters, lengths, nulls."""
        if isinstance(event.get("error"), str):
            event["error"] = clean_text(event["error"], MAX_ERROR_CHARS)
        image = event.get("image")
        if image is not None:
            if isinstance(image, str) and len(image) <= MAX_IMAGE_CHARS:
                event["image"] = clean_text(image, MAX_IMAGE_CHARS)
            else:
                log.warning("report: image reference longer than %d characters left out", MAX_IMAGE_CHARS)
                del event["image"]
        if event.get("platform") is None:
            event["platform"] = ""  # a container agent may run on a platform we have no name for

    # -- where to

    def set_manifest_reports_url(self, url: str | None) -> None:
        """The verified manifest's ``reports_url`` (the runner calls this after each check)."""
        resolved = self._resolve(url)
        if resolved != self._manifest_reports_url:
            self._next_attempt = 0.0  # an endpoint now known (or moved): send now, not after the wait
        self._manifest_reports_url = resolved
        self._wake.set()

    def report_url(self) -> str | None:
        if self.disabled:
            return None
        if self._report_url:
            return self._report_url
        if self._manifest_reports_url:
            return self._manifest_reports_url
        return self._cached_manifest_reports_url()

    def _resolve(self, url: str | None) -> str | None:
        if not url:
            return None
        if self._manifest_url:
            url = urljoin(self._manifest_url, url)
        if urlsplit(url).scheme.lower() not in ("http", "https"):
            log.error("manifest reports_url %r is not an http(s) URL; ignored", url)
            return None
        return url

    def _cached_manifest_reports_url(self) -> str | None:
        """``reports_url`` of the envelope the last check verified and cached (verified again here)."""
        with self._url_lock:
            return self._cached_manifest_reports_url_locked()

    def _cached_manifest_reports_url_locked(self) -> str | None:
        cache = self._url_cache
        path = self.state_dir / CACHED_ENVELOPE
        ident = ReportQueue._ident(path)
        if ident == cache.ident:
            return cache.url
        cache.ident, cache.url = ident, None
        if ident is None or not self._public_keys:
            return None
        try:
            payload = verify_envelope(path.read_bytes(), self._public_keys, self._threshold)
            cache.url = self._resolve(parse_manifest(payload).reports_url)
        except (OSError, ManifestError) as exc:
            log.warning("cannot read reports_url from the cached manifest %s: %s", path, exc)
        return cache.url

    # -- sending

    def pending(self) -> int:
        return 0 if self.queue is None else self.queue.count()

    def _send_round(self, deadline: float | None = None) -> Delivery:
        assert self.queue is not None
        url = self.report_url()
        if url is None or not self.token or not token_allowed(url):
            if url is not None and url not in self._url_cache.warned:
                self._url_cache.warned.add(url)
                if not token_allowed(url):
                    log.error(
                        "reports not sent: %s is plain http to a non-loopback host and the token must not "
                        "travel in the clear; use https",
                        url,
                    )
            return Delivery(failure=Answer(None, NOT_CONFIGURED))
        done = send_pending(
            self.queue,
            lambda events: self._poster.post(url, events, deadline),
            batch_bytes=self.batch_bytes,
        )
        self._delivered += done.sent
        if done.failure is not None and done.retryable:
            _log_failure(done.failure, url)
        if done.sent and self.on_delivery is not None:
            self.on_delivery()
        return done

    def flush(self, timeout: float = 10.0) -> bool:
        """Send what is queued now (ignoring any back-off); True when nothing is left to send.

        Never raises: it runs right before an exec, a restart or an exit, which a report must
        never stop (the events stay queued for the next sender).
        """
        if self.queue is None:
            return True
        deadline = time.monotonic() + timeout
        if not self._send_lock.acquire(timeout=max(timeout, 0.0)):
            return False
        try:
            done = self._send_round(deadline)
            left = self.queue.count()
        except Exception:
            log.exception("sending reports failed; they stay queued")
            return False
        finally:
            self._send_lock.release()
        if done.failure is None:
            self.backoff.succeeded()
            self._next_attempt = 0.0
        return left == 0

    def start(self) -> None:
        """Send in the background from now on (daemon thread; it dies with an ``exec``)."""
        if self.queue is None or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="avika-reports", daemon=True)
        self._thread.start()
        self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the sender thread (queued events stay on disk for the next start)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        assert self.queue is not None
        while not self._stop.is_set():
            wait = None if not self._next_attempt else max(0.0, self._next_attempt - time.monotonic())
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._next_attempt and time.monotonic() < self._next_attempt:
                continue
            try:
                if self.queue.count() == 0:
                    self._next_attempt = 0.0
                    continue
                with self._send_lock:
                    done = self._send_round()
            except Exception:  # the sender must outlive any surprise; the events stay queued
                log.exception("report sender failed; retrying later")
                done = Delivery(failure=Answer(None, "internal error"))
            if done.failure is None:
                self.backoff.succeeded()
                self._next_attempt = 0.0
            elif not done.retryable:
                self._next_attempt = time.monotonic() + IDLE_POLL
            else:
                delay = self.backoff.failed(done.failure.retry_after)
                self._next_attempt = time.monotonic() + delay
                log.info("next report attempt in %.1fs", delay)


def sink_for(config: AgentConfig, origin: Origin, **kwargs: Any) -> EventSink:
    """The agent's sink: the durable queue, or (if its directory cannot be opened) a log-only sink.

    Reporting must never stop an update, a rollback or a restart; a queue that cannot even open
    is said loudly, and the events still reach the log.
    """
    try:
        return QueueSink.from_config(config, origin, **kwargs)
    except OSError as exc:
        log.error("report queue in %s unavailable (%s): events are only logged", config.state_dir, exc)
        return LogSink(origin)
