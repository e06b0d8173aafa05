"""Durable agent state and the single-update lock (DESIGN section 4).

- writes are atomic: temp file in the same directory + fsync + ``os.replace``; no temp file is
  left behind, and a failed write leaves the old file whole;
- a missing ``state.json`` means defaults; it is type-checked field by field on load (DESIGN
  section 4): a field that does not check takes its default (a bad list or map entry is dropped),
  the rest is kept; whatever the file holds -- random bytes, JSON of any type in any field -- loading
  never raises and every reader of the state (the trust check, bad versions, back-off) works on it;
- a corrupt or mistyped file is set aside by a transaction (renamed, bytes kept, never over an
  earlier one), recorded in ``corrupt`` and ``last_error`` (``state_corrupt``) and logged, so start-up
  never blocks; a plain reader (``status``) never writes and gets warnings instead;
- only one update runs at a time: a second holder, in another process, gets ``LockBusy``; the
  lock is released when its context ends (or its process dies);
- every read-modify-write of ``state.json`` is a ``state_transaction``: a short blocking lock on
  ``state.json.lock`` (close-on-exec, ``StateBusy`` past its timeout) around load + change + save,
  saved only when the body succeeds; two processes changing different fields lose nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
from dataclasses import asdict, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent import lifecycle
from agent import state as state_mod
from agent.manifest import MAX_SERIAL, TrustState
from agent.state import (
    LOCK_FILE,
    STATE_CORRUPT,
    STATE_FILE,
    STATE_LOCK_FILE,
    AgentState,
    LockBusy,
    StateBusy,
    check_state,
    load_state,
    read_state,
    save_state,
    state_transaction,
    state_warnings,
    update_lock,
    write_bytes_atomic,
    write_json_atomic,
)

# A child process that takes the lock, says so, and holds it until its stdin closes.
HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from agent.state import LockBusy, update_lock
    try:
        with update_lock(Path(sys.argv[1])):
            print("held", flush=True)
            sys.stdin.read()
    except LockBusy:
        print("busy", flush=True)
    """
)


def start_holder(state_dir: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    return child


def holder_line(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    return child.stdout.readline().strip()


def release(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.close()
    assert child.wait(timeout=10) == 0


# ---------------------------------------------------------------- atomic writes


def test_an_atomic_write_leaves_only_the_target(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"
    write_json_atomic(target, {"b": 1, "a": [1, 2]})
    write_json_atomic(target, {"b": 2})
    assert json.loads(target.read_text()) == {"b": 2}
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_an_atomic_write_replaces_the_whole_content(tmp_path: Path) -> None:
    target = tmp_path / "f"
    write_bytes_atomic(target, b"x" * 1000)
    write_bytes_atomic(target, b"short")
    assert target.read_bytes() == b"short"


def test_a_failed_replace_keeps_the_old_file_and_removes_the_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(state_mod.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_an_atomic_write_sets_the_requested_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "secret", b"k", mode=0o600)
    finally:
        os.umask(old)
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600


# ---------------------------------------------------------------- state.json


def test_a_missing_state_file_means_defaults(tmp_path: Path) -> None:
    assert load_state(tmp_path / "never-created") == AgentState()
    assert not (tmp_path / "never-created").exists()


def test_state_round_trips(tmp_path: Path) -> None:
    saved = AgentState(
        highest_serial=42,
        highest_digest="d" * 64,
        last_check="2026-03-01T12:00:00Z",
        last_result="none",
        last_error={"code": "expired", "message": "m", "state": "checking"},
        bad_versions=[{"version": "0.1.44", "sha256": "a" * 64, "reason": "too_many_boots"}],
        attempts={"0.1.44": {"failures": 2}},
    )
    save_state(tmp_path, saved)
    assert load_state(tmp_path) == saved
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]


def test_unknown_fields_in_state_are_ignored(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps({"highest_serial": 7, "written_by": "go-agent 0.3"}))
    assert load_state(tmp_path) == AgentState(highest_serial=7)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"{not json", id="not JSON"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"highest_serial": 4', id="truncated"),
        pytest.param(b"[1, 2]", id="a list"),
        pytest.param(b"\xff\xfe", id="not UTF-8"),
        pytest.param(b"[" * 100_000, id="nested too deeply"),
        pytest.param(b'{"highest_serial": "5"}', id="a string serial"),
        pytest.param(b" " * (2 << 20), id="larger than any state"),
    ],
)
def test_a_corrupt_state_file_is_set_aside_and_defaults_used(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / STATE_FILE).write_bytes(content)
    with state_transaction(tmp_path) as loaded:
        pass
    aside = Path(str(loaded.corrupt))
    assert aside.parent == tmp_path
    assert aside.name.startswith(f"{STATE_FILE}.corrupt.")
    assert aside.read_bytes() == content
    assert loaded.last_error is not None and loaded.last_error["code"] == STATE_CORRUPT
    assert aside.name in loaded.last_error["message"]
    assert asdict(loaded) == {
        **asdict(AgentState()),
        "corrupt": loaded.corrupt,
        "last_error": loaded.last_error,
    }
    assert load_state(tmp_path) == loaded  # what replaced it is whole and valid
    assert any(aside.name in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


def test_after_a_corrupt_state_the_next_save_starts_fresh(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_bytes(b"garbage")
    with state_transaction(tmp_path) as loaded:
        loaded.highest_serial = 3
    again = load_state(tmp_path)
    assert again.highest_serial == 3
    assert {p.name for p in tmp_path.iterdir()} == {
        STATE_FILE,
        STATE_LOCK_FILE,
        Path(str(loaded.corrupt)).name,
    }
    assert Path(str(loaded.corrupt)).read_bytes() == b"garbage"


def test_a_plain_read_never_writes(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_bytes(b'{"highest_serial": "5", "last_check": "x"}')
    loaded = load_state(tmp_path)
    assert (loaded.highest_serial, loaded.last_check, loaded.corrupt) == (None, "x", None)
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]


def test_set_aside_files_never_overwrite_each_other(tmp_path: Path) -> None:
    names = set()
    for n in range(3):  # within one second, usually: each needs its own name
        (tmp_path / STATE_FILE).write_bytes(b"broken %d" % n)
        with state_transaction(tmp_path) as loaded:
            pass
        names.add(Path(str(loaded.corrupt)).name)
    assert len(names) == 3
    assert sorted((tmp_path / name).read_bytes() for name in names) == [b"broken 0", b"broken 1", b"broken 2"]


GOOD_BAD_VERSION = {"version": "0.1.44", "sha256": "a" * 64, "reason": "too_many_boots", "time": "t"}
GOOD_ATTEMPT = {
    "version": "0.1.44",
    "sha256": "a" * 64,
    "failures": 2,
    "next_attempt": "2026-03-01T12:00:00Z",
}

# (state.json object, the state that checks, how many problems): DESIGN section 4, field by field.
FIELD_CASES = [
    pytest.param({"highest_serial": "5"}, AgentState(), 1, id="a string serial (the TypeError of issue 10)"),
    pytest.param({"highest_serial": 5.0}, AgentState(), 1, id="a float serial"),
    pytest.param({"highest_serial": True}, AgentState(), 1, id="a bool serial"),
    pytest.param({"highest_serial": -1}, AgentState(), 1, id="a negative serial"),
    pytest.param({"highest_serial": MAX_SERIAL + 1}, AgentState(), 1, id="a serial no manifest can carry"),
    pytest.param({"highest_serial": 0}, AgentState(highest_serial=0), 0, id="serial 0 from an old agent"),
    pytest.param({"highest_serial": MAX_SERIAL}, AgentState(highest_serial=MAX_SERIAL), 0, id="2^53-1"),
    pytest.param({"highest_digest": "xyz"}, AgentState(), 1, id="a digest that is not 64 hex"),
    pytest.param({"highest_digest": "A" * 64}, AgentState(), 1, id="an upper-case digest"),
    pytest.param({"highest_digest": 7}, AgentState(), 1, id="a numeric digest"),
    pytest.param({"last_check": 5}, AgentState(), 1, id="a numeric last_check"),
    pytest.param({"last_result": ["none"]}, AgentState(), 1, id="a list last_result"),
    pytest.param({"last_error": "oops"}, AgentState(), 1, id="a string last_error"),
    pytest.param({"last_error": {"code": 5}}, AgentState(), 1, id="a numeric error code"),
    pytest.param({"corrupt": {}}, AgentState(), 1, id="an object corrupt"),
    pytest.param({"bad_versions": "0.1.44"}, AgentState(), 1, id="bad_versions a string"),
    pytest.param({"bad_versions": {"0.1.44": 1}}, AgentState(), 1, id="bad_versions an object"),
    pytest.param(
        {"bad_versions": [GOOD_BAD_VERSION, {"version": 44, "sha256": "a" * 64}, "x", {"version": "1"}]},
        AgentState(bad_versions=[GOOD_BAD_VERSION]),
        3,
        id="bad entries dropped, good ones kept",
    ),
    pytest.param({"attempts": []}, AgentState(), 1, id="attempts a list"),
    pytest.param(
        {"attempts": {"a": GOOD_ATTEMPT, "b": {**GOOD_ATTEMPT, "failures": "2"}, "c": 3}},
        AgentState(attempts={"a": GOOD_ATTEMPT}),
        2,
        id="attempts with a string count dropped",
    ),
    pytest.param({"attempts": {"a": {**GOOD_ATTEMPT, "failures": True}}}, AgentState(), 1, id="a bool count"),
    pytest.param(
        {"attempts": {"a": {**GOOD_ATTEMPT, "next_attempt": 5}}}, AgentState(), 1, id="numeric time"
    ),
    pytest.param(
        {
            "highest_serial": 9,
            "highest_digest": "d" * 64,
            "last_check": 5,
            "bad_versions": [GOOD_BAD_VERSION],
        },
        AgentState(highest_serial=9, highest_digest="d" * 64, bad_versions=[GOOD_BAD_VERSION]),
        1,
        id="one broken field costs only that field",
    ),
    pytest.param(
        {"highest_serial": None, "bad_versions": None, "attempts": None, "last_error": None},
        AgentState(),
        0,
        id="nulls are defaults",
    ),
]


@pytest.mark.parametrize(("obj", "expected", "problems"), FIELD_CASES)
def test_state_is_type_checked_field_by_field(
    tmp_path: Path, obj: dict[str, Any], expected: AgentState, problems: int
) -> None:
    found, named = check_state(obj)
    assert found == expected
    assert len(named) == problems, named
    (tmp_path / STATE_FILE).write_text(json.dumps(obj))
    with state_transaction(tmp_path) as loaded:
        pass
    if problems:
        assert loaded.corrupt is not None and Path(loaded.corrupt).read_text() == json.dumps(obj)
        assert loaded.last_error is not None and loaded.last_error["code"] == STATE_CORRUPT
        assert replace(loaded, corrupt=None, last_error=expected.last_error) == expected
    else:
        assert loaded == expected
        assert not [p for p in tmp_path.iterdir() if ".corrupt." in p.name]


def test_a_problem_names_the_field_and_the_value(tmp_path: Path) -> None:
    _, problems = check_state({"highest_serial": "5", "attempts": {"x": {"failures": "2"}}})
    assert problems == [
        f"highest_serial '5' is not an integer 0..{MAX_SERIAL}",
        "attempts['x'] has failures '2'",
    ]


# ---------------------------------------------------------------- whatever the file holds

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
state_like = st.fixed_dictionaries(
    {},
    optional={
        name: json_values
        | (
            st.lists(json_values | st.just(GOOD_BAD_VERSION), max_size=3)
            if name == "bad_versions"
            else json_values
        )
        | (
            st.dictionaries(st.text(max_size=5), json_values | st.just(GOOD_ATTEMPT))
            if name == "attempts"
            else json_values
        )
        for name in (f.name for f in fields(AgentState))
    },
)


def use_every_field(state: AgentState) -> None:
    """What the agent's readers do with a loaded state; none of it may raise."""
    now = datetime(2026, 3, 1, tzinfo=timezone.utc)
    lifecycle.blocked_pairs(state, now=now)
    lifecycle.record_failure(state.attempts, "0.1.44", "a" * 64, "fetch_failed", now=now, interval=60)
    lifecycle.remember_bad(state.bad_versions, "0.1.44", "a" * 64, "too_many_boots", now=now)
    lifecycle.next_attempt(state.attempts, "0.1.44", "a" * 64)
    for entry in state.attempts.values():
        lifecycle.may_attempt(state.attempts, str(entry.get("version")), str(entry.get("sha256")), now=now)
    trust = TrustState(state.highest_serial, state.highest_digest)
    if trust.highest_serial is not None:
        assert isinstance(trust.highest_serial, int) and not isinstance(trust.highest_serial, bool)
        assert trust.highest_serial <= MAX_SERIAL  # so a valid manifest can always get above it
    json.dumps(asdict(state))  # and it saves


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300) | state_like.map(lambda obj: json.dumps(obj).encode()))
@example(b'{"highest_serial": "5"}')
@example(b'{"attempts": {"x": {"failures": "2"}}}')
@example(b'{"bad_versions": [{"version": ["x"], "sha256": 1}]}')
@example(b'{"highest_serial": 1e400}')
@example(b'{"highest_serial": NaN}')
def test_whatever_state_json_holds_loading_never_raises_and_the_state_is_usable(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = Path(tmp)
        (state_dir / STATE_FILE).write_bytes(data)
        read, _ = read_state(state_dir)
        use_every_field(read)
        state_warnings(state_dir)
        with state_transaction(state_dir) as loaded:
            use_every_field(loaded)
        again, problems = read_state(state_dir)
        assert problems == []  # what was saved over it checks
        use_every_field(again)


def test_status_warns_about_a_corrupt_file_and_a_kept_one_without_writing(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_bytes(b'{"highest_serial": "5"}')
    state, warnings = state_warnings(tmp_path)
    assert state.highest_serial is None
    assert len(warnings) == 1 and "highest_serial '5'" in warnings[0] and "corrupt" in warnings[0]
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # status never writes
    with state_transaction(tmp_path) as loaded:
        loaded.highest_serial = 7
    state, warnings = state_warnings(tmp_path)
    assert state.highest_serial == 7
    assert len(warnings) == 1 and str(loaded.corrupt) in warnings[0] and "remove it" in warnings[0]
    Path(str(loaded.corrupt)).unlink()  # inspected and removed: nothing left to say
    assert state_warnings(tmp_path)[1] == []


def test_an_unreadable_state_file_is_a_warning_for_status_and_an_os_error_for_a_check(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).mkdir()
    state, warnings = state_warnings(tmp_path)
    assert state == AgentState() and "cannot read" in warnings[0]
    with pytest.raises(OSError):
        read_state(tmp_path)


# ---------------------------------------------------------------- the update lock


def test_a_second_holder_in_another_process_gets_lock_busy(tmp_path: Path) -> None:
    child = start_holder(tmp_path)
    try:
        assert holder_line(child) == "held"
        with pytest.raises(LockBusy) as caught, update_lock(tmp_path):
            pytest.fail("the lock was granted twice")
        assert caught.value.code == "update_in_progress"
        assert str(tmp_path / LOCK_FILE) in str(caught.value)
    finally:
        release(child)
    # Refused, the lock file is still there and untouched; released, the lock is free again.
    assert (tmp_path / LOCK_FILE).exists()
    with update_lock(tmp_path):
        pass


def test_another_process_is_refused_while_this_one_holds_the_lock(tmp_path: Path) -> None:
    with update_lock(tmp_path):
        child = start_holder(tmp_path)
        assert holder_line(child) == "busy"
        release(child)


def test_the_lock_is_released_after_the_context(tmp_path: Path) -> None:
    with update_lock(tmp_path) as fd:
        assert fd >= 0
    child = start_holder(tmp_path)
    try:
        assert holder_line(child) == "held"
    finally:
        release(child)


def test_the_lock_is_released_when_the_body_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), update_lock(tmp_path):
        raise RuntimeError("update failed")
    child = start_holder(tmp_path)
    try:
        assert holder_line(child) == "held"
    finally:
        release(child)


def test_the_lock_dies_with_its_holder(tmp_path: Path) -> None:
    child = start_holder(tmp_path)
    assert holder_line(child) == "held"
    child.kill()
    child.wait(timeout=10)
    with update_lock(tmp_path):
        pass


def test_the_lock_creates_the_state_dir(tmp_path: Path) -> None:
    state_dir = tmp_path / "var" / "lib" / "avika-agent"
    with update_lock(state_dir):
        assert (state_dir / LOCK_FILE).exists()


def test_the_lock_descriptor_is_not_inherited_by_children(tmp_path: Path) -> None:
    # An inherited flock would outlive an exec and keep the next update out (DESIGN section 4).
    with update_lock(tmp_path) as fd:
        assert os.get_inheritable(fd) is False


# ---------------------------------------------------------------- the state lock


# A child that holds the state lock (inside a transaction) until its stdin closes.
STATE_HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from agent.state import state_transaction
    with state_transaction(Path(sys.argv[1])) as state:
        state.last_result = "held by the child"
        print("held", flush=True)
        sys.stdin.read()
    """
)


def test_a_transaction_saves_what_its_body_changed(tmp_path: Path) -> None:
    save_state(tmp_path, AgentState(highest_serial=3, last_check="then"))
    with state_transaction(tmp_path) as state:
        assert state.highest_serial == 3  # loaded under the lock
        state.last_check = "now"
    assert load_state(tmp_path) == AgentState(highest_serial=3, last_check="now")


def test_a_transaction_whose_body_raises_saves_nothing(tmp_path: Path) -> None:
    save_state(tmp_path, AgentState(highest_serial=3))
    with pytest.raises(RuntimeError), state_transaction(tmp_path) as state:
        state.highest_serial = 99
        raise RuntimeError("refused half-way")
    assert load_state(tmp_path) == AgentState(highest_serial=3)
    with state_transaction(tmp_path, timeout=0.5):  # and the lock was released
        pass


def test_a_transaction_holds_a_close_on_exec_lock_on_its_own_file(tmp_path: Path) -> None:
    lock = tmp_path / STATE_LOCK_FILE
    with state_transaction(tmp_path):
        fds = [
            fd for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}") == str(lock)
        ]
        assert len(fds) == 1
        assert os.get_inheritable(int(fds[0])) is False  # an exec'd agent or a watchdog never holds it
        probe = subprocess.run(
            [sys.executable, "-c", PROBE, str(lock)], capture_output=True, text=True, timeout=30, check=True
        )
        assert probe.stdout.strip() == "busy"
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, str(lock)], capture_output=True, text=True, timeout=30, check=True
    )
    assert probe.stdout.strip() == "free"


PROBE = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        print("free")
    except BlockingIOError:
        print("busy")
    """
)


def test_a_transaction_waits_briefly_then_gives_up_with_state_busy(tmp_path: Path) -> None:
    save_state(tmp_path, AgentState(highest_serial=1))
    child = subprocess.Popen(
        [sys.executable, "-c", STATE_HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder_line(child) == "held"
        with pytest.raises(StateBusy) as caught, state_transaction(tmp_path, timeout=0.3) as state:
            state.highest_serial = 2
        assert caught.value.code == "state_busy" and isinstance(caught.value, OSError)
        assert str(tmp_path / STATE_LOCK_FILE) in caught.value.message
    finally:
        release(child)
    # The holder's change is saved; the refused one never was.
    assert load_state(tmp_path) == AgentState(highest_serial=1, last_result="held by the child")


def test_a_waiting_transaction_proceeds_once_the_holder_is_done(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", STATE_HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder_line(child) == "held"
    threading.Timer(0.3, release, (child,)).start()
    with state_transaction(tmp_path, timeout=20) as state:
        assert state.last_result == "held by the child"  # loaded after the holder saved
        state.highest_serial = 5
    assert load_state(tmp_path) == AgentState(highest_serial=5, last_result="held by the child")


# Two real sites change different fields of the same state.json as fast as they can: the check's
# record (last_check, highest_serial) and a failed attempt's back-off (attempts).
HAMMER = textwrap.dedent(
    """
    import sys
    from datetime import datetime, timezone
    from pathlib import Path
    from agent import lifecycle
    from agent.config import AgentConfig
    from agent.state import state_transaction
    state_dir, role, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    config = AgentConfig(
        update_server="http://127.0.0.1:9/updates",
        state_dir=state_dir,
        target=state_dir / "t",
        update_interval=60,
    )
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    now = datetime(2026, 2, 15, tzinfo=timezone.utc)
    for n in range(rounds):
        if role == "attempts":
            lifecycle._fail_attempt(config, "1.1.0", "a" * 64, "fetch_failed", f"try {n}", "downloading", now)
        else:
            with state_transaction(state_dir) as state:
                state.last_check = f"check {n}"
                state.highest_serial = (state.highest_serial or 0) + 1
    """
)


def test_two_processes_changing_different_fields_lose_nothing(tmp_path: Path) -> None:
    rounds = 150
    children = [
        subprocess.Popen(
            [sys.executable, "-c", HAMMER, str(tmp_path), role, str(rounds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for role in ("attempts", "checks")
    ]
    try:
        assert [holder_line(child) for child in children] == ["ready", "ready"]
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        assert [child.wait(timeout=120) for child in children] == [0, 0]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    state = load_state(tmp_path)
    assert state.attempts["1.1.0/" + "a" * 64]["failures"] == rounds  # every failure counted
    assert state.highest_serial == rounds and state.last_check == f"check {rounds - 1}"
