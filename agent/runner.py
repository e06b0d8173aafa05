"""``avika-agent run``: the long-running loop that checks, applies, watches, commits (DESIGN 4, 7).

On start: take the single-instance run lock (``<state dir>/agent.lock``; a second ``run`` exits
with ``already_running``), write the pid record (``agent.pid``), then
:func:`agent.lifecycle.resume` (count this boot if an update is in flight, roll back if the cap
or the deadline is passed) under the update lock. A new version on watch that finds no watchdog
alive (outside systemd: a host crash killed it, or another supervisor started this process) forks
one for itself. The first check comes after a random splay of at most min(``UPDATE_INTERVAL``,
60 s) -- for a new version on watch, at most the health window too, so the splay never delays its
commit -- then every ``UPDATE_INTERVAL`` with +-10 % jitter; all of it derives from the config
only. While watching, the loop also wakes when the health window ends and then every second until
it commits or its commit deadline (``UPDATE_COMMIT_DEADLINE``) rolls it back, and a check that
failed is retried within :data:`WATCH_RETRY` (not an hour later): the commit waits for one. Commit
and rollback happen under the update lock, which the watchdog takes before it kills a hung agent.

Under systemd (``Type=notify``, :mod:`agent.sdnotify`): ``READY=1`` once resumed, ``WATCHDOG=1``
at every turn of the loop, whose waits never exceed a third of ``$WATCHDOG_USEC``; a check and an
update first stretch the watchdog to their own bounds (fetch and download timeouts).

A check is :func:`agent.check.check` (conditional GET, verify, persist trust state, decide). When
the decision is ``update`` and no update is in flight or backing off, the transaction
(:func:`agent.lifecycle.apply_update`) runs under ``state.update_lock`` and restarts by the
configured method. In a container, or with ``signal-only``, a new version is reported as
``update_available`` (with the image) and the binary is never touched.

Reports: every event goes into the durable queue (:class:`agent.reports.QueueSink`), whose
sender thread starts once the pid record is written and stops when ``run`` ends; the queue is
flushed (2 s at most) before any ``exec``, so the new version's commit usually finds the old
one's events delivered. A delivery wakes the loop: the commit waits for one (DESIGN section 4).

Signals: SIGTERM (or SIGINT) stops cleanly: the ``stopping`` marker tells the watchdog the stop
was on purpose, the pid record is removed. SIGHUP re-execs the target (the ``signal`` method).

Logs go to stderr as text or JSON lines (``--log-format`` / ``AVIKA_LOG_FORMAT``).
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent import buildinfo, check, environment, install, lifecycle, restart, sdnotify
from agent.config import AgentConfig, resolve_agent_id
from agent.decide import NONE, REPORT, UPDATE, Decision
from agent.events import EventSink, Origin
from agent.fetch import DownloadError
from agent.heartbeat import Heartbeat
from agent.manifest import ManifestError
from agent.reports import sink_for
from agent.state import AgentState, LockBusy, load_state, update_lock

log = logging.getLogger(__name__)

RUN_LOCK_FILE = "agent.lock"
LOG_FORMAT_ENV = "AVIKA_LOG_FORMAT"
LOG_FORMATS = ("text", "json")
MAX_SPLAY = 60.0
JITTER = 0.10
# After asking systemd to restart us, how long to wait for its SIGTERM before exec'ing ourselves.
SYSTEMD_STOP_WAIT = 60.0
# How long the queued reports may hold up an exec, and a clean stop (the rest waits on disk).
FLUSH_BEFORE_EXEC = 2.0
CLOSE_TIMEOUT = 2.0
CHECK_ERRORS = (ManifestError, DownloadError, environment.UnsupportedPlatform, OSError)
# While a new version watches, a failed check is retried this soon (its commit waits for one).
WATCH_RETRY = 30.0
# Seconds the loop may wait for the update lock to resume an update in flight (others hold it
# for moments: the watchdog counting a boot or ending a hang, a rollback by hand).
RESUME_LOCK_WAIT = 30.0
# Beyond its fetch (or download) deadline, what else a check (or an update) may take: verifying,
# state writes (a 10 s lock wait at most), the smoke test (10 s), two systemctl calls (30 s each).
CHECK_MARGIN = 15
APPLY_MARGIN = 120


# ---------------------------------------------------------------- logging


_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg, pid, and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                obj[key] = value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


def setup_logging(log_format: str | None) -> None:
    """Text (the CLI default) or JSON lines on stderr; ``None`` reads ``AVIKA_LOG_FORMAT``."""
    fmt = (log_format or os.environ.get(LOG_FORMAT_ENV) or "text").lower()
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: must be text or json")
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
        root.setLevel(logging.INFO)
    formatter: logging.Formatter = (
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    )
    for handler in root.handlers:
        handler.setFormatter(formatter)


# ---------------------------------------------------------------- timing


def first_delay(interval: int, rng: random.Random) -> float:
    """Random splay before the first check: at most min(interval, 60 s), so a fleet never polls at once."""
    return rng.uniform(0.0, min(float(interval), MAX_SPLAY))


def next_delay(interval: int, rng: random.Random) -> float:
    return interval * rng.uniform(1.0 - JITTER, 1.0 + JITTER)


# ---------------------------------------------------------------- shared with `update`


def make_sink(config: AgentConfig, mode: str, *, on_delivery: Callable[[], None] | None = None) -> EventSink:
    """The one place the agent's event sink is chosen: the durable report queue (DESIGN section 5).

    ``UPDATE_REPORT_URL=disabled`` gives a queue that only logs (so does a queue directory that
    cannot be opened, loudly: reporting never stops an update). Tests inject another
    :class:`agent.events.EventSink` (e.g. ``RecordingSink``) through ``Runner(sink=...)``.
    """
    return sink_for(config, origin_for(config, mode), on_delivery=on_delivery)


def origin_for(config: AgentConfig, mode: str) -> Origin:
    agent_id = config.agent_id
    with contextlib.suppress(OSError):
        agent_id = resolve_agent_id(config)
    platform = None
    with contextlib.suppress(environment.UnsupportedPlatform):
        platform = environment.platform_key()
    return Origin(agent_id, buildinfo.VERSION, mode, platform)


def effective_decision(result: check.CheckResult, *, force: bool = False) -> Decision:
    """The check's decision, with ``update --force``.

    The bad-version rule is already the check's (:func:`agent.lifecycle.blocked_pairs`).
    ``--force`` overrides the wave (here) and the back-off (``check(ignore_backoff=True)`` and
    :func:`backoff_until`'s caller): never the signature, serial or bad-version rules.
    """
    decision = result.decision
    if force and decision.action == NONE and decision.reason == "not_in_wave":
        decision = Decision(UPDATE, "forced_by_hand", decision.bucket, decision.in_wave, decision.forced)
    return decision


def backoff_until(result: check.CheckResult, state: AgentState, now: datetime) -> datetime | None:
    """When the next attempt at this (version, sha256) is allowed, if it is still backing off."""
    assert result.manifest is not None and result.platform is not None
    binary = result.manifest.binaries[result.platform]
    if lifecycle.may_attempt(state.attempts, result.manifest.version, binary.sha256, now=now):
        return None
    return lifecycle.next_attempt(state.attempts, result.manifest.version, binary.sha256)


def apply_locked(
    config: AgentConfig,
    result: check.CheckResult,
    decision: Decision,
    *,
    sink: EventSink,
    restart_with: Callable[[lifecycle.Pending], None],
) -> lifecycle.Pending:
    """The transaction under the single-update lock. ``LockBusy`` / ``UpdateInProgress`` if busy."""
    assert result.manifest is not None and result.platform is not None
    with update_lock(config.state_dir):
        fetcher = check.make_fetcher(config)  # with UPDATE_FETCH_TIMEOUT / UPDATE_DOWNLOAD_TIMEOUT
        try:
            return lifecycle.apply_update(
                config,
                result.manifest,
                platform=result.platform,
                manifest_url=config.manifest_url,
                from_version=result.current_version or "",
                fetcher=fetcher,
                sink=sink,
                restart=restart_with,
                now=lambda: datetime.now(timezone.utc),
                in_wave=decision.in_wave,
            )
        finally:
            fetcher.close()


def report_available(sink: EventSink, result: check.CheckResult, decision: Decision) -> None:
    """Container or signal-only: say a version is available (with the image), touch nothing."""
    assert result.manifest is not None
    sink.emit(
        lifecycle.State.UPDATE_AVAILABLE.value,
        target_version=result.manifest.version,
        manifest_serial=result.manifest.serial,
        image=result.manifest.container_image,
        in_wave=decision.in_wave,
    )


# ---------------------------------------------------------------- the loop


class AlreadyRunning(Exception):
    code = "already_running"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _take_run_lock(state_dir: Path) -> int:
    """Held for the life of ``run`` (close-on-exec: an exec'd new version takes it again)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / RUN_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        other = restart.running_agent(state_dir)
        raise AlreadyRunning(
            f"another agent runs with state dir {state_dir}" + (f" (pid {other['pid']})" if other else "")
        ) from None
    return fd


class Runner:
    """One ``run`` process. ``rng`` and ``clock`` are parameters so tests can pin them."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], datetime] | None = None,
        sink: EventSink | None = None,
    ) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.mode = environment.detect(config.deployment_mode).mode
        # A delivered report may be what a commit waits for: it wakes the loop.
        self.wake = threading.Event()
        self.sink = sink or make_sink(config, self.mode, on_delivery=self.wake.set)
        # Liveness (DESIGN section 5): a heartbeat after UPDATE_HEARTBEAT_INTERVAL of silence.
        self.heartbeat = Heartbeat(self.sink, config.heartbeat_interval)
        self.heartbeat.last_result = "disabled" if config.updates_disabled else None
        self.notify = sdnotify.Notifier()
        self.watch: lifecycle.Watch | None = None
        self.stopping = False
        self.reexec = False
        self.systemd_deadline: float | None = None
        self._last_check_error: str | None = None
        self._last_reported: tuple[str, bool | None] | None = None

    # -- signals

    def _on_term(self, signum: int, frame: object) -> None:
        restart.write_stopping(self.config.state_dir)
        self.stopping = True
        self.wake.set()

    def _on_hup(self, signum: int, frame: object) -> None:
        self.reexec = True
        self.wake.set()

    # -- the loop

    def run(self) -> int:
        config = self.config
        lock_fd = _take_run_lock(config.state_dir)
        try:
            restart.write_pid_record(
                config.state_dir, version=buildinfo.VERSION, args=sys.argv[1:], target=config.target
            )
            restart.clear_stopping(config.state_dir)
            self.sink.start()
            # A hang killed by systemd's watchdog (SIGABRT) leaves every thread's stack in the journal.
            with contextlib.suppress(AttributeError, ValueError, OSError, RuntimeError):  # no stderr
                faulthandler.enable()
            signal.signal(signal.SIGTERM, self._on_term)
            signal.signal(signal.SIGINT, self._on_term)
            signal.signal(signal.SIGHUP, self._on_hup)
            log.info(
                "agent %s running (pid %d, mode %s, target %s, restart %s)",
                buildinfo.VERSION,
                os.getpid(),
                self.mode,
                config.target,
                config.restart_method,
            )
            self._resume()
            self.notify.ready(self._status_line())
            self._loop()
            return 0
        finally:
            if self.stopping:
                self.notify.stopping()
            self.notify.close()
            self.sink.close(timeout=CLOSE_TIMEOUT)
            restart.clear_pid_record(config.state_dir)
            os.close(lock_fd)
            log.info("agent stopped")

    def _resume(self) -> None:
        config = self.config
        held = contextlib.ExitStack()
        if os.path.lexists(lifecycle.pending_path(config.state_dir)):
            try:
                held.enter_context(lifecycle.update_lock_waiting(config.state_dir, RESUME_LOCK_WAIT))
            except LockBusy:
                log.warning("the update lock stayed busy for %.0fs; resuming without it", RESUME_LOCK_WAIT)
        with held:
            resumed = lifecycle.resume(config, self.sink, now=self.clock())
        if resumed.outcome is lifecycle.Resumed.ROLLED_BACK:
            self._restart_restored()
        self.watch = resumed.watch
        if self.watch is None:
            self._tidy()
        elif restart.needs_watchdog(config) and restart.watchdog_running(config.state_dir) is None:
            # Nobody supervises this start (a host crash took the watchdog along, or another
            # supervisor started us): fork one, as the old version would have. This start has
            # counted itself already, so the watchdog's reference is the count before it.
            restart.spawn_watchdog(
                config,
                self.sink.origin,
                os.getpid(),
                restart.Launch.of_self(config.target),
                boots_at_start=self.watch.pending.boots - 1,
            )

    def _status_line(self) -> str:
        if self.watch is None:
            return f"avika-agent {buildinfo.VERSION} running"
        pending = self.watch.pending
        return (
            f"avika-agent {buildinfo.VERSION} watching the update from {pending.from_version} "
            f"(commit deadline {pending.deadline})"
        )

    def _tidy(self) -> None:
        """Remove what a killed transaction left next to the target, even if none ever retries."""
        try:
            with update_lock(self.config.state_dir):
                install.cleanup_stale(install.resolve_target(self.config.target))
        except (LockBusy, install.InstallError, OSError) as exc:
            log.debug("no clean-up of stale files now: %s", exc)

    def _loop(self) -> None:
        config = self.config
        if config.updates_disabled:
            log.info("updates are disabled (UPDATE_MODE=%s); not checking", config.update_mode)
            next_check = float("inf")
        else:
            # A new version on watch is judged by a check: spread it within the health window, so
            # the splay never delays the commit.
            spread = (
                min(config.update_interval, config.health_window) if self.watch else config.update_interval
            )
            next_check = time.monotonic() + first_delay(spread, self.rng)
        while not self.stopping:
            self.notify.ping()  # from the loop itself: a loop that hangs stops pinging
            if self.reexec:
                self._reexec()
            if self.systemd_deadline is not None:
                if time.monotonic() >= self.systemd_deadline:
                    log.error("systemd did not restart the agent; exec'ing %s", config.target)
                    self._exec_target()
                self._sleep(self.systemd_deadline - time.monotonic())
                continue
            if self.watch is not None:
                self._evaluate_watch()
            now = time.monotonic()
            if now >= next_check:
                with self.notify.busy(config.fetch_timeout + CHECK_MARGIN):
                    self._check_once()
                next_check = time.monotonic() + self._check_delay()
                continue
            timeout = next_check - now
            if self.watch is not None:
                commit_due = self.watch.started + config.health_window - now
                timeout = min(timeout, max(commit_due, 0.05) if commit_due > 0 else 1.0)
            timeout = min(timeout, self.heartbeat.tick())  # sends one if due (agent/heartbeat.py)
            self._sleep(timeout)

    def _check_delay(self) -> float:
        delay = next_delay(self.config.update_interval, self.rng)
        if self.watch is not None and not self.watch.fetched:
            delay = min(delay, WATCH_RETRY * self.rng.uniform(1.0 - JITTER, 1.0 + JITTER))
        return delay

    def _sleep(self, seconds: float) -> None:
        limit = self.notify.ping_interval or 3600.0
        self.wake.wait(max(0.0, min(seconds, 3600.0, limit)))
        self.wake.clear()

    # -- watch, commit, roll back

    def _evaluate_watch(self) -> None:
        """Commit or roll back when due, under the update lock (busy: look again next turn)."""
        try:
            with update_lock(self.config.state_dir):
                restored = self._judge_watch()
        except LockBusy:
            log.debug("update lock busy; judging the watch at the next turn")
            return
        if restored:
            self._restart_restored()

    def _judge_watch(self) -> bool:
        """True when the old binary was restored (the caller restarts into it)."""
        assert self.watch is not None
        config = self.config
        try:
            current = lifecycle.read_pending(config.state_dir, set_aside_corrupt=False)
        except lifecycle.PendingCorrupt as exc:  # written behind our back: the next start sets it aside
            log.error("%s; not watching any more", exc.message)
            self.watch = None
            return False
        if current is None or current.to_sha256 != self.watch.pending.to_sha256:
            log.info("the update to %s was finished elsewhere; not watching", self.watch.pending.to_version)
            self.watch = None
            return False
        verdict = lifecycle.watch_verdict(
            now=self.clock(),
            deadline=self.watch.pending.deadline_time,
            uptime=time.monotonic() - self.watch.started,
            health_window=config.health_window,
            fetched=self.watch.fetched or config.updates_disabled,
            reported=not self.sink.configured or self.sink.delivered > 0,
        )
        if verdict is lifecycle.Verdict.COMMIT:
            lifecycle.commit(config, self.sink, self.watch)
            self.watch = None
            self.notify.status(self._status_line())
        elif verdict is lifecycle.Verdict.ROLLBACK:
            pending, self.watch = current, None
            return lifecycle.rollback(
                config,
                self.sink,
                pending,
                lifecycle.COMMIT_DEADLINE_PASSED,
                now=self.clock(),
                from_state=lifecycle.State.WATCHING,
            )
        return False

    def _restart_restored(self) -> None:
        """The target is the old binary again: become it (or have systemd restart a sidecar)."""
        if check.is_running_executable(self.config.target):
            try:
                self._exec_target()
            except restart.RestartFailed as exc:
                log.critical("%s; this process keeps running until restarted", exc.message)
            return
        try:
            restart.systemd_restart(self.config.systemd_unit)
        except restart.RestartFailed as exc:
            log.error("cannot restart %s after the rollback: %s", self.config.target, exc.message)

    # -- checks and updates

    def _check_once(self) -> None:
        config = self.config
        try:
            result = check.check(config, mode=self.mode, now=self.clock())
        except CHECK_ERRORS as exc:
            code = getattr(exc, "code", None) or "io_error"
            message = getattr(exc, "message", None) or str(exc)
            log.warning("check failed: %s: %s", code, message)
            self.heartbeat.last_result = code
            if code != self._last_check_error:  # report a change, not every interval of an outage
                self.sink.emit(
                    lifecycle.State.FAILED.value,
                    target_version=None,
                    manifest_serial=None,
                    failed_state=lifecycle.State.CHECKING.value,
                    error=f"{code}: {message}",
                )
            self._last_check_error = code
            return
        self._last_check_error = None
        self.heartbeat.last_result = result.decision.reason
        if self.watch is not None:
            self.watch.fetched = True
        if result.manifest is None:
            return
        self.sink.set_manifest_reports_url(result.manifest.reports_url)
        state = load_state(config.state_dir)
        decision = effective_decision(result)
        log.info(
            "check: manifest %s (serial %d): %s (%s)",
            result.manifest.version,
            result.manifest.serial,
            decision.action,
            decision.reason,
        )
        if decision.action == REPORT:
            key = (result.manifest.version, decision.in_wave)
            if key != self._last_reported:
                report_available(self.sink, result, decision)
                self._last_reported = key
        elif decision.action == UPDATE:
            self._update(result, decision, state)

    def _update(self, result: check.CheckResult, decision: Decision, state: AgentState) -> None:
        assert result.manifest is not None
        if self.watch is not None or lifecycle.pending_path(self.config.state_dir).exists():
            log.info("update to %s waits: an update is in flight", result.manifest.version)
            return
        until = backoff_until(result, state, self.clock())
        if until is not None:
            log.info("update to %s backs off until %s", result.manifest.version, until.isoformat())
            return
        try:
            with self.notify.busy(self.config.download_timeout + APPLY_MARGIN):
                apply_locked(self.config, result, decision, sink=self.sink, restart_with=self._restart_new)
        except (LockBusy, lifecycle.UpdateInProgress) as exc:
            log.warning("update_in_progress: %s", exc)
        except lifecycle.UpdateFailed as exc:
            log.warning("update to %s failed in %s: %s", result.manifest.version, exc.state, exc)

    def _restart_new(self, pending: lifecycle.Pending) -> None:
        """Called by the transaction right after the swap, still under the update lock."""
        config = self.config
        if self.stopping:
            log.info("stopping: %s runs at the next start", pending.to_version)
            return
        if config.restart_method == "systemd":
            try:
                restart.systemd_restart(config.systemd_unit)
            except restart.RestartFailed as exc:
                log.error("%s; exec'ing the new binary instead", exc.message)
            else:
                self.systemd_deadline = time.monotonic() + SYSTEMD_STOP_WAIT
                return
        if restart.needs_watchdog(config):
            restart.spawn_watchdog(
                config,
                self.sink.origin,
                os.getpid(),
                restart.Launch.of_self(config.target),
                boots_at_start=pending.boots,
            )
        if config.restart_method == "signal":
            os.kill(os.getpid(), signal.SIGHUP)  # the handler re-execs, as for a SIGHUP from outside
            return
        self._exec_target()

    def _reexec(self) -> None:
        self.reexec = False
        log.info("SIGHUP: re-exec %s", self.config.target)
        try:
            self._exec_target()
        except restart.RestartFailed as exc:
            log.error("%s; still running", exc.message)

    def _exec_target(self) -> None:
        # The queue survives the exec on disk; sending first lets the next process commit sooner.
        self.sink.flush(timeout=FLUSH_BEFORE_EXEC)
        restart.exec_target(self.config.target, sys.argv[1:])
