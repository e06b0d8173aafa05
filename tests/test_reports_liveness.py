"""Liveness in the reports store (DESIGN section 5), through the real Lambda handler on both stores.

Rules enforced here:
- every accepted event moves its agent's ``last_seen`` to the server's receive time;
- a ``heartbeat`` sets ``last_seen`` and ``last_result`` on the agent's STATE and nothing else: its
  lifecycle state, version, position and VERSION# outcomes stay put, and no event item is stored
  (liveness is not history);
- ``last_result`` is sticky: a later lifecycle event that does not carry one keeps it;
- an agent the store never heard of gets its first STATE from a heartbeat (state ``heartbeat``),
  which any later lifecycle event supersedes;
- ``last_change`` is the receive time of the event that set the current state;
- ``scan`` pages through every agent from a position, ``where`` narrows (callers re-check);
- audit entries come back newest first, on SQLite and DynamoDB;
- an SQLite file made before the state columns existed is migrated on open.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path

import pytest
import reports_fixtures
from reports_fixtures import AGENT, NOW, Backend, make_event

from infra.reports.store import SQLiteStore, Where, rfc3339_ms
from infra.reports.validation import validate_event

aws = reports_fixtures.aws
backend = reports_fixtures.backend
clean_config = reports_fixtures.clean_config


def heartbeat(seq: int, **fields: object) -> dict:
    base = {"target_version": None, "manifest_serial": None, "last_result": "up_to_date", "uptime_s": 3600}
    return make_event(seq=seq, state="heartbeat", **{**base, **fields})


def test_a_heartbeat_moves_last_seen_and_nothing_else(backend: Backend) -> None:
    assert backend.post([make_event(seq=1, state="committed", version="0.1.44")])[0] == 202
    before = backend.store.agent(AGENT)
    events_before = backend.store.agent_events(AGENT)
    outcomes_before = backend.store.version_outcomes("0.1.44")

    backend.clock.now = NOW + 3600
    status, body = backend.post([heartbeat(2)])

    assert (status, body) == (202, {"accepted": 1, "duplicates": 0})
    after = backend.store.agent(AGENT)
    assert after["last_seen"] == rfc3339_ms(NOW + 3600)
    assert after["last_result"] == "up_to_date"
    assert (after["state"], after["version"], after["seq"]) == ("committed", "0.1.44", 1)
    assert after["last_change"] == before["last_change"] == rfc3339_ms(NOW)
    assert backend.store.agent_events(AGENT) == events_before  # no event item for a heartbeat
    assert backend.store.version_outcomes("0.1.44") == outcomes_before


def test_last_result_is_kept_by_a_later_event_without_one(backend: Backend) -> None:
    backend.post([heartbeat(1, last_result="halted")])
    backend.clock.now = NOW + 60
    backend.post([make_event(seq=2, state="update_available", mode="container", image="x:1")])
    state = backend.store.agent(AGENT)
    assert (state["state"], state["last_result"]) == ("update_available", "halted")
    backend.post([heartbeat(3, last_result="not_in_wave")])
    assert backend.store.agent(AGENT)["last_result"] == "not_in_wave"


def test_the_first_heartbeat_of_an_unknown_agent_makes_its_state(backend: Backend) -> None:
    status, _ = backend.post([heartbeat(5, version="0.1.43")])
    assert status == 202
    state = backend.store.agent(AGENT)
    assert (state["state"], state["version"], state["last_result"]) == ("heartbeat", "0.1.43", "up_to_date")
    assert [r["agent_id"] for _, r in backend.store.scan()] == [AGENT]
    assert backend.store.agent_events(AGENT) == []
    backend.clock.now = NOW + 10
    backend.post([make_event(seq=6, state="downloading")])
    state = backend.store.agent(AGENT)
    assert (state["state"], state["last_change"], state["last_result"]) == (
        "downloading",
        rfc3339_ms(NOW + 10),
        "up_to_date",
    )


def test_heartbeats_in_a_batch_with_lifecycle_events(backend: Backend) -> None:
    batch = [make_event(seq=1, state="downloading"), heartbeat(2), make_event(seq=3, state="verifying")]
    assert backend.post(batch) == (202, {"accepted": 3, "duplicates": 0})
    state = backend.store.agent(AGENT)
    assert (state["state"], state["seq"], state["last_result"]) == ("verifying", 3, "up_to_date")
    assert sorted(e["state"] for e in backend.store.agent_events(AGENT)) == ["downloading", "verifying"]


def test_a_replayed_old_event_still_proves_the_agent_alive(backend: Backend) -> None:
    event = make_event(seq=1, state="committed", version="0.1.44")
    backend.post([event])
    backend.clock.now = NOW + 7200
    assert backend.post([event]) == (202, {"accepted": 0, "duplicates": 1})
    state = backend.store.agent(AGENT)
    assert (state["last_seen"], state["last_change"]) == (rfc3339_ms(NOW + 7200), rfc3339_ms(NOW))


def test_scan_pages_from_any_position_and_where_narrows(backend: Backend) -> None:
    ids = sorted(f"a-{uuid.uuid4().hex[:10]}" for _ in range(23))
    for n, agent_id in enumerate(ids):
        mode = "container" if n % 3 == 0 else "vm"
        event = validate_event(make_event(agent_id=agent_id, mode=mode), 0)
        backend.store.put_events([event], NOW + n)
    everything = list(backend.store.scan(page_size=4))
    assert sorted(row["agent_id"] for _, row in everything) == ids
    positions = [p for p, _ in everything]
    assert len(set(positions)) == len(ids)
    middle = positions[10]
    rest = [row["agent_id"] for _, row in backend.store.scan(after=middle, page_size=3)]
    assert rest == [row["agent_id"] for _, row in everything[11:]]
    containers = [r for _, r in backend.store.scan(where=Where(mode="container")) if r["mode"] == "container"]
    assert len(containers) == 8
    row = everything[0][1]
    assert set(row) >= {"agent_id", "state", "version", "last_seen", "last_change", "in_wave", "image"}


@pytest.mark.parametrize("position", ["nope", "99:x", "3:", "-1:a", "1:a b"])
def test_a_foreign_scan_position_is_refused_by_dynamodb(aws: None, position: str) -> None:
    from reports_fixtures import create_table

    from infra.reports.dynamodb import DynamoDBStore

    create_table("t")
    with pytest.raises(ValueError):
        list(DynamoDBStore("t").scan(after=position))


def test_audit_entries_newest_first(backend: Backend) -> None:
    for n in range(3):
        entry = {"time": f"2026-02-15T20:0{n}:00.000Z", "who": "ops", "action": "halt", "serial_before": n}
        backend.store.put_audit(entry)
    assert [e["serial_before"] for e in backend.store.audit()] == [2, 1, 0]
    assert [e["serial_before"] for e in backend.store.audit(limit=2)] == [2, 1]
    assert backend.store.audit()[0]["who"] == "ops"


OLD_SCHEMA = """
CREATE TABLE events (agent_id TEXT NOT NULL, event_id TEXT NOT NULL, received_at TEXT NOT NULL,
    expires_at INTEGER NOT NULL, data TEXT NOT NULL, PRIMARY KEY (agent_id, event_id)) WITHOUT ROWID;
CREATE TABLE agent_state (agent_id TEXT PRIMARY KEY, stream TEXT NOT NULL, stream_key TEXT NOT NULL,
    seq INTEGER NOT NULL, last_seen TEXT NOT NULL, data TEXT NOT NULL);
CREATE TABLE version_outcomes (version TEXT NOT NULL, agent_id TEXT NOT NULL, stream TEXT NOT NULL,
    stream_key TEXT NOT NULL, seq INTEGER NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (version, agent_id)) WITHOUT ROWID;
"""


def test_a_database_from_before_the_state_columns_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    record = {**validate_event(make_event(state="failed", error="boom", in_wave=True), 0)}
    record["received_at"] = "2026-02-15T19:00:00.000Z"
    db.execute(
        "INSERT INTO agent_state VALUES (?, ?, ?, ?, ?, ?)",
        (AGENT, record["stream"], record["stream"], 1, "2026-02-15T19:30:00.000Z", json.dumps(record)),
    )
    db.commit()
    db.close()

    store = SQLiteStore(path)
    [(_, row)] = list(store.scan())
    assert (row["state"], row["error"], row["in_wave"], row["version"]) == ("failed", "boom", True, "0.1.43")
    assert (row["last_seen"], row["last_change"]) == ("2026-02-15T19:30:00.000Z", "2026-02-15T19:00:00.000Z")
    store.put_events([validate_event(heartbeat(2), 0)], NOW)
    assert store.agent(AGENT)["state"] == "failed"
    store.close()
    assert SQLiteStore(path).agent(AGENT)["last_result"] == "up_to_date"  # a second open: nothing to do
