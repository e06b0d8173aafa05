"""Reports for the container half of the fleet: one agent id per workload (DESIGN sections 5 and 10).

Every workload is an agent to the reports endpoint: ``k8s/<cluster>/<namespace>/<kind>/<name>``,
mode ``container``, platform ``kubernetes``. Events carry the fields an agent's do (built as
:class:`agent.events.EventSink` builds them, plus the heartbeat's ``last_result`` and
``uptime_s``) and are checked against the endpoint's own vocabulary
(:func:`infra.reports.validation.validate_event`) before they are queued: an event the endpoint
would refuse is our bug, logged loudly and never queued.

Delivery is the agent's (:mod:`agent.report_queue`, :mod:`agent.reports`): a durable queue per agent id under
``AVIKA_STATE_DIR/reports/`` (a report token is an HMAC of one agent id, so a batch carries one id
only), sent in order, 400s narrowed down, back-off on 5xx/429/network errors, the token never
over plain http except to loopback. A background thread sends; :meth:`WorkloadReporter.flush`
sends what is waiting now (``run --once``, shutdown).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.events import clean_error
from agent.manifest import format_time
from agent.report_queue import ReportQueue
from agent.reports import Backoff, Poster, clean_text, send_pending
from controller.config import ReportTokens
from infra.reports.validation import STATES, ValidationError, validate_event

log = logging.getLogger(__name__)

MODE = "container"
PLATFORM = "kubernetes"
AGENT_ID_FILE = "agent_id"
IDLE_WAIT = 30.0


def queue_dir(root: Path, agent_id: str) -> Path:
    """One queue per agent id; the directory name is a hash (agent ids hold ``/``)."""
    return root / hashlib.sha256(agent_id.encode()).hexdigest()[:20]


def build_event(
    agent_id: str,
    state: str,
    *,
    version: str,
    target_version: str | None,
    serial: int | None,
    now: datetime,
    image: str | None = None,
    in_wave: bool | None = None,
    failed_state: str | None = None,
    error: str | None = None,
    last_result: str | None = None,
    uptime_s: int | None = None,
) -> dict[str, Any]:
    """An event in DESIGN section 5's shape (``stream`` and ``seq`` are the queue's)."""
    if state not in STATES:
        raise ValueError(f"{state!r} is not a reported state")  # our bug
    event: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "time": format_time(now),
        "agent_id": agent_id,
        "state": state,
        "version": clean_text(version or "unknown", 64),
        "mode": MODE,
        "platform": PLATFORM,
        "target_version": target_version,
        "manifest_serial": serial,
    }
    optional = {
        "failed_state": failed_state,
        "error": clean_error(error),
        "image": clean_text(image, 256) if image else None,
        "in_wave": in_wave,
        "last_result": clean_text(last_result, 64) if last_result else None,
        "uptime_s": uptime_s,
    }
    event.update({k: v for k, v in optional.items() if v is not None})
    return event


class WorkloadReporter:
    """Per-workload durable queues and the thread that sends them."""

    def __init__(
        self,
        state_dir: Path,
        tokens: ReportTokens,
        url: str | None,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.root = Path(state_dir) / "reports"
        self.tokens = tokens
        self.disabled = url == "disabled"
        self._configured_url = None if self.disabled else url
        self._manifest_url: str | None = None
        self._clock = clock or (lambda: datetime.now(UTC))
        self._queues: dict[str, ReportQueue] = {}
        self._backoff: dict[str, Backoff] = {}
        self._posters: dict[str, Poster] = {}  # one per agent id: its token, its connection
        self._next_try: dict[str, float] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0
        if not self.disabled:
            self._open_existing()

    # -- where and with what

    @property
    def url(self) -> str | None:
        return self._configured_url or self._manifest_url

    def set_manifest_reports_url(self, url: str | None) -> None:
        """The verified manifest's ``reports_url`` (used unless ``UPDATE_REPORT_URL`` is set)."""
        self._manifest_url = url
        self._wake.set()

    def _open_existing(self) -> None:
        """Queues a previous process left (events not yet acknowledged) are sent too."""
        if not self.root.is_dir():
            return
        for entry in sorted(self.root.iterdir()):
            try:
                agent_id = (entry / AGENT_ID_FILE).read_text().strip()
            except OSError:
                continue
            if agent_id and queue_dir(self.root, agent_id) == entry:
                self._queue(agent_id)

    def _queue(self, agent_id: str) -> ReportQueue:
        with self._lock:
            queue = self._queues.get(agent_id)
            if queue is None:
                directory = queue_dir(self.root, agent_id)
                queue = ReportQueue(directory)
                (directory / AGENT_ID_FILE).write_text(agent_id + "\n")
                self._queues[agent_id] = queue
                self._backoff[agent_id] = Backoff()
            return queue

    # -- emitting

    def emit(self, agent_id: str, state: str, **fields: Any) -> dict[str, Any] | None:
        """Queue one event (durably) and wake the sender; None when it was not queued."""
        if self.disabled:
            return None
        event = build_event(agent_id, state, now=self._clock(), **fields)
        try:
            validate_event({**event, "stream": "0" * 29, "seq": 1}, 0)
        except ValidationError as exc:
            log.error("not reporting an invalid event for %s (%s): %s", agent_id, state, exc.reason)
            return None
        if self.tokens.for_agent(agent_id) is None:
            if agent_id not in self._warned:
                self._warned.add(agent_id)
                log.warning(
                    "no report token for %s: its reports are not sent "
                    "(add AGENT_ID=TOKEN to UPDATE_REPORT_TOKEN; avika-publish enroll %s)",
                    agent_id,
                    agent_id,
                )
            return None
        stored = self._queue(agent_id).append(event)
        self._wake.set()
        return stored

    # -- sending

    def pending(self) -> int:
        with self._lock:
            queues = list(self._queues.values())
        return sum(q.count() for q in queues)

    def send_round(self, *, force: bool = False) -> float | None:
        """Send every queue that is due; the seconds until the next is due (None: nothing waits)."""
        url = self.url
        if url is None:
            return None
        now = time.monotonic()
        with self._lock:
            queues = list(self._queues.items())
        soonest = None
        for agent_id, queue in queues:
            due = self._next_try.get(agent_id, 0.0)
            if not force and due > now:
                soonest = due - now if soonest is None else min(soonest, due - now)
                continue
            token = self.tokens.for_agent(agent_id)
            if token is None or queue.count() == 0:
                continue
            poster = self._posters.get(agent_id)
            if poster is None or poster.token != token:
                poster = self._posters[agent_id] = Poster(token)
            done = send_pending(queue, lambda events, p=poster: p.post(url, events))
            self.sent += done.sent
            if done.failure is None:
                self._backoff[agent_id].succeeded()
                self._next_try.pop(agent_id, None)
                continue
            delay = self._backoff[agent_id].failed(done.failure.retry_after)
            self._next_try[agent_id] = time.monotonic() + delay
            soonest = delay if soonest is None else min(soonest, delay)
            log.warning(
                "reports for %s not delivered (%s %s); retrying in %.0f s",
                agent_id,
                done.failure.status or "no answer",
                done.failure.reason,
                delay,
            )
        return soonest

    def flush(self, timeout: float = 10.0) -> bool:
        """Send what is waiting now, within ``timeout``; True when nothing is left."""
        deadline = time.monotonic() + timeout
        while True:
            self.send_round(force=True)
            if self.pending() == 0 or self.url is None:
                return self.pending() == 0
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def start(self) -> None:
        if self.disabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="avika-reports", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.send_round()
            except Exception:  # the sender must outlive any one bad round
                log.exception("report sender round failed")
                wait = 5.0
            self._wake.wait(IDLE_WAIT if wait is None else max(0.05, min(wait, IDLE_WAIT)))
            self._wake.clear()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            for queue in self._queues.values():
                queue.close()
            self._queues.clear()
            for poster in self._posters.values():
                close = getattr(poster, "close", None)  # the agent's Poster gains close() with its own client
                if close is not None:
                    close()
            self._posters.clear()
