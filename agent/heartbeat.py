"""Liveness: an agent with nothing to report still says it is alive (DESIGN section 5).

After ``UPDATE_HEARTBEAT_INTERVAL`` in which its sink emitted nothing, the ``run`` loop sends one
``heartbeat`` event: its version, mode and platform (every event carries them), ``last_result``
(the last check's decision reason, e.g. ``up_to_date`` / ``not_in_wave``, or its error code, e.g.
``fetch_failed``) and ``uptime_s`` (seconds since this process started). Any other event resets
the silence, so an agent that reports anyway sends no heartbeat. Interval 0 turns them off.

The queue keeps at most one unsent heartbeat and drops them first when full
(:mod:`agent.report_queue`); the endpoint moves ``last_seen`` on them, never the agent's state.
"""

from __future__ import annotations

import math

from agent.events import EventSink
from infra.reports.validation import HEARTBEAT as HEARTBEAT_STATE


class Heartbeat:
    """Decides when the loop sends a heartbeat; the loop calls :meth:`tick` before each sleep."""

    def __init__(
        self,
        sink: EventSink,
        interval: float,
        *,
        started: float | None = None,
    ) -> None:
        self.sink = sink
        self.interval = interval
        self.clock = sink.monotonic  # the clock ``last_emitted`` is read on
        self.started = self.clock() if started is None else started
        #: The last check's reason or error code (the runner sets it after every check).
        self.last_result: str | None = None

    def due_in(self) -> float:
        """Seconds until a heartbeat is due (0: now; infinite when heartbeats are off)."""
        if self.interval <= 0:
            return math.inf
        return max(0.0, self.sink.last_emitted + self.interval - self.clock())

    def tick(self) -> float:
        """Send a heartbeat if one is due; the seconds until the next one may be."""
        if self.interval <= 0:
            return math.inf
        if self.due_in() <= 0:
            self.sink.emit(
                HEARTBEAT_STATE,
                target_version=None,
                manifest_serial=None,
                last_result=self.last_result,
                uptime_s=max(0, int(self.clock() - self.started)),
            )
        return self.due_in()
