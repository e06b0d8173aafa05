"""No content of the queue's files can make the report queue fail (issue 10, agent/report_queue.py).

Property: whatever bytes ``queue.log`` and ``meta.json`` hold -- random, random JSON, valid
frames around hostile payloads (nesting deep enough to exhaust the parser, wrong types, huge
numbers), a valid queue with bytes flipped, cut or inserted -- opening the queue, reading what is
pending, appending an event, acknowledging it and opening it again all work without an exception,
and the queue stays a queue: the new event gets a seq above every seq it kept and above the
acknowledged cursor, it is pending right after the append and gone after its ``ack``, and a second
process sees the same stream and nothing pending.
"""

from __future__ import annotations

import json
import tempfile
import zlib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.report_queue import LOG_FILE, META_FILE, ReportQueue, encode_event, encode_frame
from infra.reports.validation import STATES

EVENT = {
    "event_id": "6f1c0a4e-0000-4000-8000-0000000000aa",
    "agent_id": "host-fuzz-1",
    "version": "1.0.0",
    "mode": "vm",
    "platform": "linux-amd64",
    "state": "heartbeat",
    "target_version": None,
    "manifest_serial": None,
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
plausible_events = st.fixed_dictionaries(
    {},
    optional={
        "seq": st.one_of(st.integers(min_value=-5, max_value=2**70), json_values),
        "stream": st.one_of(st.text(alphabet="0123456789abcdef", min_size=29, max_size=29), json_values),
        "state": st.one_of(st.sampled_from(STATES), json_values),
        "failed_state": st.one_of(st.just("checking"), json_values),
        "target_version": st.one_of(st.none(), json_values),
        "dropped": st.one_of(st.integers(min_value=-3, max_value=2**70), json_values),
        "event_id": st.text(max_size=40),
    },
)


def frame(payload: bytes) -> bytes:
    return b"Q1 %08x %08x " % (len(payload), zlib.crc32(payload)) + payload + b"\n"


payloads = st.one_of(
    plausible_events.map(lambda e: json.dumps(e).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(min_value=1000, max_value=60_000).map(lambda n: b"[" * n),  # too deep to parse
    st.binary(max_size=200),
)
pieces = st.one_of(
    payloads.map(frame), st.binary(max_size=64), st.just(b"\nQ1 "), st.just(b"Q1 ffffffff 00000000 ")
)
logs = st.one_of(st.binary(max_size=2048), st.lists(pieces, max_size=8).map(b"".join))
metas = st.one_of(
    st.binary(max_size=256),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "format": json_values,
            "stream": st.one_of(st.text(alphabet="0123456789abcdef", min_size=29, max_size=29), json_values),
            "acked_seq": st.one_of(st.integers(min_value=-3, max_value=2**70), json_values),
            "dropped_carry": st.one_of(st.integers(min_value=-3, max_value=2**70), json_values),
        },
    ).map(lambda m: json.dumps(m).encode()),
    st.integers(min_value=1000, max_value=200_000).map(lambda n: b"[" * n + b"]" * n),
    st.none(),  # no meta.json at all
)


def exercise(directory: Path) -> None:
    """Everything a sender does with a queue; every step must work, whatever was on disk."""
    queue = ReportQueue(directory)
    kept = queue.pending(limit=10**6, max_bytes=1 << 40)
    assert all(isinstance(e, dict) for e in kept)
    floor = max([queue.acked_seq, *(e["seq"] for e in kept)])
    new = queue.append(dict(EVENT))
    assert new is not None and new["seq"] > floor
    pending = queue.pending(limit=10**6, max_bytes=1 << 40)
    assert pending[-1]["event_id"] == EVENT["event_id"] and pending[-1]["seq"] == new["seq"]
    queue.ack(new["seq"])
    assert queue.count() == 0
    stream = queue.stream
    queue.close()
    again = ReportQueue(directory)
    assert again.stream == stream and again.count() == 0
    again.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(log=logs, meta=metas)
def test_no_queue_file_content_makes_the_queue_fail(log: bytes, meta: bytes | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / LOG_FILE).write_bytes(log)
        if meta is not None:
            (directory / META_FILE).write_bytes(meta)
        exercise(directory)


def _valid_queue(directory: Path, events: int) -> None:
    queue = ReportQueue(directory)
    for i in range(events):
        queue.append({**EVENT, "state": ("checking", "downloading", "heartbeat")[i % 3], "seq_hint": i})
    queue.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.integers(min_value=1, max_value=6),
    target=st.sampled_from([LOG_FILE, META_FILE]),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["flip", "cut", "insert"]), st.integers(min_value=0), st.binary(max_size=8)
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_a_damaged_real_queue_still_works(
    events: int, target: str, edits: list[tuple[str, int, bytes]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        _valid_queue(directory, events)
        data = bytearray((directory / target).read_bytes())
        for kind, at, extra in edits:
            at = at % (len(data) + 1)
            if kind == "flip" and data:
                data[min(at, len(data) - 1)] ^= 0xFF
            elif kind == "cut":
                del data[at:]
            else:
                data[at:at] = extra
        (directory / target).write_bytes(bytes(data))
        exercise(directory)


def test_a_frame_with_a_seq_beyond_what_the_endpoint_stores_is_damaged_not_used(tmp_path: Path) -> None:
    huge: dict[str, Any] = {**EVENT, "seq": 2**63, "stream": "0" * 29}
    (tmp_path / LOG_FILE).write_bytes(encode_frame(encode_event(huge)))
    queue = ReportQueue(tmp_path)
    assert queue.pending() == []
    new = queue.append(dict(EVENT))
    assert new is not None and new["seq"] == 1
