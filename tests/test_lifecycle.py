"""The update state machine, its decisions and its one record, without processes (DESIGN section 4).

Rules enforced here:
- every move is a row of the transition table; anything else is our bug (RuntimeError);
- the pending record has exactly the contract's fields, its deadline is the swap plus
  ``UPDATE_COMMIT_DEADLINE``, it is written atomically; a corrupt or mistyped one (any bytes at
  all: property-tested, also through ``resume``) is set aside and reported, never a traceback;
- on start the target's hash says where a killed update stopped; boots count durably first; the
  boot cap and the commit deadline roll back;
- commit needs the health window, a successful check and (if configured) a delivered report;
- crashes and hangs are remembered for good by (version, sha256), a missed deadline only backs
  off: one rule, ``blocked_pairs(state, now=...)``, used by ``check`` (so ``update`` and ``run`` too);
- failed attempts back off interval * 2**n, capped at 6 h.

The I/O functions (resume, rollback, commit, apply_update) run here on real files in tmp_path
with the install steps injected where a process would be needed.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import events, install, lifecycle
from agent.config import AgentConfig
from agent.events import RecordingSink
from agent.fetch import ChecksumMismatch, DownloadStopped, SizeExceeded
from agent.lifecycle import Event, Pending, Start, State, Verdict
from agent.manifest import Binary, Manifest, format_time
from agent.state import AgentState, load_state, save_state
from tests.agent_fixtures import sha256

NOW = datetime(2026, 2, 15, 20, 0, 0, tzinfo=timezone.utc)
OLD, NEW = b"#!/bin/sh\necho 1.0.0\n", b"#!/bin/sh\necho 1.1.0\n"
CONTRACT_FIELDS = {
    "from_version",
    "to_version",
    "from_sha256",
    "to_sha256",
    "target",
    "backup",
    "serial",
    "boots",
    "swapped_at",
    "deadline",
}


def pending(**changes: object) -> Pending:
    base = lifecycle.new_pending(
        from_version="1.0.0",
        to_version="1.1.0",
        from_sha256=sha256(OLD),
        to_sha256=sha256(NEW),
        target=Path("/opt/avika/avika-agent"),
        serial=7,
        now=NOW,
        commit_deadline=660,  # the default: health window 60 s + 10 min
    )
    return replace(base, **changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the table


HAPPY_CHAIN = [
    (Event.FOUND, State.UPDATE_AVAILABLE),
    (Event.START, State.DOWNLOADING),
    (Event.DONE, State.VERIFYING),
    (Event.DONE, State.STAGED),
    (Event.DONE, State.RESTARTING),
    (Event.BOOTED, State.WATCHING),
    (Event.COMMIT, State.COMMITTED),
]


def test_the_happy_path_walks_every_reported_state_in_design_order():
    sink = RecordingSink()
    tracker = lifecycle.Tracker(sink, State.CHECKING, "1.1.0", 7)
    for event, expected in HAPPY_CHAIN:
        assert tracker.post(event) is expected
    assert sink.states == [s.value for _, s in HAPPY_CHAIN]
    assert all(e["target_version"] == "1.1.0" and e["manifest_serial"] == 7 for e in sink.events)


@pytest.mark.parametrize(
    "state",
    [
        State.CHECKING,
        State.UPDATE_AVAILABLE,
        State.DOWNLOADING,
        State.VERIFYING,
        State.STAGED,
        State.RESTARTING,
    ],
)
def test_every_step_before_the_commit_can_fail_and_reports_where(state):
    sink = RecordingSink()
    tracker = lifecycle.Tracker(sink, state, "1.1.0", 7)
    tracker.post(Event.FAIL, code="smoke_test_failed", message="printed 1.0.9")
    assert sink.events[-1]["state"] == "failed"
    assert sink.events[-1]["failed_state"] == state.value
    assert sink.events[-1]["error"] == "smoke_test_failed: printed 1.0.9"


@pytest.mark.parametrize("state", [State.RESTARTING, State.WATCHING])
def test_only_a_swapped_update_can_roll_back(state):
    assert lifecycle.next_state(state, Event.ROLLBACK) is State.ROLLED_BACK


@pytest.mark.parametrize("state", [State.COMMITTED, State.ROLLED_BACK, State.FAILED])
def test_terminal_states_have_no_way_out(state):
    for event in Event:
        with pytest.raises(RuntimeError):
            lifecycle.next_state(state, event)


def test_a_move_missing_from_the_table_is_a_bug_not_a_state():
    with pytest.raises(RuntimeError, match="no transition from downloading on commit"):
        lifecycle.next_state(State.DOWNLOADING, Event.COMMIT)
    with pytest.raises(RuntimeError):
        lifecycle.next_state(State.STAGED, Event.ROLLBACK)  # nothing swapped: nothing to roll back


def test_the_states_reported_are_the_state_machine_s_and_heartbeat():
    assert set(events.STATES) == {s.value for s in State} | {"heartbeat"}  # liveness, not a lifecycle state


def test_every_state_is_reachable_from_checking():
    reached, frontier = {State.CHECKING}, [State.CHECKING]
    while frontier:
        current = frontier.pop()
        for (source, _), target in lifecycle.TRANSITIONS.items():
            if source is current and target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(State)


# ---------------------------------------------------------------- the pending record


def test_pending_record_has_exactly_the_contract_fields(tmp_path):
    lifecycle.write_pending(tmp_path, pending())
    on_disk = json.loads((tmp_path / "pending.json").read_text())
    assert set(on_disk) == CONTRACT_FIELDS
    assert on_disk["boots"] == 0
    assert on_disk["backup"] == "/opt/avika/avika-agent.backup"
    assert on_disk["swapped_at"] == "2026-02-15T20:00:00Z"
    assert on_disk["deadline"] == "2026-02-15T20:11:00Z"  # swap + health window 60 s + 10 min
    assert lifecycle.read_pending(tmp_path) == pending()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pending.json"]  # no temp file left


def test_the_deadline_is_the_swap_plus_the_configured_commit_deadline():
    config = AgentConfig(health_window=30, commit_deadline=45)
    record = lifecycle.new_pending(
        from_version="1.0.0",
        to_version="1.1.0",
        from_sha256=sha256(OLD),
        to_sha256=sha256(NEW),
        target=Path("/opt/avika/avika-agent"),
        serial=7,
        now=NOW + timedelta(microseconds=1),  # rounded up: a deadline is never shorter than asked
        commit_deadline=config.commit_deadline_s,
    )
    assert record.deadline == "2026-02-15T20:00:46Z"
    assert AgentConfig(health_window=30).commit_deadline_s == 630  # default: window + 10 min


def test_no_pending_record_means_no_update_in_flight(tmp_path):
    assert lifecycle.read_pending(tmp_path) is None


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"from_version": "1.0.0"}',
        json.dumps({**pending().to_dict(), "boots": "1"}).encode(),
        json.dumps({**pending().to_dict(), "boots": True}).encode(),
        json.dumps({**pending().to_dict(), "deadline": "tomorrow"}).encode(),
        b"\xff\xfe",
        json.dumps({**pending().to_dict(), "boots": -1}).encode(),
        json.dumps({**pending().to_dict(), "serial": 2**53}).encode(),
        json.dumps({**pending().to_dict(), "to_sha256": "A" * 64}).encode(),
        json.dumps({**pending().to_dict(), "target": "relative/avika-agent"}).encode(),
        json.dumps({**pending().to_dict(), "target": "/opt/avika/\u0000agent"}).encode(),
        json.dumps({**pending().to_dict(), "backup": "/etc/passwd"}).encode(),
        json.dumps({**pending().to_dict(), "deadline": "0000-01-01T00:00:00Z"}).encode(),
        b"[" * 100_000 + b"]" * 100_000,
        b'{"boots": 1' + b" " * (70 * 1024) + b"}",
    ],
    ids=[
        "not-json",
        "not-object",
        "missing-fields",
        "boots-string",
        "boots-bool",
        "bad-time",
        "not-utf8",
        "boots-negative",
        "serial-too-large",
        "hash-upper-case",
        "target-relative",
        "target-nul",
        "backup-elsewhere",
        "year-zero",
        "nested-too-deeply",
        "too-large",
    ],
)
def test_a_corrupt_pending_record_is_set_aside_and_reported(tmp_path, content):
    (tmp_path / "pending.json").write_bytes(content)
    with pytest.raises(lifecycle.PendingCorrupt) as caught:
        lifecycle.read_pending(tmp_path)
    assert caught.value.code == "pending_corrupt"
    assert not (tmp_path / "pending.json").exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("pending.json.corrupt.")]
    assert len(aside) == 1 and aside[0].read_bytes() == content


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_a_pending_record_that_is_not_a_regular_file_is_set_aside(tmp_path, kind):
    path = tmp_path / "pending.json"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opened without blocking: never waits for a writer
    else:
        (tmp_path / "elsewhere.json").write_text(json.dumps(pending().to_dict()))
        path.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(lifecycle.PendingCorrupt) as caught:
        lifecycle.read_pending(tmp_path)
    assert "set aside as pending.json.corrupt." in caught.value.message
    assert not os.path.lexists(path)


PENDING_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def _mutated_record() -> st.SearchStrategy[dict[str, object]]:
    """The contract's fields, each either kept or replaced by a value of any JSON type."""
    base = pending().to_dict()
    return st.fixed_dictionaries(
        {k: st.one_of(st.just(v), PENDING_JSON_VALUES) for k, v in base.items()},
        optional={"extra": PENDING_JSON_VALUES},
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=512) | _mutated_record().map(lambda r: json.dumps(r).encode()))
def test_any_pending_json_is_a_record_or_set_aside_through_resume(tmp_path_factory, content):
    """Random bytes or wrong-typed fields: resume either handles a valid record (whatever it then
    decides) or sets the file aside, reports pending_corrupt and goes on; never a traceback."""
    config, _ = swapped_host(tmp_path_factory.mktemp("p"))
    lifecycle.pending_path(config.state_dir).write_bytes(content)
    sink = RecordingSink()
    result = lifecycle.resume(config, sink, now=NOW)
    aside = [p.name for p in config.state_dir.iterdir() if p.name.startswith("pending.json.corrupt.")]
    try:
        valid = Pending.from_dict(json.loads(content))
    except (ValueError, RecursionError):
        valid = None
    if valid is None:
        assert len(aside) == 1 and result.outcome is lifecycle.Resumed.DROPPED
        assert sink.events[-1]["error"].startswith("pending_corrupt")
        assert load_state(config.state_dir).last_error["code"] == "pending_corrupt"
        assert config.target.read_bytes() == NEW  # nothing touched on a record it cannot read
    else:
        assert aside == [] and result.outcome in set(lifecycle.Resumed)


def test_a_newer_writer_may_add_fields(tmp_path):
    (tmp_path / "pending.json").write_text(json.dumps({**pending().to_dict(), "go_agent_note": "x"}))
    assert lifecycle.read_pending(tmp_path) == pending()


# ---------------------------------------------------------------- what a starting agent does


START_CASES = [
    # (name, record, target hash, expected action, expected boots, reason)
    ("swapped-first-boot", pending(), sha256(NEW), Start.WATCH, 1, None),
    ("swapped-last-allowed-boot", pending(boots=2), sha256(NEW), Start.WATCH, 3, None),
    ("swapped-one-boot-too-many", pending(boots=3), sha256(NEW), Start.ROLLBACK, 4, "too_many_boots"),
    (
        "swapped-deadline-passed",
        pending(deadline=format_time(NOW - timedelta(seconds=1))),
        sha256(NEW),
        Start.ROLLBACK,
        1,
        "commit_deadline_passed",
    ),
    (
        "boot-cap-before-deadline",
        pending(boots=3, deadline=format_time(NOW - timedelta(seconds=1))),
        sha256(NEW),
        Start.ROLLBACK,
        4,
        "too_many_boots",
    ),
    ("killed-before-swap", pending(), sha256(OLD), Start.NOT_SWAPPED, 0, "interrupted_before_swap"),
    ("killed-during-rollback", pending(boots=2), sha256(OLD), Start.FINISH_ROLLBACK, 2, None),
    ("target-replaced", pending(boots=1), sha256(b"other"), Start.TARGET_REPLACED, 1, "target_replaced"),
    ("target-missing", pending(boots=1), None, Start.TARGET_REPLACED, 1, "target_replaced"),
]


@pytest.mark.parametrize(
    "record,target_sha,action,boots,reason", [c[1:] for c in START_CASES], ids=[c[0] for c in START_CASES]
)
def test_start_plan(record, target_sha, action, boots, reason):
    plan = lifecycle.plan_start(record, target_sha, now=NOW, max_boots=3)
    assert (plan.action, plan.pending.boots, plan.reason) == (action, boots, reason)


LATE = NOW + timedelta(minutes=12)  # past the deadline below
WATCH_CASES = [
    ("healthy", dict(uptime=60, fetched=True, reported=True), NOW, Verdict.COMMIT),
    ("window-not-over", dict(uptime=59.9, fetched=True, reported=True), NOW, Verdict.WAIT),
    ("no-check-yet", dict(uptime=120, fetched=False, reported=True), NOW, Verdict.WAIT),
    ("no-report-yet", dict(uptime=120, fetched=True, reported=False), NOW, Verdict.WAIT),
    ("unhealthy-past-deadline", dict(uptime=900, fetched=False, reported=True), LATE, Verdict.ROLLBACK),
    ("healthy-wins-at-deadline", dict(uptime=900, fetched=True, reported=True), LATE, Verdict.COMMIT),
]  # fmt: skip


@pytest.mark.parametrize("kw,now,verdict", [c[1:] for c in WATCH_CASES], ids=[c[0] for c in WATCH_CASES])
def test_watch_verdict(kw, now, verdict):
    deadline = NOW + timedelta(minutes=11)
    assert lifecycle.watch_verdict(now=now, deadline=deadline, health_window=60, **kw) is verdict


# ---------------------------------------------------------------- back-off and bad versions


def test_backoff_doubles_per_failure_and_caps_at_six_hours():
    assert [lifecycle.backoff_delay(n, 60) for n in (1, 2, 3, 4)] == [120, 240, 480, 960]
    assert lifecycle.backoff_delay(9, 60) == 6 * 3600
    assert lifecycle.backoff_delay(1000, 3600) == 6 * 3600


def test_a_failed_attempt_waits_for_its_backoff_and_is_counted_per_version_and_bytes():
    attempts = lifecycle.record_failure({}, "1.1.0", "a" * 64, "checksum_mismatch", now=NOW, interval=60)
    attempts = lifecycle.record_failure(
        attempts, "1.1.0", "a" * 64, "checksum_mismatch", now=NOW, interval=60
    )
    entry = attempts["1.1.0/" + "a" * 64]
    assert entry["failures"] == 2 and entry["last_error"] == "checksum_mismatch"
    assert lifecycle.next_attempt(attempts, "1.1.0", "a" * 64) == NOW + timedelta(seconds=240)
    assert not lifecycle.may_attempt(attempts, "1.1.0", "a" * 64, now=NOW + timedelta(seconds=239))
    assert lifecycle.may_attempt(attempts, "1.1.0", "a" * 64, now=NOW + timedelta(seconds=240))
    assert lifecycle.may_attempt(attempts, "1.1.0", "b" * 64, now=NOW)  # other bytes: a fresh start
    assert lifecycle.forget_attempts(attempts, "1.1.0", "a" * 64) == {}


def test_a_backoff_is_never_shorter_than_asked_though_times_are_whole_seconds():
    at = NOW + timedelta(milliseconds=300)
    attempts = lifecycle.record_failure({}, "1.1.0", "a" * 64, "fetch_failed", now=at, interval=1)
    assert lifecycle.next_attempt(attempts, "1.1.0", "a" * 64) == NOW + timedelta(seconds=3)
    assert not lifecycle.may_attempt(attempts, "1.1.0", "a" * 64, now=at + timedelta(seconds=2))


def test_attempts_kept_are_capped():
    attempts: dict = {}
    for n in range(40):
        attempts = lifecycle.record_failure(
            attempts, f"1.{n}.0", "a" * 64, "fetch_failed", now=NOW + timedelta(seconds=n), interval=60
        )
    assert len(attempts) == lifecycle.MAX_ATTEMPTS_KEPT
    assert "1.39.0/" + "a" * 64 in attempts


@pytest.mark.parametrize(
    "reason,blocked",
    [
        ("too_many_boots", True),
        ("died_before_commit", True),
        ("hung", True),
        ("manual_rollback", True),
        ("commit_deadline_passed", False),
    ],
)
def test_crashes_and_hangs_are_blocked_for_good_a_missed_deadline_is_not(reason, blocked):
    state = AgentState(bad_versions=lifecycle.remember_bad([], "1.1.0", "a" * 64, reason, now=NOW))
    later = NOW + timedelta(days=365)
    assert (("1.1.0", "a" * 64) in lifecycle.blocked_pairs(state, now=later)) is blocked
    assert ("1.1.0", "b" * 64) not in lifecycle.blocked_pairs(state, now=later)  # other bytes


def _rolled_back(reason: str, *, failures: int = 1) -> AgentState:
    """State as a rollback for ``reason`` at NOW leaves it (a missed deadline also backs off)."""
    state = AgentState(bad_versions=lifecycle.remember_bad([], "1.1.0", "a" * 64, reason, now=NOW))
    if reason not in lifecycle.PERMANENT_REASONS:
        for _ in range(failures):
            state.attempts = lifecycle.record_failure(
                state.attempts, "1.1.0", "a" * 64, reason, now=NOW, interval=60
            )
    return state


BLOCKED_AT = [
    # (id, reason, failures, seconds after the rollback, ignore_backoff, blocked)
    ("crash-at-once", "too_many_boots", 1, 0, False, True),
    ("crash-a-year-later", "too_many_boots", 1, 365 * 86400, False, True),
    ("crash-forced", "died_before_commit", 1, 0, True, True),
    ("hung-forced", "hung", 1, 0, True, True),
    ("manual-forced", "manual_rollback", 1, 0, True, True),
    ("deadline-backing-off", "commit_deadline_passed", 1, 119, False, True),
    ("deadline-backoff-over", "commit_deadline_passed", 1, 120, False, False),
    ("deadline-second-miss-backs-off-longer", "commit_deadline_passed", 2, 120, False, True),
    ("deadline-second-miss-over", "commit_deadline_passed", 2, 240, False, False),
    ("deadline-forced", "commit_deadline_passed", 1, 0, True, False),
]


@pytest.mark.parametrize(
    "reason,failures,after,ignore_backoff,blocked",
    [b[1:] for b in BLOCKED_AT],
    ids=[b[0] for b in BLOCKED_AT],
)
def test_blocked_pairs_is_the_bad_version_rule_at_a_moment(reason, failures, after, ignore_backoff, blocked):
    state = _rolled_back(reason, failures=failures)
    now = NOW + timedelta(seconds=after)
    found = lifecycle.blocked_pairs(state, now=now, ignore_backoff=ignore_backoff)
    assert found == ({("1.1.0", "a" * 64)} if blocked else set())


def test_a_missed_deadline_whose_attempt_record_is_gone_is_not_blocked():
    state = _rolled_back("commit_deadline_passed")
    state.attempts = {}  # attempts are capped; the back-off is the only thing that held it
    assert lifecycle.blocked_pairs(state, now=NOW) == set()


def test_a_hang_is_not_downgraded_to_a_retriable_reason():
    bad = lifecycle.remember_bad([], "1.1.0", "a" * 64, "hung", now=NOW)
    bad = lifecycle.remember_bad(bad, "1.1.0", "a" * 64, "commit_deadline_passed", now=NOW)
    assert [b["reason"] for b in bad] == ["hung"]


def test_a_crash_is_not_downgraded_to_a_retriable_reason():
    bad = lifecycle.remember_bad([], "1.1.0", "a" * 64, "too_many_boots", now=NOW)
    bad = lifecycle.remember_bad(bad, "1.1.0", "a" * 64, "commit_deadline_passed", now=NOW)
    assert bad == [
        {"version": "1.1.0", "sha256": "a" * 64, "reason": "too_many_boots", "time": format_time(NOW)}
    ]


def test_bad_versions_are_capped():
    bad: list = []
    for n in range(100):
        bad = lifecycle.remember_bad(bad, f"1.{n}.0", "a" * 64, "too_many_boots", now=NOW)
    assert len(bad) == lifecycle.MAX_BAD_VERSIONS and bad[-1]["version"] == "1.99.0"


# ---------------------------------------------------------------- I/O on real files


def config_for(tmp_path: Path, **kw: object) -> AgentConfig:
    defaults: dict[str, object] = dict(
        update_server="http://127.0.0.1:9/updates",
        target=tmp_path / "bin" / "avika-agent",
        state_dir=tmp_path / "state",
        health_window=1,
        max_boot_attempts=3,
        update_interval=60,
    )
    defaults.update(kw)
    return AgentConfig(**defaults)  # type: ignore[arg-type]


def swapped_host(tmp_path: Path, **record: object) -> tuple[AgentConfig, Pending]:
    """Disk as a transaction leaves it right after the swap: target new, backup old, record written."""
    config = config_for(tmp_path)
    config.target.parent.mkdir(parents=True)
    config.target.write_bytes(NEW)
    install.backup_path(config.target).write_bytes(OLD)
    record_ = replace(pending(), target=str(config.target), backup=str(install.backup_path(config.target)))
    record_ = replace(record_, **record)  # type: ignore[arg-type]
    lifecycle.write_pending(config.state_dir, record_)
    return config, record_


def test_resume_counts_the_boot_durably_and_watches(tmp_path):
    config, _ = swapped_host(tmp_path)
    sink = RecordingSink()
    result = lifecycle.resume(config, sink, now=NOW)
    assert result.outcome is lifecycle.Resumed.WATCHING
    assert lifecycle.read_pending(config.state_dir).boots == 1  # on disk before anything else
    assert sink.states == ["watching"]


def test_resume_past_the_boot_cap_restores_the_old_binary_and_remembers_why(tmp_path):
    config, _ = swapped_host(tmp_path, boots=3)
    sink = RecordingSink()
    result = lifecycle.resume(config, sink, now=NOW)
    assert result.outcome is lifecycle.Resumed.ROLLED_BACK
    assert config.target.read_bytes() == OLD
    assert install.backup_path(config.target).read_bytes() == OLD
    assert lifecycle.read_pending(config.state_dir) is None
    state = load_state(config.state_dir)
    assert lifecycle.blocked_pairs(state, now=NOW + timedelta(days=1)) == {("1.1.0", sha256(NEW))}
    assert state.last_error["code"] == "too_many_boots"
    assert sink.events[-1]["state"] == "rolled_back" and sink.events[-1]["error"].startswith("too_many_boots")


def test_resume_past_the_deadline_rolls_back_and_only_backs_off(tmp_path):
    config, _ = swapped_host(tmp_path, deadline=format_time(NOW - timedelta(seconds=5)))
    result = lifecycle.resume(config, RecordingSink(), now=NOW)
    assert result.outcome is lifecycle.Resumed.ROLLED_BACK
    state = load_state(config.state_dir)
    assert state.bad_versions[0]["reason"] == "commit_deadline_passed"
    assert lifecycle.next_attempt(state.attempts, "1.1.0", sha256(NEW)) == NOW + timedelta(seconds=120)
    assert lifecycle.blocked_pairs(state, now=NOW + timedelta(seconds=119)) == {("1.1.0", sha256(NEW))}
    assert lifecycle.blocked_pairs(state, now=NOW + timedelta(seconds=120)) == set()


def test_resume_after_a_kill_before_the_swap_drops_the_record_and_reports(tmp_path):
    config, _ = swapped_host(tmp_path)
    config.target.write_bytes(OLD)  # the swap never happened
    sink = RecordingSink()
    result = lifecycle.resume(config, sink, now=NOW)
    assert result.outcome is lifecycle.Resumed.DROPPED
    assert lifecycle.read_pending(config.state_dir) is None and config.target.read_bytes() == OLD
    assert sink.events[-1]["state"] == "failed" and sink.events[-1]["failed_state"] == "staged"
    assert sink.events[-1]["error"].startswith("interrupted_before_swap")
    assert load_state(config.state_dir).attempts["1.1.0/" + sha256(NEW)]["failures"] == 1


def test_resume_after_a_kill_between_restore_and_record_removal_finishes_the_rollback(tmp_path):
    config, record = swapped_host(tmp_path, boots=4)
    sink = RecordingSink()
    lifecycle.rollback(config, sink, record, "too_many_boots", now=NOW, from_state=State.RESTARTING)
    lifecycle.write_pending(config.state_dir, record)  # as if killed right before the record went
    result = lifecycle.resume(config, sink, now=NOW)
    assert result.outcome is lifecycle.Resumed.DROPPED
    assert lifecycle.read_pending(config.state_dir) is None and config.target.read_bytes() == OLD
    assert [e["reason"] for e in load_state(config.state_dir).bad_versions] == ["too_many_boots"]
    assert sink.states == ["rolled_back", "rolled_back"]


def test_resume_with_a_replaced_target_restores_the_backup(tmp_path):
    config, _ = swapped_host(tmp_path, boots=1)
    config.target.write_bytes(b"something else entirely")
    sink = RecordingSink()
    assert lifecycle.resume(config, sink, now=NOW).outcome is lifecycle.Resumed.ROLLED_BACK
    assert config.target.read_bytes() == OLD
    assert sink.events[-1]["error"].startswith("target_replaced")


def test_resume_sets_aside_a_corrupt_record_and_reports_it(tmp_path):
    config = config_for(tmp_path)
    config.state_dir.mkdir(parents=True)
    (config.state_dir / "pending.json").write_text("{")
    sink = RecordingSink()
    assert lifecycle.resume(config, sink, now=NOW).outcome is lifecycle.Resumed.DROPPED
    assert sink.events[-1]["error"].startswith("pending_corrupt")
    assert load_state(config.state_dir).last_error["code"] == "pending_corrupt"


def test_a_rollback_without_a_usable_backup_keeps_the_new_binary_and_drops_the_record(tmp_path):
    config, record = swapped_host(tmp_path, boots=4)
    install.backup_path(config.target).write_bytes(b"not the old binary")
    sink = RecordingSink()
    assert not lifecycle.rollback(
        config, sink, record, "too_many_boots", now=NOW, from_state=State.RESTARTING
    )
    assert config.target.read_bytes() == NEW
    assert lifecycle.read_pending(config.state_dir) is None
    assert sink.events[-1]["state"] == "failed" and sink.events[-1]["error"].startswith("restore_failed")


def watch_the_record_go(
    monkeypatch: pytest.MonkeyPatch, sink: RecordingSink
) -> list[tuple[list[str], str | None]]:
    """What was reported, and the state's last result, at each moment the record was dropped."""
    seen: list[tuple[list[str], str | None]] = []
    clear = lifecycle.clear_pending

    def clear_and_look(state_dir: Path) -> None:
        seen.append((list(sink.states), load_state(state_dir).last_result))
        clear(state_dir)

    monkeypatch.setattr(lifecycle, "clear_pending", clear_and_look)
    return seen


def test_the_commit_report_is_queued_before_the_record_goes(tmp_path, monkeypatch):
    # A kill -9 between dropping the record and queueing "committed" lost the report for good:
    # the next start saw no record and nothing ever sent it (bench: kill_9 seed 22, in watching).
    config, record = swapped_host(tmp_path, boots=1)
    sink = RecordingSink()
    seen = watch_the_record_go(monkeypatch, sink)
    lifecycle.commit(config, sink, lifecycle.Watch(record))
    assert seen == [(["committed"], "committed")]  # the report queued and the state tidied first
    assert lifecycle.read_pending(config.state_dir) is None


def test_the_rollback_report_is_queued_before_the_record_goes(tmp_path, monkeypatch):
    config, record = swapped_host(tmp_path, boots=4)
    sink = RecordingSink()
    seen = watch_the_record_go(monkeypatch, sink)
    assert lifecycle.rollback(config, sink, record, "too_many_boots", now=NOW, from_state=State.RESTARTING)
    assert seen == [(["rolled_back"], "rolled_back")]
    assert config.target.read_bytes() == OLD


def test_commit_drops_the_record_and_forgets_earlier_failures(tmp_path):
    config, record = swapped_host(tmp_path, boots=1)
    state = load_state(config.state_dir)
    state.attempts = lifecycle.record_failure(
        {}, "1.1.0", sha256(NEW), "commit_deadline_passed", now=NOW, interval=60
    )
    save_state(config.state_dir, state)
    sink = RecordingSink()
    lifecycle.commit(config, sink, lifecycle.Watch(record))
    assert lifecycle.read_pending(config.state_dir) is None
    assert load_state(config.state_dir).attempts == {}
    assert load_state(config.state_dir).last_result == "committed"
    assert sink.states == ["committed"]


# ---------------------------------------------------------------- the transaction, steps injected


class FakeFetcher:
    """Writes ``data`` as the download would, or raises ``error``."""

    def __init__(self, data: bytes, error: Exception | None = None) -> None:
        self.data, self.error, self.urls = data, error, []

    def download(self, url: str, fd: int, size: int, digest: str, *, stop: object = None) -> None:
        self.urls.append(url)
        os.write(fd, self.data)
        if self.error is not None:
            raise self.error


def manifest_for(data: bytes) -> Manifest:
    return Manifest(
        serial=7,
        version="1.1.0",
        released_at=NOW,
        expires=NOW + timedelta(days=30),
        binaries={"linux-amd64": Binary("binaries/1.1.0/x/avika-agent-linux-amd64", sha256(data), len(data))},
    )


def fresh_host(tmp_path: Path) -> AgentConfig:
    config = config_for(tmp_path)
    config.target.parent.mkdir(parents=True)
    config.target.write_bytes(OLD)
    config.target.chmod(0o755)
    return config


def apply(config: AgentConfig, fetcher: FakeFetcher, sink: RecordingSink, **steps: object) -> Pending:
    restarted: list[Pending] = []
    result = lifecycle.apply_update(
        config,
        manifest_for(NEW),
        platform="linux-amd64",
        manifest_url="http://127.0.0.1:9/updates/manifest.json",
        from_version="1.0.0",
        fetcher=fetcher,  # type: ignore[arg-type]
        sink=sink,
        restart=restarted.append,
        now=lambda: NOW,
        steps=lifecycle.Steps(**{"smoke_test": lambda staged, version: None, **steps}),  # type: ignore[arg-type]
    )
    assert restarted == [result]
    return result


def test_the_transaction_writes_the_record_before_it_swaps(tmp_path):
    config = fresh_host(tmp_path)
    seen: list[Pending | None] = []

    def swap(staged: Path, target: Path, backup: Path) -> None:
        seen.append(lifecycle.read_pending(config.state_dir))
        install.swap(staged, target, backup)

    sink = RecordingSink()
    fetcher = FakeFetcher(NEW)
    record = apply(config, fetcher, sink, swap=swap)
    assert seen == [record] and record.boots == 0
    assert record.from_sha256 == sha256(OLD) and record.to_sha256 == sha256(NEW)
    assert config.target.read_bytes() == NEW and install.backup_path(config.target).read_bytes() == OLD
    assert os.stat(config.target).st_mode & 0o777 == 0o755  # the target's mode kept
    assert fetcher.urls == ["http://127.0.0.1:9/updates/binaries/1.1.0/x/avika-agent-linux-amd64"]
    assert sink.states == ["update_available", "downloading", "verifying", "staged", "restarting"]


def no_space(target: Path, size: int) -> Path:
    raise install.InsufficientSpace("full")


def owned(target: Path, real: Path) -> install.OwnerQuery:
    return install.OwnerQuery(target, real, owner_of=lambda path: f"dpkg: nginx-agent: {path}")


def query_breaks(target: Path, real: Path) -> install.OwnerQuery:
    def broken(path: Path) -> str | None:
        raise install.InstallError(f"cannot ask who owns {path}")

    return install.OwnerQuery(target, real, owner_of=broken)


def smoke_fails(staged: Path, version: str) -> None:
    raise install.SmokeTestFailed("printed 1.0.9")


def swap_fails(staged: Path, target: Path, backup: Path) -> None:
    raise install.SwapFailed("EXDEV")


FAILURES = [
    ("preflight", dict(preflight=no_space), None, "downloading", "insufficient_space"),
    ("package", dict(ask_owner=owned), None, "downloading", "owned_by_package_manager"),
    ("package-query", dict(ask_owner=query_breaks), None, "downloading", "install_failed"),
    ("download", {}, SizeExceeded("too big"), "downloading", "size_exceeded"),
    ("checksum", {}, ChecksumMismatch("bad digest"), "verifying", "checksum_mismatch"),
    ("smoke-test", dict(smoke_test=smoke_fails), None, "verifying", "smoke_test_failed"),
    ("swap", dict(swap=swap_fails), None, "staged", "swap_failed"),
]  # fmt: skip


@pytest.mark.parametrize(
    "steps,error,failed_state,code", [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES]
)
def test_a_failed_step_leaves_the_target_untouched_and_backs_off(tmp_path, steps, error, failed_state, code):
    config = fresh_host(tmp_path)
    before = os.stat(config.target)
    sink = RecordingSink()
    with pytest.raises(lifecycle.UpdateFailed) as caught:
        apply(config, FakeFetcher(NEW, error), sink, **steps)
    assert (caught.value.code, caught.value.state) == (code, failed_state)
    assert config.target.read_bytes() == OLD and os.stat(config.target).st_mtime_ns == before.st_mtime_ns
    assert sorted(p.name for p in config.target.parent.iterdir()) == ["avika-agent"]  # no staged file
    assert lifecycle.read_pending(config.state_dir) is None
    assert sink.events[-1]["state"] == "failed" and sink.events[-1]["failed_state"] == failed_state
    state = load_state(config.state_dir)
    assert state.last_error == {"code": code, "message": caught.value.message, "state": failed_state}
    assert lifecycle.next_attempt(state.attempts, "1.1.0", sha256(NEW)) == NOW + timedelta(seconds=120)


def test_the_package_query_runs_beside_the_download_and_stops_it(tmp_path):
    class Waiting(FakeFetcher):
        """A download still running when the package manager answers: it waits for the stop."""

        def download(self, url: str, fd: int, size: int, digest: str, *, stop: object = None) -> None:
            assert isinstance(stop, threading.Event) and stop.wait(10), "the query never stopped the download"
            os.write(fd, self.data[:3])
            raise DownloadStopped("stopped after 3 bytes")

    config = fresh_host(tmp_path)
    sink = RecordingSink()
    with pytest.raises(lifecycle.UpdateFailed) as caught:
        apply(config, Waiting(NEW), sink, ask_owner=owned)
    assert (caught.value.code, caught.value.state) == ("owned_by_package_manager", "downloading")
    assert "belongs to a package (dpkg: nginx-agent:" in caught.value.message
    assert sorted(p.name for p in config.target.parent.iterdir()) == ["avika-agent"]  # staged file removed
    assert config.target.read_bytes() == OLD


def test_the_target_is_hashed_while_the_smoke_test_runs(tmp_path):
    """The backup's digest is read beside the staged file's test, not after it (the update's time)."""
    config = fresh_host(tmp_path)
    hashing = threading.Event()

    def hash_file(path: Path) -> str:
        hashing.set()
        return install.sha256_file(path)

    def smoke_test(staged: Path, version: str) -> None:
        assert hashing.wait(10), "the target was not hashed while the smoke test ran"

    record = apply(config, FakeFetcher(NEW), RecordingSink(), hash_file=hash_file, smoke_test=smoke_test)
    assert record.from_sha256 == sha256(OLD)


def test_a_target_that_cannot_be_read_fails_the_update_before_the_swap(tmp_path):
    config = fresh_host(tmp_path)

    def unreadable(path: Path) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    with pytest.raises(lifecycle.UpdateFailed) as caught:
        apply(config, FakeFetcher(NEW), RecordingSink(), hash_file=unreadable)
    assert (caught.value.code, caught.value.state) == ("io_error", "staged")
    assert config.target.read_bytes() == OLD and lifecycle.read_pending(config.state_dir) is None
    assert sorted(p.name for p in config.target.parent.iterdir()) == ["avika-agent"]


def test_no_second_update_starts_while_a_record_is_pending(tmp_path):
    config = fresh_host(tmp_path)
    lifecycle.write_pending(config.state_dir, pending())
    fetcher = FakeFetcher(NEW)
    with pytest.raises(lifecycle.UpdateInProgress):
        apply(config, fetcher, RecordingSink())
    assert fetcher.urls == []
