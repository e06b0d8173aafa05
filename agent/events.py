"""Where the update lifecycle reports each state it enters (DESIGN sections 4 and 5).

The lifecycle, the runner and the watchdog call one method, :meth:`EventSink.emit`, and never
know where the event goes. The base class builds the event with the fields DESIGN section 5
names (``event_id``, ``time``, ``state``, ``agent_id``, ``version``, ``mode``, ``platform``,
``target_version``, ``manifest_serial`` and the optional ``failed_state``, ``error``, ``image``,
``in_wave``, ``last_result``, ``uptime_s``); a sink implements only :meth:`EventSink._deliver`.
``last_emitted`` (monotonic) is when this sink last reported anything: a heartbeat is due after
``UPDATE_HEARTBEAT_INTERVAL`` of silence (:mod:`agent.heartbeat`). ``stream`` and ``seq`` belong
to the durable report queue (:class:`agent.reports.QueueSink`, the production sink behind this
same interface), which numbers events as it appends them.

- :class:`LogSink` writes each event as one log record (a JSON line with ``--log-format json``);
- :class:`RecordingSink` keeps them in memory for tests.

``configured`` / ``delivered`` tell the commit rule (DESIGN section 4) whether reporting is on
and whether a report reached the endpoint since this process started; a sink without an
endpoint is never "configured", so it never holds a commit back. ``start`` / ``flush`` /
``close`` / ``set_manifest_reports_url`` are the queue's life cycle, called by the runner, the
one-shot commands and the watchdog; here they do nothing, so any sink substitutes for the queue.

The vocabulary (the states, what counts as a control character) is the endpoint's own,
:mod:`infra.reports.validation`: one definition for the agent and the Lambda.
"""

from __future__ import annotations

import abc
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from agent.manifest import format_time
from infra.reports.validation import CONTROL_RE, STATES

log = logging.getLogger("agent.events")

# DESIGN section 5: `error` is at most 512 characters, `last_result` 64, without control characters.
MAX_ERROR_CHARS = 512
MAX_LAST_RESULT_CHARS = 64


def clean_error(text: str | None, limit: int = MAX_ERROR_CHARS) -> str | None:
    """An ``error`` (or ``last_result``) fit for a report: control characters replaced, at most ``limit``."""
    if text is None:
        return None
    text = CONTROL_RE.sub(" ", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Origin:
    """Who reports: the fields every event of this process shares."""

    agent_id: str | None
    version: str
    mode: str  # vm | container
    platform: str | None


class EventSink(abc.ABC):
    """Builds events; a subclass delivers them (:meth:`_deliver`)."""

    #: True when events are sent to a reports endpoint (the commit waits for one delivery).
    configured: bool = False

    def __init__(
        self,
        origin: Origin,
        clock: Callable[[], datetime] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.origin = origin
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self.monotonic = monotonic
        #: ``monotonic()`` of the last event emitted (or of the sink's creation).
        self.last_emitted = monotonic()

    @property
    def delivered(self) -> int:
        """Reports delivered (2xx) since this process started."""
        return 0

    # -- the report queue's life cycle (no-ops unless the sink sends somewhere)

    def start(self) -> None:  # noqa: B027 - optional hook
        """Begin delivering in the background (the ``run`` loop)."""

    def flush(self, timeout: float = 10.0) -> bool:
        """Deliver what is waiting now, within ``timeout``; True when nothing is left to send."""
        return True

    def close(self, timeout: float = 5.0) -> None:  # noqa: B027 - optional hook
        """Stop background delivery (undelivered events stay wherever the sink keeps them)."""

    def set_manifest_reports_url(self, url: str | None) -> None:  # noqa: B027 - optional hook
        """The verified manifest's ``reports_url`` (after each successful check)."""

    def emit(
        self,
        state: str,
        *,
        target_version: str | None,
        manifest_serial: int | None,
        failed_state: str | None = None,
        error: str | None = None,
        image: str | None = None,
        in_wave: bool | None = None,
        last_result: str | None = None,
        uptime_s: int | None = None,
    ) -> dict[str, Any]:
        """Report that the update entered ``state``; returns the event as delivered."""
        if state not in STATES:
            raise ValueError(f"{state!r} is not a reported state")  # our bug, not the fleet's
        event: dict[str, Any] = {
            "event_id": str(uuid.uuid4()),
            "time": format_time(self._clock()),
            "agent_id": self.origin.agent_id,
            "state": state,
            "version": self.origin.version,
            "mode": self.origin.mode,
            "platform": self.origin.platform,
            "target_version": target_version,
            "manifest_serial": manifest_serial,
        }
        optional = {
            "failed_state": failed_state,
            "error": clean_error(error),
            "image": image,
            "in_wave": in_wave,
            "last_result": clean_error(last_result, MAX_LAST_RESULT_CHARS),
            "uptime_s": uptime_s,
        }
        event.update({k: v for k, v in optional.items() if v is not None})
        self.last_emitted = self.monotonic()
        self._deliver(event)
        return event

    @abc.abstractmethod
    def _deliver(self, event: dict[str, Any]) -> None: ...


class LogSink(EventSink):
    """One log record per event: ``event`` carries the whole object for the JSON formatter."""

    def _deliver(self, event: dict[str, Any]) -> None:
        level = logging.WARNING if event["state"] in ("failed", "rolled_back") else logging.INFO
        detail = " ".join(
            f"{k}={event[k]}"
            for k in ("target_version", "failed_state", "error", "last_result", "uptime_s")
            if event.get(k) is not None
        )
        log.log(level, "update state %s %s", event["state"], detail, extra={"event": event})


class RecordingSink(EventSink):
    """Keeps every event, in order (tests)."""

    def __init__(
        self,
        origin: Origin | None = None,
        clock: Callable[[], datetime] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(origin or Origin("test-agent", "0.0.0", "vm", "linux-amd64"), clock, monotonic)
        self.events: list[dict[str, Any]] = []

    def _deliver(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    @property
    def states(self) -> list[str]:
        return [e["state"] for e in self.events]
