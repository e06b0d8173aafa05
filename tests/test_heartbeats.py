"""Heartbeats, agent side (DESIGN section 5; agent/heartbeat.py, agent/report_queue.py).

Rules enforced here, on data (a fake monotonic clock, a queue directory, no network):
- a heartbeat is sent after ``UPDATE_HEARTBEAT_INTERVAL`` in which nothing else was emitted, never
  before, and any other event restarts the silence; interval 0 never sends one;
- it carries the agent's version, mode and platform, ``last_result`` (the last check's reason or
  error code, at most 64 characters, no control characters) and ``uptime_s``, and the endpoint's own
  validator accepts it;
- in the queue a new heartbeat replaces every unsent older one (a count of dropped events one of
  them carried moves to the new one), never an acknowledged or a different event;
- under pressure heartbeats are dropped first, before ``checking`` / ``update_available``; with only
  install-attempt events left the new heartbeat itself is dropped and counted;
- the run loop sends them (its hook: ``Runner.heartbeat.tick`` before each sleep).
The real ``avika-agent run`` sending heartbeats to the real endpoint is in
``tests/test_update_reports_e2e.py``.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from agent import runner
from agent.config import AgentConfig
from agent.events import Origin, RecordingSink
from agent.heartbeat import Heartbeat
from agent.report_queue import REPORTS_DIR, ReportQueue
from agent.reports import QueueSink
from infra.reports.validation import validate_event

ORIGIN = Origin("host-hb-1", "1.2.3", "vm", "linux-amd64")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def beats(sink: RecordingSink) -> list[dict[str, Any]]:
    return [e for e in sink.events if e["state"] == "heartbeat"]


# ---------------------------------------------------------------- when


def test_a_heartbeat_comes_after_the_interval_of_silence_and_not_before() -> None:
    clock = FakeClock()
    sink = RecordingSink(ORIGIN, monotonic=clock)
    heartbeat = Heartbeat(sink, 60)
    heartbeat.last_result = "up_to_date"
    assert heartbeat.tick() == 60 and beats(sink) == []
    clock.now += 59.5
    assert heartbeat.tick() == pytest.approx(0.5) and beats(sink) == []
    clock.now += 0.5
    assert heartbeat.tick() == 60
    [beat] = beats(sink)
    assert (beat["last_result"], beat["uptime_s"]) == ("up_to_date", 60)
    clock.now += 30
    sink.emit("checking", target_version=None, manifest_serial=None)  # something else was said
    clock.now += 50
    assert heartbeat.tick() == pytest.approx(10) and len(beats(sink)) == 1  # silent for 50 s only
    clock.now += 10
    heartbeat.last_result = "fetch_failed"
    heartbeat.tick()
    assert [b["last_result"] for b in beats(sink)] == ["up_to_date", "fetch_failed"]
    assert [b["uptime_s"] for b in beats(sink)] == [60, 150]


def test_interval_zero_never_sends_one() -> None:
    clock = FakeClock()
    sink = RecordingSink(ORIGIN, monotonic=clock)
    heartbeat = Heartbeat(sink, 0)
    clock.now += 10**7
    assert heartbeat.tick() == float("inf") and sink.events == []


def test_a_heartbeat_is_an_event_the_endpoint_accepts() -> None:
    clock = FakeClock()
    sink = RecordingSink(ORIGIN, monotonic=clock)
    heartbeat = Heartbeat(sink, 1)
    heartbeat.last_result = "bad\x00code-" + "x" * 100
    clock.now += 5
    heartbeat.tick()
    [beat] = sink.events
    assert beat["state"] == "heartbeat"
    assert (beat["version"], beat["mode"], beat["platform"]) == ("1.2.3", "vm", "linux-amd64")
    assert beat["target_version"] is None and beat["manifest_serial"] is None
    assert len(beat["last_result"]) == 64 and "\x00" not in beat["last_result"]
    stored = validate_event({**beat, "stream": "0" * 29, "seq": 1}, 0)
    assert (stored["state"], stored["last_result"], stored["uptime_s"]) == (
        "heartbeat",
        beat["last_result"],
        5,
    )


# ---------------------------------------------------------------- the queue


def _event(state: str, n: int = 0, **kw: Any) -> dict[str, Any]:
    event = {"event_id": f"6f1c0a4e-0000-4000-8000-{n:012d}", "agent_id": ORIGIN.agent_id, "version": "1.2.3"}
    return {**event, "mode": "vm", "platform": "x", "state": state, "target_version": None, **kw}


def states(queue: ReportQueue) -> list[str]:
    return [e["state"] for e in queue.pending(limit=10**6, max_bytes=1 << 40)]


def test_a_new_heartbeat_replaces_an_unsent_older_one(tmp_path: Path) -> None:
    queue = ReportQueue(tmp_path)
    first = queue.append(_event("heartbeat", 1, last_result="up_to_date"))
    queue.append(_event("checking", 2))
    second = queue.append(_event("heartbeat", 3, last_result="fetch_failed"))
    assert first is not None and second is not None
    pending = queue.pending()
    assert [(e["state"], e["event_id"]) for e in pending] == [
        ("checking", _event("x", 2)["event_id"]),
        ("heartbeat", second["event_id"]),
    ]
    assert second["seq"] == 3 and "dropped" not in second  # replaced is not dropped
    assert queue.dropped_total == 0
    reopened = ReportQueue(tmp_path)  # replaced on disk, not only in memory
    assert [e["event_id"] for e in reopened.pending()] == [e["event_id"] for e in pending]


def test_an_acknowledged_heartbeat_is_left_alone_and_a_sent_one_never_takes_the_new_one(
    tmp_path: Path,
) -> None:
    queue = ReportQueue(tmp_path)
    old = queue.append(_event("heartbeat", 1))
    batch = queue.pending()  # the sender took the old heartbeat...
    new = queue.append(_event("heartbeat", 2))  # ...a new one replaced it meanwhile...
    assert old is not None and new is not None
    queue.ack(batch[-1]["seq"])  # ...and the old one's 202 arrives
    assert [e["seq"] for e in queue.pending()] == [new["seq"]]
    queue.ack(new["seq"])
    assert queue.pending() == []
    third = queue.append(_event("heartbeat", 3))
    assert third is not None and [e["seq"] for e in queue.pending()] == [third["seq"]]


def test_heartbeats_are_dropped_first_under_pressure(tmp_path: Path) -> None:
    queue = ReportQueue(tmp_path, max_events=5)  # drops down to 4
    queue.append(_event("checking", 1))
    queue.append(_event("heartbeat", 2))
    queue.append(_event("update_available", 3))
    queue.append(_event("downloading", 4, target_version="2.0.0"))
    queue.append(_event("verifying", 5, target_version="2.0.0"))
    carrier = queue.append(_event("staged", 6, target_version="2.0.0"))
    assert carrier is not None and carrier["dropped"] == 2  # the heartbeat, then the oldest routine one
    assert states(queue) == ["update_available", "downloading", "verifying", "staged"]


def test_with_only_attempt_events_left_a_new_heartbeat_is_dropped_and_counted(tmp_path: Path) -> None:
    queue = ReportQueue(tmp_path, max_events=3)
    for n, state in enumerate(("downloading", "verifying", "staged"), 1):
        queue.append(_event(state, n, target_version="2.0.0"))
    assert queue.append(_event("heartbeat", 4)) is None
    carrier = queue.append(_event("restarting", 5, target_version="2.0.0"))
    assert carrier is not None and carrier["dropped"] == 1
    assert states(queue) == ["downloading", "verifying", "staged", "restarting"]


def test_a_dropped_count_on_a_replaced_heartbeat_moves_to_the_new_one(tmp_path: Path) -> None:
    queue = ReportQueue(tmp_path, max_events=3)
    for n, state in enumerate(("downloading", "verifying", "staged"), 1):
        last = queue.append(_event(state, n, target_version="2.0.0"))
    assert queue.append(_event("checking", 4)) is None  # full of attempt events: dropped, counted
    assert last is not None
    queue.ack(last["seq"])  # delivered: room again
    beat = queue.append(_event("heartbeat", 5))
    assert beat is not None and beat["dropped"] == 1  # the count rides on the next event queued
    newer = queue.append(_event("heartbeat", 6))
    assert newer is not None and newer["dropped"] == 1  # not lost with the heartbeat it replaced
    assert [(e["state"], e.get("dropped")) for e in ReportQueue(tmp_path).pending()] == [("heartbeat", 1)]


# ---------------------------------------------------------------- the run loop's hook


def test_the_run_loop_sends_heartbeats_with_the_last_result(tmp_path: Path) -> None:
    config = AgentConfig(
        agent_id=ORIGIN.agent_id,
        state_dir=tmp_path / "state",
        target=tmp_path / "bin" / "avika-agent",
        update_mode="disabled",
        deployment_mode="vm",
        heartbeat_interval=1,
    )
    sink = RecordingSink(ORIGIN)
    agent = runner.Runner(config, sink=sink)
    got_two = threading.Event()

    class Watch(threading.Thread):
        def run(self) -> None:
            while not got_two.wait(0.05):
                if len(beats(sink)) >= 2:
                    got_two.set()
            agent.stopping = True
            agent.wake.set()

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    watch = Watch(daemon=True)
    watch.start()
    failsafe = threading.Timer(30, got_two.set)
    failsafe.start()
    try:
        assert agent.run() == 0
    finally:
        failsafe.cancel()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    found = beats(sink)
    assert len(found) >= 2, sink.events
    assert {b["last_result"] for b in found} == {"disabled"}
    assert found[0]["uptime_s"] >= 1 and found[1]["uptime_s"] >= found[0]["uptime_s"]


def test_a_heartbeat_through_the_durable_queue_keeps_one_unsent(tmp_path: Path) -> None:
    clock = FakeClock()
    sink = QueueSink(ORIGIN, state_dir=tmp_path, token="0" * 64)  # no endpoint: nothing is sent
    sink.monotonic, sink.last_emitted = clock, clock()
    heartbeat = Heartbeat(sink, 10)
    for _ in range(5):
        clock.now += 10
        heartbeat.tick()
    queue = ReportQueue(tmp_path / REPORTS_DIR)
    assert states(queue) == ["heartbeat"] and sink.pending() == 1
    assert queue.pending()[0]["seq"] == 5  # the fifth, the four before it replaced
