"""Property: the endpoint core answers every body with a documented status and never raises."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from reports_fixtures import AGENT, NOW, SECRET, bearer, make_event

from infra.reports.core import STATUSES, ReportsEndpoint
from infra.reports.store import SQLiteStore

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FIELDS = sorted(make_event())


@st.composite
def mutated_batches(draw: st.DrawFn) -> bytes:
    """Mostly-valid batches with a few fields replaced by arbitrary JSON (reaches field checks)."""
    events = []
    for seq in range(1, draw(st.integers(1, 4)) + 1):
        event = make_event(seq=seq)
        for name in draw(st.lists(st.sampled_from([*FIELDS, "error", "in_wave", "dropped"]), max_size=3)):
            event[name] = draw(JSON_VALUES)
        events.append(event)
    return json.dumps({"events": events}).encode()


@pytest.fixture(scope="module")
def endpoint() -> Iterator[ReportsEndpoint]:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(f"{tmp}/fuzz.db")
        yield ReportsEndpoint(store, [SECRET.encode()], clock=lambda: NOW)
        store.close()


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=2048) | mutated_batches(), method=st.sampled_from(["POST", "POST", "GET"]))
def test_any_body_gets_a_documented_answer(endpoint: ReportsEndpoint, body: bytes, method: str) -> None:
    status, headers, answer = endpoint.handle(method, bearer(), body)
    event(f"status {status}")
    assert status in STATUSES and status != 500
    decoded = json.loads(answer)
    assert headers["Content-Type"] == "application/json"
    if status == 202:
        assert decoded["accepted"] + decoded["duplicates"] >= 1
        assert endpoint.store.agent(AGENT) is not None
    else:
        assert isinstance(decoded["reason"], str)
