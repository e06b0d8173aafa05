"""The agent's durable report queue and sender (agent/report_queue.py, agent/reports.py; DESIGN 5).

Rules enforced here:
- an event is in the fsync'd log before ``emit`` returns, hence before any POST carries it;
- a torn last record (kill -9 mid-append) is dropped and the file truncated back; a damaged record
  in the middle is skipped, the records after it kept; real SIGKILLs of a sending agent lose and
  duplicate nothing: every appended event reaches the store exactly once, seqs 1..N without reuse;
- a restart continues the same stream and seq and resends exactly the unacknowledged events;
- a full queue drops heartbeats first, then ``checking`` / ``update_available`` (oldest first), then
  check failures, never lifecycle events, and the next event carries the count (``dropped``); a new
  heartbeat replaces an unsent older one (tests/test_heartbeats.py);
- batches of at most 100 in order; 2xx acknowledges; 400 is narrowed to the bad event, which
  alone is dropped; 413 splits; 5xx, 429, 401, 403, 404, 405, 411 and network errors keep the events
  and back off exponentially with jitter; the token never goes to a non-loopback plain-http URL;
- the agent's production sink is this queue (``runner.make_sink``); ``run`` starts its sender, closes
  it on the way out and wakes on each delivery; any ``EventSink`` (a test's ``RecordingSink``)
  stands in for it; events and the endpoint share one vocabulary (states, control characters).
The endpoint is the real one: ``publisher.serve.make_server`` with ``ReportsEndpoint`` + SQLite on
127.0.0.1; a thin wrapper can script failure answers in front of it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import events, runner, transport
from agent.config import AgentConfig
from agent.events import LogSink, Origin, RecordingSink
from agent.report_queue import LOG_FILE, REPORTS_DIR, ReportQueue, encode_event, encode_frame, scan
from agent.reports import Backoff, Poster, QueueSink, token_allowed
from agent.state import CACHED_ENVELOPE
from infra.reports import validation
from infra.reports.auth import make_token
from infra.reports.validation import CONTROL_RE, STREAM_RE
from publisher.serve import UpdateServer, make_server
from tests.agent_fixtures import Release

SECRET = "agent-reports-fleet-secret-0123"
AGENT = "host-01.example.com"
TOKEN = make_token(SECRET, AGENT)
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- a real endpoint


class Scripted:
    """In front of the real ``ReportsEndpoint``: scripted answers first, an optional body cap."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.store = real.store
        self.script: list[tuple[int, dict[str, str]]] = []
        self.max_body: int | None = None
        self.on_request: Any = None

    def handle(self, method: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.on_request is not None:
            self.on_request(body)
        if self.script:
            status, extra = self.script.pop(0)
            return status, {"Content-Type": "application/json", **extra}, b'{"error":"scripted"}'
        if self.max_body is not None and len(body) > self.max_body:
            return 413, {"Content-Type": "application/json"}, b'{"error":"too_large"}'
        return self.real.handle(method, headers, body)


class Endpoint:
    def __init__(self, server: UpdateServer) -> None:
        self.server = server
        self.scripted = Scripted(server.reports)
        server.reports = self.scripted  # type: ignore[assignment]
        self.url = server.url + "/v1/reports"
        self.store = self.scripted.store

    def events(self, agent_id: str = AGENT) -> list[dict[str, Any]]:
        return self.store.agent_events(agent_id)


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[Endpoint]:
    root = tmp_path / "root"
    root.mkdir()
    server = make_server(
        root, port=0, reports_url=f"sqlite:///{tmp_path / 'reports.db'}", fleet_secret=SECRET
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Endpoint(server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        server.reports.store.close()  # type: ignore[union-attr]


class RecordingClient(transport.Client):
    """The real client, remembering each POST: (status or exception, events, Authorization, time)."""

    def __init__(self) -> None:
        super().__init__(proxies={})
        self.calls: list[tuple[int | str, list[dict[str, Any]], str, float]] = []

    def request(self, method: str, url: str, **kwargs: Any) -> transport.Response:
        events = json.loads(kwargs["body"])["events"]
        auth = kwargs["headers"]["Authorization"]
        try:
            response = super().request(method, url, **kwargs)
        except OSError as exc:
            self.calls.append((type(exc).__name__, events, auth, time.monotonic()))
            raise
        self.calls.append((response.status, events, auth, time.monotonic()))
        return response

    @property
    def shape(self) -> list[tuple[int | str, int]]:
        return [(status, len(events)) for status, events, _, _ in self.calls]


def origin(mode: str = "vm", version: str = "0.1.43", agent_id: str = AGENT) -> Origin:
    return Origin(agent_id, version, mode, "linux-amd64")


def make_sink(state_dir: Path, url: str | None = None, **kw: Any) -> QueueSink:
    kw.setdefault("token", TOKEN)
    return QueueSink(kw.pop("origin", None) or origin(), state_dir=state_dir, report_url=url, **kw)


def emit(sink: QueueSink, state: str = "downloading", **kw: Any) -> dict[str, Any]:
    kw.setdefault("target_version", "0.1.44")
    kw.setdefault("manifest_serial", 7)
    return sink.emit(state, **kw)


def queued(state_dir: Path) -> list[dict[str, Any]]:
    """What a fresh process would find in the queue (read through a second queue object)."""
    queue = ReportQueue(state_dir / REPORTS_DIR)
    try:
        return queue.pending(limit=1_000_000, max_bytes=1 << 40)
    finally:
        queue.close()


# ---------------------------------------------------------------- durability


def test_an_event_is_fsynced_to_the_log_before_emit_returns_and_before_any_post(
    tmp_path: Path, endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        with_path = os.readlink(f"/proc/self/fd/{fd}")
        if with_path.endswith(LOG_FILE):
            order.append("fsync log")

    monkeypatch.setattr(os, "fsync", fsync)
    seen_on_disk: list[bool] = []

    def on_request(body: bytes) -> None:  # runs in the server while the agent waits for the answer
        order.append("post")
        ids = {e["event_id"] for e in json.loads(body)["events"]}
        on_disk = {e["event_id"] for e in queued(tmp_path)}
        seen_on_disk.append(ids <= on_disk)

    endpoint.scripted.on_request = on_request
    sink = make_sink(tmp_path, endpoint.url)
    event = emit(sink)
    assert order == ["fsync log"]
    assert [e["event_id"] for e in queued(tmp_path)] == [event["event_id"]]
    assert sink.flush(5)
    assert order == ["fsync log", "post"] and seen_on_disk == [True]
    assert [e["event_id"] for e in endpoint.events()] == [event["event_id"]]


def _five_records(tmp_path: Path) -> tuple[Path, bytes, list[dict[str, Any]]]:
    sink = make_sink(tmp_path / "src")
    events = [emit(sink, error=f"event {i}") for i in range(5)]
    return tmp_path / "src" / REPORTS_DIR, (tmp_path / "src" / REPORTS_DIR / LOG_FILE).read_bytes(), events


@pytest.mark.parametrize(
    "cut", ["one-byte", "mid-header", "header-only", "mid-payload", "no-newline"], ids=str
)
def test_a_torn_last_record_is_dropped_and_the_file_truncated_back(tmp_path: Path, cut: str) -> None:
    src, data, events = _five_records(tmp_path)
    last = scan(data).entries[-1]
    keep = {
        "one-byte": 1,
        "mid-header": 10,
        "header-only": 21,
        "mid-payload": last.size // 2,
        "no-newline": last.size - 1,
    }[cut]
    dst = tmp_path / "dst" / REPORTS_DIR
    shutil.copytree(src, dst)
    (dst / LOG_FILE).write_bytes(data[: last.offset + keep])
    queue = ReportQueue(dst)
    assert [e["event_id"] for e in queue.pending()] == [e["event_id"] for e in events[:4]]
    assert (dst / LOG_FILE).stat().st_size == last.offset  # truncated back to the last good record
    new = queue.append({**events[0], "event_id": "0b8a4c7e-1111-4222-8333-444455556666"})
    assert new is not None and new["seq"] == 5  # the torn one never counted
    assert [e["seq"] for e in queue.pending()] == [1, 2, 3, 4, 5]


def test_a_damaged_record_in_the_middle_is_skipped_and_the_rest_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, data, _ = _five_records(tmp_path)
    second = scan(data).entries[1]
    damaged = bytearray(data)
    damaged[second.offset + 40] ^= 0x01  # a flipped bit in the payload: the CRC no longer matches
    (src / LOG_FILE).write_bytes(bytes(damaged))
    with caplog.at_level(logging.ERROR, "agent.report_queue"):
        queue = ReportQueue(src)
    assert [e["seq"] for e in queue.pending()] == [1, 3, 4, 5]
    assert "damaged" in caplog.text
    assert ReportQueue(src).pending() == queue.pending()  # repaired on disk, not just in memory


_CHILD = r"""
import sys
from agent.events import Origin
from agent.reports import Backoff, QueueSink
state_dir, url, token, agent = sys.argv[1:5]
sink = QueueSink(Origin(agent, "0.1.43", "vm", "linux-amd64"), state_dir=state_dir, report_url=url,
                 token=token, backoff=Backoff(0.01, 0.05))
sink.start()
print("ready", flush=True)
i = 0
while True:
    state = ("checking", "downloading", "verifying")[i % 3]
    event = sink.emit(state, target_version="0.1.44", manifest_serial=7, error="e" * (i % 400))
    print(event["event_id"], event["seq"], flush=True)
    i += 1
    if i % 5 == 0:
        import time; time.sleep(0.002)
"""


@pytest.mark.slow
def test_sigkill_while_appending_and_sending_loses_and_duplicates_nothing(
    tmp_path: Path, endpoint: Endpoint
) -> None:
    rng = random.Random(4)
    printed: dict[str, int] = {}
    rounds = 6
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(rounds):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(tmp_path), endpoint.url, TOKEN, AGENT],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.1, 0.4))
        child.kill()  # SIGKILL: mid-append, mid-POST, mid-ack or mid-compaction
        out, _ = child.communicate(timeout=10)
        for line in out.split(b"\n")[:-1]:  # the last piece may be a torn line
            event_id, seq = line.decode().split()
            printed[event_id] = int(seq)
        # Every event whose append returned is on disk or in the store, right after the kill.
        on_disk = {e["event_id"] for e in queued(tmp_path)}
        stored = {e["event_id"] for e in endpoint.events()}
        assert set(printed) <= on_disk | stored
    assert len(printed) > 100  # the loop really ran
    sink = make_sink(tmp_path, endpoint.url)
    assert sink.flush(30)
    stored_events = endpoint.events()
    by_id = {e["event_id"]: e for e in stored_events}
    assert set(printed) <= set(by_id)
    assert all(by_id[i]["seq"] == seq for i, seq in printed.items())
    # At most one event per kill was appended without its line being printed.
    assert len(by_id) - len(printed) <= rounds
    # One stream, seq 1..N: nothing lost (no gap), no seq reused for two events (no duplicate).
    assert len({e["stream"] for e in stored_events}) == 1
    assert sorted(e["seq"] for e in stored_events) == list(range(1, len(stored_events) + 1))
    assert queued(tmp_path) == []
    assert list((tmp_path / REPORTS_DIR).glob(".*.tmp")) == []  # a rewrite killed half-way left nothing


def test_a_restart_continues_the_stream_and_resends_only_unacknowledged_events(
    tmp_path: Path, endpoint: Endpoint
) -> None:
    first = make_sink(tmp_path, endpoint.url)
    sent = [emit(first, s) for s in ("downloading", "verifying", "staged")]
    assert first.flush(5) and first.delivered == 3
    endpoint.scripted.script = [(503, {})]
    waiting = [emit(first, s) for s in ("restarting", "watching")]
    assert not first.flush(5) and first.pending() == 2
    stream = first.queue.stream  # type: ignore[union-attr]
    assert STREAM_RE.fullmatch(stream)

    client = RecordingClient()
    second = make_sink(tmp_path, endpoint.url, origin=origin(version="0.1.44"), client=client)  # after exec
    assert second.queue.stream == stream  # type: ignore[union-attr]
    assert [e["event_id"] for e in queued(tmp_path)] == [e["event_id"] for e in waiting]
    last = emit(second, "committed")
    assert (last["stream"], last["seq"]) == (stream, 6)
    assert second.flush(5) and second.delivered == 3
    assert [len(events) for _, events, _, _ in client.calls] == [3]  # only the unacknowledged went out
    stored = endpoint.events()
    assert sorted(e["seq"] for e in stored) == [1, 2, 3, 4, 5, 6]
    assert {e["event_id"] for e in stored} == {e["event_id"] for e in [*sent, *waiting, last]}


# ---------------------------------------------------------------- the bound


def test_a_full_queue_drops_routine_events_oldest_first_never_lifecycle_and_counts_them(
    tmp_path: Path, endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    sink = make_sink(tmp_path, endpoint.url, max_events=10)  # drops down to 9 when it overflows
    routine = [emit(sink, ("checking", "update_available")[i % 2]) for i in range(6)]
    lifecycle = [emit(sink, "downloading") for _ in range(4)]
    assert sink.pending() == 10
    fifth = emit(sink, "verifying")
    assert fifth["dropped"] == 2  # the two oldest routine events made room
    ids = [e["event_id"] for e in queued(tmp_path)]
    assert ids == [e["event_id"] for e in [*routine[2:], *lifecycle, fifth]]
    with caplog.at_level(logging.ERROR, "agent.report_queue"):
        more = [emit(sink, "staged") for _ in range(8)]  # routine events go, then the queue grows
    assert [e.get("dropped") for e in more] == [None, 2, None, 2, None, None, None, None]
    assert "over its bound" in caplog.text
    states = [e["state"] for e in queued(tmp_path)]
    assert "checking" not in states and "update_available" not in states
    assert len(states) == 4 + 1 + 8  # every lifecycle event kept, past the bound
    late = emit(sink, "checking")  # only lifecycle left: the newcomer is the one dropped
    assert "seq" not in late
    carrier = emit(sink, "restarting")
    assert carrier["dropped"] == 1
    lifecycle_ids = {e["event_id"] for e in [*lifecycle, fifth, *more, carrier]}

    assert sink.flush(10)
    stored = endpoint.events()
    assert {e["event_id"] for e in stored} == lifecycle_ids
    assert sum(e.get("dropped") or 0 for e in stored) == 2 + 2 + 2 + 1 == sink.queue.dropped_total  # type: ignore[union-attr]


def _raw_event(state: str, **kw: Any) -> dict[str, Any]:
    event = {"event_id": "6f1c0a4e-0000-4000-8000-000000000000", "agent_id": AGENT, "version": "0.1.43"}
    return {**event, "mode": "vm", "platform": "x", "state": state, "target_version": None, **kw}


def test_check_failures_are_dropped_after_routine_events_and_before_any_attempt_event(tmp_path: Path) -> None:
    queue = ReportQueue(tmp_path, max_events=5)  # drops down to 4
    check_failure = queue.append(_raw_event("failed", failed_state="checking", error="fetch_failed: x"))
    h1, h2 = (queue.append(_raw_event("checking")) for _ in range(2))
    l1, l2 = (queue.append(_raw_event("downloading", target_version="0.1.44")) for _ in range(2))
    l3 = queue.append(_raw_event("verifying", target_version="0.1.44"))
    assert l3 is not None and l3["dropped"] == 2
    kept = [e["seq"] for e in queue.pending()]
    assert kept == [check_failure["seq"], l1["seq"], l2["seq"], l3["seq"]]  # type: ignore[index]
    l4 = queue.append(_raw_event("staged", target_version="0.1.44"))
    l5 = queue.append(_raw_event("restarting", target_version="0.1.44"))
    assert l4 is not None and "dropped" not in l4
    assert l5 is not None and l5["dropped"] == 1  # the check failure: no attempt event is expendable
    assert [e["state"] for e in queue.pending()] == ["downloading"] * 2 + [
        "verifying",
        "staged",
        "restarting",
    ]
    assert queue.dropped_total == 3 and h1 and h2


def test_the_byte_bound_drops_routine_events_too(tmp_path: Path) -> None:
    probe = ReportQueue(tmp_path / "probe")
    probe.append(_raw_event("checking", error="z" * 200))
    record = probe.size()
    queue = ReportQueue(tmp_path / "q", max_bytes=record * 5 + record // 2)
    for _ in range(4):
        queue.append(_raw_event("checking", error="z" * 200))
    attempt = queue.append(_raw_event("downloading", target_version="0.1.44", error="z" * 200))
    assert attempt is not None and "dropped" not in attempt and queue.count() == 5
    carrier = queue.append(_raw_event("verifying", target_version="0.1.44", error="z" * 200))
    assert carrier is not None and carrier["dropped"] >= 1
    assert queue.size() <= record * 5 + record // 2
    assert [e["state"] for e in queue.pending()][-2:] == ["downloading", "verifying"]


# ---------------------------------------------------------------- sending


def test_batches_of_100_in_order_are_acknowledged_and_stored_once(tmp_path: Path, endpoint: Endpoint) -> None:
    client = RecordingClient()
    sink = make_sink(tmp_path, endpoint.url, client=client)
    events = [emit(sink, "checking" if i % 2 else "downloading") for i in range(250)]
    assert sink.flush(20) and sink.delivered == 250 and sink.pending() == 0
    assert client.shape == [(202, 100), (202, 100), (202, 50)]
    sent = [e["seq"] for _, batch, _, _ in client.calls for e in batch]
    assert sent == list(range(1, 251))
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth, _ in client.calls)
    assert sorted(e["event_id"] for e in endpoint.events()) == sorted(e["event_id"] for e in events)
    assert (tmp_path / REPORTS_DIR / LOG_FILE).stat().st_size == 0  # compacted once all acknowledged


def test_a_400_is_narrowed_down_and_only_the_bad_event_dropped(
    tmp_path: Path, endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    client = RecordingClient()
    sink = make_sink(tmp_path, endpoint.url, client=client)
    good = [emit(sink) for _ in range(2)]
    bad = emit(sink)
    assert sink.queue is not None
    # A bad event in the log (say, written by an older agent): the endpoint refuses its version.
    sink.queue.ack(0)
    raw = (tmp_path / REPORTS_DIR / LOG_FILE).read_bytes()
    entry = scan(raw).entries[2]
    broken = {**bad, "version": "v" * 65}
    patched = raw[: entry.offset] + encode_frame(encode_event(broken)) + raw[entry.offset + entry.size :]
    (tmp_path / REPORTS_DIR / LOG_FILE).write_bytes(patched)
    good += [emit(sink) for _ in range(2)]
    with caplog.at_level(logging.ERROR, "agent.reports"):
        assert sink.flush(10)
    assert client.shape == [(400, 5), (202, 1), (202, 1), (400, 1), (202, 1), (202, 1)]
    assert sorted(e["event_id"] for e in endpoint.events()) == sorted(e["event_id"] for e in good)
    assert sink.delivered == 4 and sink.queue.refused_total == 1 and sink.pending() == 0
    assert "refused with 400" in caplog.text and bad["event_id"] in caplog.text


def test_a_413_splits_the_batch_until_it_fits(tmp_path: Path, endpoint: Endpoint) -> None:
    client = RecordingClient()
    sink = make_sink(tmp_path, endpoint.url, client=client, batch_bytes=10 << 20)
    events = [emit(sink, error="x" * 300) for _ in range(100)]
    body = len(json.dumps({"events": queued(tmp_path)}, separators=(",", ":")))
    endpoint.scripted.max_body = body // 3  # a third of the batch fits, a half does not
    assert sink.flush(10)
    assert client.shape == [(413, 100), (413, 50), (202, 25), (202, 25), (413, 50), (202, 25), (202, 25)]
    sent = [e["seq"] for status, batch, _, _ in client.calls if status == 202 for e in batch]
    assert sent == list(range(1, 101))  # still in queue order
    assert sorted(e["event_id"] for e in endpoint.events()) == sorted(e["event_id"] for e in events)


@pytest.mark.parametrize(
    ("status", "level"),
    [(500, "WARNING"), (503, "WARNING"), (429, "WARNING"), (401, "ERROR"), (403, "ERROR"), (404, "ERROR"),
     (405, "ERROR"), (411, "ERROR"), (302, "ERROR")],
    ids=str,
)  # fmt: skip
def test_failures_keep_the_events_and_a_later_attempt_delivers_them_once(
    tmp_path: Path, endpoint: Endpoint, caplog: pytest.LogCaptureFixture, status: int, level: str
) -> None:
    endpoint.scripted.script = [(status, {"Location": "https://elsewhere.example/"} if status == 302 else {})]
    sink = make_sink(tmp_path, endpoint.url)
    events = [emit(sink) for _ in range(3)]
    with caplog.at_level(logging.WARNING, "agent.reports"):
        assert not sink.flush(5)
    assert sink.pending() == 3 and sink.delivered == 0 and endpoint.events() == []
    assert any(r.levelname == level and str(status) in r.getMessage() for r in caplog.records)
    assert sink.flush(5) and sink.delivered == 3
    assert sorted(e["event_id"] for e in endpoint.events()) == sorted(e["event_id"] for e in events)


def test_a_wrong_token_gets_the_real_401_and_keeps_the_events(tmp_path: Path, endpoint: Endpoint) -> None:
    client = RecordingClient()
    sink = make_sink(
        tmp_path, endpoint.url, token=make_token("another-fleet-secret-0123456", AGENT), client=client
    )
    emit(sink)
    assert not sink.flush(5)
    assert client.shape == [(401, 1)] and sink.pending() == 1


def test_a_network_error_keeps_the_events(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = make_sink(tmp_path, f"http://127.0.0.1:{port}/v1/reports")
    emit(sink)
    assert not sink.flush(5) and sink.pending() == 1


def test_backoff_is_exponential_with_jitter_capped_and_honours_retry_after() -> None:
    backoff = Backoff(base=2.0, cap=600.0, rng=random.Random(7))
    delays = [backoff.failed() for _ in range(12)]
    for n, delay in enumerate(delays):
        ceiling = min(600.0, 2.0 * 2**n)
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 600.0 and delays[-1] >= 300.0
    assert len(set(delays)) == len(delays)  # jittered, so a fleet does not retry in step
    assert backoff.failed(retry_after=3600) == 600.0  # Retry-After, within the cap
    backoff.succeeded()
    assert 1.0 <= backoff.failed() <= 2.0
    assert Backoff(base=2.0, rng=random.Random(1)).failed(retry_after=30) == 30


def test_the_sender_thread_backs_off_then_delivers(tmp_path: Path, endpoint: Endpoint) -> None:
    endpoint.scripted.script = [(500, {}), (500, {}), (429, {})]
    client = RecordingClient()
    delivered = threading.Event()
    sink = make_sink(
        tmp_path,
        endpoint.url,
        client=client,
        backoff=Backoff(base=0.1, cap=1.0, rng=random.Random(3)),
        on_delivery=delivered.set,
    )
    sink.start()
    try:
        emit(sink)
        assert delivered.wait(10)
    finally:
        sink.close()
    assert [status for status, *_ in client.calls] == [500, 500, 429, 202]
    times = [t for *_, t in client.calls]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2  # >= half of 0.1 * 2^n
    assert sink.delivered == 1 and len(endpoint.events()) == 1


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://reports.example.com/v1/reports", True),
        ("http://127.0.0.1:8080/v1/reports", True),
        ("http://127.8.9.10/v1/reports", True),
        ("http://[::1]:8080/v1/reports", True),
        ("http://localhost/v1/reports", True),
        ("http://LOCALHOST:80/v1/reports", True),
        ("http://reports.example.com/v1/reports", False),
        ("http://10.0.0.1/v1/reports", False),
        ("http://0.0.0.0/v1/reports", False),
        ("http://localhost.evil.example/v1/reports", False),
        ("http://127.0.0.1.nip.io/v1/reports", False),
        ("http://[::ffff:10.0.0.1]/v1/reports", False),
        ("ftp://127.0.0.1/v1/reports", False),
    ],
    ids=lambda v: str(v),
)
def test_the_token_goes_over_plain_http_only_to_loopback(url: str, allowed: bool) -> None:
    assert token_allowed(url) is allowed


def test_the_token_is_never_sent_to_a_non_loopback_http_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_connection(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    monkeypatch.setattr(socket.socket, "connect", no_connection)
    monkeypatch.setattr(socket, "getaddrinfo", no_connection)
    client = RecordingClient()
    sink = make_sink(tmp_path, "http://reports.example.com/v1/reports", client=client)
    emit(sink)
    with caplog.at_level(logging.ERROR, "agent.reports"):
        assert not sink.flush(5)
    assert not sink.configured and sink.pending() == 1
    assert "plain http" in caplog.text
    answer = Poster(TOKEN, client).post("http://10.1.2.3/v1/reports", queued(tmp_path))
    assert answer.status is None and "plain http" in answer.reason
    assert client.calls == []  # the client was never asked


def test_replayed_and_out_of_order_delivery_leaves_the_latest_state_right(
    tmp_path: Path, endpoint: Endpoint
) -> None:
    sink = make_sink(tmp_path / "agent", endpoint.url)
    chain = ("downloading", "verifying", "staged", "restarting", "watching", "committed")
    events = [emit(sink, state) for state in chain]
    before_ack = tmp_path / "before-ack"
    shutil.copytree(tmp_path / "agent" / REPORTS_DIR, before_ack)
    # The newest event arrives first (say, from a retry racing the queue), then the whole queue.
    assert Poster(TOKEN).post(endpoint.url, [events[-1]]).status == 202
    assert sink.flush(5)
    # The acknowledgements are lost (restored from before them): everything is sent again.
    shutil.rmtree(tmp_path / "agent" / REPORTS_DIR)
    shutil.copytree(before_ack, tmp_path / "agent" / REPORTS_DIR)
    again = make_sink(tmp_path / "agent", endpoint.url)
    assert again.pending() == 6 and again.flush(5)
    assert len(endpoint.events()) == 6
    latest = endpoint.store.agent(AGENT)
    assert latest is not None and (latest["state"], latest["seq"]) == ("committed", 6)
    assert [o["state"] for o in endpoint.store.version_outcomes("0.1.44")] == ["committed"]


# ---------------------------------------------------------------- the sink


def test_errors_are_sanitised_so_the_endpoint_accepts_them(tmp_path: Path, endpoint: Endpoint) -> None:
    sink = make_sink(tmp_path, endpoint.url)
    event = emit(sink, "failed", failed_state="downloading", error="bad\x00\x1b[31m\x85\u2028" + "é" * 600)
    assert len(event["error"]) <= 512 and not CONTROL_RE.search(event["error"])
    assert sink.flush(5) and sink.delivered == 1
    assert endpoint.events()[0]["error"] == event["error"]


def test_a_container_update_available_carries_image_and_wave(tmp_path: Path, endpoint: Endpoint) -> None:
    sink = make_sink(tmp_path, endpoint.url, origin=Origin(AGENT, "0.1.43", "container", None))
    emit(sink, "update_available", image="ghcr.io/avika/agent:0.1.44", in_wave=False)
    assert sink.flush(5)
    [stored] = endpoint.events()
    assert (stored["state"], stored["image"], stored["in_wave"], stored["platform"]) == (
        "update_available",
        "ghcr.io/avika/agent:0.1.44",
        False,
        "",
    )


def test_disabled_reporting_queues_nothing(tmp_path: Path) -> None:
    sink = make_sink(tmp_path, "https://reports.example.com/v1/reports", disabled=True)
    event = emit(sink)
    assert "seq" not in event and not sink.configured and sink.flush(1)
    assert not (tmp_path / REPORTS_DIR).exists()


def test_without_endpoint_or_token_events_wait_and_the_commit_is_not_held(tmp_path: Path) -> None:
    no_url = make_sink(tmp_path / "a")
    no_token = make_sink(tmp_path / "b", "https://reports.example.com/v1/reports", token=None)
    for sink in (no_url, no_token):
        emit(sink)
        assert not sink.configured and not sink.flush(1) and sink.pending() == 1


def test_the_endpoint_comes_from_the_verified_cached_manifest(tmp_path: Path, endpoint: Endpoint) -> None:
    release = Release()
    untrusted = Release()
    trusted_keys = [s.public_key for s in release.signers]
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / CACHED_ENVELOPE).write_bytes(untrusted.envelope(reports_url=endpoint.url))
    sink = make_sink(
        state_dir, public_keys=trusted_keys, manifest_url="http://127.0.0.1:1/updates/manifest.json"
    )
    emit(sink)
    assert sink.report_url() is None and not sink.configured  # a forged cache is not believed
    (state_dir / CACHED_ENVELOPE).write_bytes(release.envelope(reports_url=endpoint.url, serial=2))
    assert sink.report_url() == endpoint.url and sink.configured
    assert sink.flush(5) and sink.delivered == 1
    sink.set_manifest_reports_url("/v1/other")  # relative: resolved against the manifest URL
    assert sink.report_url() == "http://127.0.0.1:1/v1/other"


# ---------------------------------------------------------------- wiring into the agent


def agent_config(tmp_path: Path, url: str | None = None, **kw: Any) -> AgentConfig:
    kw.setdefault("update_server", "http://127.0.0.1:9/updates")
    return AgentConfig(
        agent_id=AGENT,
        state_dir=tmp_path / "state",
        target=tmp_path / "bin" / "avika-agent",
        report_url=url,
        report_token=TOKEN,
        **kw,
    )


def test_the_agents_sink_is_the_durable_queue_and_a_delivery_wakes_the_caller(
    tmp_path: Path, endpoint: Endpoint
) -> None:
    woken = threading.Event()
    sink = runner.make_sink(agent_config(tmp_path, endpoint.url), "vm", on_delivery=woken.set)
    assert isinstance(sink, QueueSink) and sink.configured
    event = emit(sink)
    assert [e["event_id"] for e in queued(tmp_path / "state")] == [event["event_id"]]
    assert not woken.is_set()
    assert sink.flush(5) and woken.is_set() and sink.delivered == 1
    assert [e["event_id"] for e in endpoint.events()] == [event["event_id"]]


def test_report_url_disabled_gives_a_sink_that_only_logs(tmp_path: Path) -> None:
    sink = runner.make_sink(agent_config(tmp_path, report_disabled=True), "vm")
    emit(sink)
    assert not sink.configured and sink.flush(1) and not (tmp_path / "state" / REPORTS_DIR).exists()


class SpySink(RecordingSink):
    """A RecordingSink that also records the queue life-cycle calls."""

    def __init__(self) -> None:
        super().__init__(origin())
        self.calls: list[str] = []

    def start(self) -> None:
        self.calls.append("start")

    def close(self, timeout: float = 5.0) -> None:
        self.calls.append(f"close {timeout:g}")


def test_run_starts_the_sender_and_closes_it_on_a_clean_stop(tmp_path: Path) -> None:
    sink = SpySink()
    agent = runner.Runner(agent_config(tmp_path, update_mode="disabled", deployment_mode="vm"), sink=sink)
    assert agent.sink is sink  # a test's sink stands in for the queue

    def stop() -> None:
        agent.stopping = True
        agent.wake.set()

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    timer = threading.Timer(0.3, stop)
    timer.start()
    try:
        assert agent.run() == 0
    finally:
        timer.cancel()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert sink.calls == ["start", f"close {runner.CLOSE_TIMEOUT:g}"]


def test_any_event_sink_stands_in_for_the_queue() -> None:
    sink = RecordingSink()
    sink.start()
    sink.set_manifest_reports_url("https://reports.example.com/v1/reports")
    assert sink.flush(timeout=0.1) is True
    sink.close(timeout=0.1)
    assert (sink.configured, sink.delivered) == (False, 0)  # never holds a commit back


def test_events_use_the_endpoints_vocabulary() -> None:
    assert events.STATES is validation.STATES
    assert events.clean_error("bad\x85byte\x00here") == "bad byte here"  # C1 controls too


def test_a_queue_that_cannot_open_leaves_a_sink_that_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "state"
    blocked.write_text("a file where the state dir should be")
    with caplog.at_level(logging.ERROR, "agent.reports"):
        sink = runner.make_sink(agent_config(tmp_path), "vm")
    assert isinstance(sink, LogSink) and not isinstance(sink, QueueSink)
    assert emit(sink)["state"] == "downloading" and sink.flush(1)
    assert "events are only logged" in caplog.text


def test_flush_never_raises_into_an_exec_or_an_exit(tmp_path: Path, endpoint: Endpoint) -> None:
    sink = make_sink(tmp_path, endpoint.url)
    emit(sink)
    assert sink.queue is not None
    sink.queue.close()  # any failure inside the send round
    assert sink.flush(1) is False
