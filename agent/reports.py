"""Sending the durable report queue (DESIGN section 5, agent side).

Every event the lifecycle emits goes through :class:`QueueSink` (the :class:`agent.events.EventSink`
of a configured agent) into :class:`agent.report_queue.ReportQueue`, the write-ahead log under
``<UPDATE_STATE_DIR>/reports/``, and only from there to the reports endpoint.

The sender (:func:`send_pending`): batches of up to 100 events (and at most ``BATCH_BYTES``) in queue
order, one batch at a time, ``Authorization: Bearer <token>``. 2xx acknowledges the batch; 400 is
narrowed down by resending the batch's events one by one, 413 splits the batch in halves; an event
refused alone (400 or 413) is dropped and logged, so a bad event never blocks the queue. Network
errors, 401, 429 and 5xx keep the events and back off exponentially with jitter (capped at 10 min,
``Retry-After`` honoured); any other answer (403, 404, 405, 411, a redirect...) also keeps them and
backs off, with an error log. The token never goes over plain http except to loopback (127.0.0.0/8,
::1, ``localhost``): such a URL is refused without opening a connection. Each POST, connect to the
answer's last byte, is bounded by :data:`POST_TIMEOUT` (and by a flush's own deadline), so a
dripping endpoint cannot hold the sender (:class:`Poster`, over :mod:`agent.transport`).

Where reports go: ``UPDATE_REPORT_URL``, else the ``reports_url`` of the last verified manifest
(given by the runner with :meth:`QueueSink.set_manifest_reports_url`, else read from the verified
envelope the check caches in the state dir). ``UPDATE_REPORT_URL=disabled`` turns reporting off:
events are then only logged, never queued.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urljoin, urlsplit

from agent import buildinfo, transport
from agent.config import AgentConfig
from agent.events import MAX_ERROR_CHARS, MAX_LAST_RESULT_CHARS, EventSink, LogSink, Origin
from agent.manifest import ManifestError, PublicKey, parse_manifest, verify_envelope
from agent.report_queue import (
    BATCH_BYTES,
    BATCH_EVENTS,
    MAX_QUEUE_BYTES,
    MAX_QUEUE_EVENTS,
    REPORTS_DIR,
    ReportQueue,
    file_ident,
)
from agent.state import CACHED_ENVELOPE
from infra.reports.validation import CONTROL_RE, SURROGATE_RE, valid_agent_id

log = logging.getLogger(__name__)

MAX_IMAGE_CHARS = 256
BACKOFF_BASE = 2.0
BACKOFF_CAP = 600.0
IDLE_POLL = 30.0  # with events waiting but no endpoint known yet, look again this often
CONNECT_TIMEOUT = transport.CONNECT_TIMEOUT
READ_TIMEOUT = transport.READ_TIMEOUT
# One POST, connect to the answer's last byte: a slow or dripping endpoint cannot hold the sender.
POST_TIMEOUT = 60.0
MAX_ANSWER_BYTES = 64 * 1024  # an answer's body is read for its reason only


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
    scheme = parts.scheme.lower()
    if scheme == "https" and host:
        return True
    return scheme == "http" and host is not None and transport.is_loopback_host(host)


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


def _reason(body: bytes, fallback: str) -> str:
    try:
        doc = json.loads(body)
        reason = (doc.get("reason") or doc.get("error")) if isinstance(doc, dict) else None
    except (ValueError, RecursionError):
        reason = None
    return clean_text(str(reason or fallback or ""), 300)


class Poster:
    """POSTs batches with the token; refuses (without connecting) a URL the token may not go to."""

    def __init__(
        self,
        token: str,
        client: transport.Client | None = None,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        post_timeout: float = POST_TIMEOUT,
    ) -> None:
        self.token = token
        self.client = client or transport.Client(user_agent=f"avika-agent/{buildinfo.VERSION}")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.post_timeout = post_timeout

    def post(self, url: str, events: list[dict[str, Any]], deadline: float | None = None) -> Answer:
        """One POST; ``deadline`` (monotonic) is the caller's own limit (a flush before an exec)."""
        if not token_allowed(url):
            return Answer(None, "refusing to send the report token over plain http to a non-loopback host")
        seconds = self.post_timeout
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return Answer(None, DEADLINE)
            seconds = min(seconds, left)
        budget = transport.Budget.lasting(seconds, idle=self.read_timeout, connect=self.connect_timeout)
        body = json.dumps({"events": events}, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        try:
            with self.client.request("POST", url, headers=headers, body=body, budget=budget) as response:
                answer = response.read(MAX_ANSWER_BYTES)
        except transport.DeadlineExceeded:
            if seconds < self.post_timeout:
                return Answer(None, DEADLINE)
            return Answer(None, f"no complete answer within {seconds:g}s")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return Answer(None, transport.describe(exc))
        return Answer(
            response.status,
            _reason(answer, response.reason),
            _retry_after(response.headers.get("retry-after")),
        )

    def close(self) -> None:
        self.client.close()


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
    """``reports_url`` of the cached, verified envelope: read again only when that file changes."""

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
        client: transport.Client | None = None,
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
        self._poster = Poster(token or "", client)
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
        if isinstance(event.get("last_result"), str):
            event["last_result"] = clean_text(event["last_result"], MAX_LAST_RESULT_CHARS)
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
        ident = file_ident(path)
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
        self._poster.close()

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
