"""``avika-publish fleet`` and ``canary`` (publisher/fleet.py, DESIGN section 6).

Rules enforced here:
- ``fleet --json`` is exactly ``{"agents": [{agent_id, mode, platform, version, state,
  target_version, last_seen, update_available, last_error}], "versions": {version: count}}``;
  ``update_available`` = offered a version it does not run and not installing it now;
  ``last_error`` only for an agent whose latest state is ``failed`` / ``rolled_back``;
- the text view is aligned columns plus counts per version and per state;
- ``canary``: over attempts that ended (committed, failed, rolled_back); in-progress ones are shown
  apart and not counted; exit 4 (hold) with fewer than ``--min-agents`` ended attempts, checked
  first, even when all failed; exit 5 above ``--max-failure-rate``; else 0;
- ``--halt`` after a 5 re-signs the live manifest at rollout 0 (serial + 1, verifiable by the agent),
  not again when already at 0, and refuses (exit 1, store untouched) when another version is live;
- liveness: ``last_seen`` moves with every report, heartbeats included, ``last_change`` only with
  the state; ``stale`` once ``last_seen`` is older than ``--stale-after``; a heartbeat's
  ``last_result`` shows; filters ``--state --version --mode --stale --update-available``;
- ``fleet AGENT_ID``: the agent's row and its history, oldest first, without heartbeats;
- on a terminal the table colours states as the console page does (one tone map);
- both stores: SQLite and DynamoDB (moto), filled through the real reports endpoint.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import reports_fixtures
from reports_fixtures import create_table

from agent.decide import NONE, Host, decide
from agent.events import Origin
from agent.manifest import in_wave, verify_manifest
from agent.reports import QueueSink
from infra.reports.auth import make_token
from infra.reports.core import ReportsEndpoint
from infra.reports.store import ReportStore, SQLiteStore, rfc3339_ms
from publisher import fleet
from publisher.serve import make_server
from tests.publisher_fixtures import cli, make_binary, new_key_file, snapshot

SECRET = "fleet-test-fleet-secret-012345"
# Reports are received "now" (the CLI judges staleness by the real clock), at a whole second.
NOW = float(int(time.time()))
SEEN = rfc3339_ms(NOW)
STREAM = f"{int((NOW - 3600) * 1000):013x}0123456789abcdef"
TABLE = "avika-reports"

aws = reports_fixtures.aws


class Fleet:
    """A reports store filled through the real endpoint (fixed clock), and its --reports URL."""

    def __init__(self, store: ReportStore, url: str) -> None:
        self.store = store
        self.url = url
        self.now = NOW
        self.endpoint = ReportsEndpoint(store, [SECRET.encode()], clock=lambda: self.now)
        self.seqs: dict[str, int] = {}

    def report(self, agent_id: str, state: str, **fields: Any) -> dict[str, Any]:
        seq = self.seqs[agent_id] = self.seqs.get(agent_id, 0) + 1
        event = {
            "event_id": str(uuid.uuid4()),
            "agent_id": agent_id,
            "stream": STREAM,
            "seq": seq,
            "time": "2026-02-15T19:59:00Z",
            "state": state,
            "version": "0.1.43",
            "mode": "vm",
            "platform": "linux-amd64",
            "target_version": "0.1.44",
            "manifest_serial": 7,
            **fields,
        }
        headers = {"Authorization": f"Bearer {make_token(SECRET, agent_id)}"}
        answer = self.endpoint.respond("POST", headers, json.dumps({"events": [event]}).encode())
        assert answer.status == 202, answer.body
        return event

    def attempt(self, agent_id: str, *states: str, **fields: Any) -> None:
        for state in states:
            self.report(agent_id, state, **fields)


@pytest.fixture
def sqlite_fleet(tmp_path: Path) -> Iterator[Fleet]:
    path = tmp_path / "reports.db"
    store = SQLiteStore(path)
    yield Fleet(store, f"sqlite:///{path}")
    store.close()


@pytest.fixture(params=["sqlite", "dynamodb"])
def any_fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_fleet")
        return
    request.getfixturevalue("aws")
    create_table(TABLE)
    yield Fleet(ReportStore.from_url(f"dynamodb://{TABLE}"), f"dynamodb://{TABLE}")


def mixed_fleet(f: Fleet) -> None:
    f.attempt("vm-a", "downloading", "verifying", "staged", "restarting")
    f.attempt("vm-a", "watching", "committed", version="0.1.44")
    f.attempt("vm-b", "downloading", "verifying", "staged", "restarting")
    f.report("vm-b", "rolled_back", failed_state="watching", error="too_many_boots: 4 boots without a commit")
    f.report("ctr-c", "update_available", mode="container", image="ghcr.io/avika/agent:0.1.44", in_wave=True)
    f.attempt("vm-d", "checking", "update_available", "downloading")
    f.report(
        "vm-e",
        "failed",
        target_version=None,
        manifest_serial=None,
        failed_state="checking",
        error="fetch_failed: connection refused",
    )


def row(agent_id: str, **fields: Any) -> dict[str, Any]:
    base = {
        "agent_id": agent_id,
        "mode": "vm",
        "platform": "linux-amd64",
        "version": "0.1.43",
        "state": None,
        "target_version": "0.1.44",
        "last_seen": SEEN,
        "last_change": SEEN,
        "stale": False,
        "last_result": None,
        "in_wave": None,
        "image": None,
        "update_available": False,
        "last_error": None,
    }
    return {**base, **fields}


EXPECTED_FLEET = {
    "agents": [
        row(
            "ctr-c",
            mode="container",
            state="update_available",
            update_available=True,
            in_wave=True,
            image="ghcr.io/avika/agent:0.1.44",
        ),
        row("vm-a", version="0.1.44", state="committed"),
        row(
            "vm-b",
            state="rolled_back",
            update_available=False,  # 0.1.44 is recorded as bad there: a failure, not pending
            last_error="watching: too_many_boots: 4 boots without a commit",
        ),
        row("vm-d", state="downloading"),
        row(
            "vm-e",
            state="failed",
            target_version=None,
            last_error="checking: fetch_failed: connection refused",
        ),
    ],
    "versions": {"0.1.43": 4, "0.1.44": 1},
}


# ---------------------------------------------------------------- fleet


def test_fleet_json_is_the_contract_shape_on_both_stores(any_fleet: Fleet) -> None:
    mixed_fleet(any_fleet)
    result = cli("fleet", "--reports", any_fleet.url, "--json")
    assert result.exit_code == 0, result.stderr
    view = json.loads(result.stdout)
    assert view == EXPECTED_FLEET
    assert list(view) == ["agents", "versions"]
    assert all(list(agent) == list(fleet.FLEET_FIELDS) for agent in view["agents"])


def test_fleet_reads_avika_reports_from_the_environment(sqlite_fleet: Fleet) -> None:
    mixed_fleet(sqlite_fleet)
    result = cli("fleet", "--json", env={"AVIKA_REPORTS": sqlite_fleet.url})
    assert result.exit_code == 0 and json.loads(result.stdout) == EXPECTED_FLEET


def test_fleet_text_is_an_aligned_table_with_counts(sqlite_fleet: Fleet) -> None:
    mixed_fleet(sqlite_fleet)
    result = cli("fleet", "--reports", sqlite_fleet.url)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    header, rows = lines[0], lines[1:6]
    columns = ["AGENT", "MODE", "PLATFORM", "VERSION", "STATE", "TARGET", "LAST SEEN", "CHANGED", "UPDATE"]
    columns.append("LAST ERROR / RESULT")
    starts = [header.index(name) for name in columns]
    assert starts == sorted(starts)
    for line in rows:  # every value starts where its column's title starts
        assert all(line[s] != " " and (s == 0 or line[s - 1] == " ") for s in starts[:-2])
    assert [line.split()[0] for line in rows] == ["ctr-c", "vm-a", "vm-b", "vm-d", "vm-e"]
    assert "available" in rows[0] and "too_many_boots" in rows[2]
    assert "versions: 0.1.43 4, 0.1.44 1" in lines
    assert "states:   committed 1, downloading 1, failed 1, rolled_back 1, update_available 1" in lines
    assert "containers to roll: ctr-c -> ghcr.io/avika/agent:0.1.44" in lines
    assert lines[-1] == "5 agent(s), 1 with an update available, 0 silent for over 3h"
    assert "\x1b[" not in result.stdout  # not a terminal: no colour


@pytest.mark.parametrize(
    ("latest", "expected"),
    [
        ({"state": "update_available", "mode": "container"}, True),
        ({"state": "update_available", "target_version": "v0.1.43"}, False),  # same version, as a tag
        ({"state": "watching", "version": "0.1.44"}, False),  # installing now
        ({"state": "downloading"}, False),
        ({"state": "failed", "failed_state": "verifying", "error": "checksum_mismatch: x"}, True),
        ({"state": "rolled_back", "failed_state": "watching", "error": "too_many_boots"}, False),  # bad
        ({"state": "committed", "version": "0.1.44"}, False),
        ({"state": "checking", "target_version": None}, False),
        ({"state": "update_available", "target_version": "0.1.40"}, True),  # a signed downgrade
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v),
)
def test_update_available_rule(latest: dict[str, Any], expected: bool) -> None:
    base = {"agent_id": "a", "mode": "vm", "version": "0.1.43", "target_version": "0.1.44"}
    assert fleet.update_available({**base, **latest}) is expected


def test_fleet_refuses_a_missing_database_and_a_missing_url(tmp_path: Path) -> None:
    missing = cli("fleet", "--reports", f"sqlite:///{tmp_path / 'nope.db'}")
    assert missing.exit_code == 2 and "no reports database" in missing.stderr
    assert not (tmp_path / "nope.db").exists()
    assert cli("fleet").exit_code == 2
    assert cli("fleet", "--reports", "postgres://x").exit_code == 2


def test_an_empty_fleet(sqlite_fleet: Fleet) -> None:
    assert json.loads(cli("fleet", "--reports", sqlite_fleet.url, "--json").stdout) == {
        "agents": [],
        "versions": {},
    }
    assert "no agents" in cli("fleet", "--reports", sqlite_fleet.url).stdout


# ---------------------------------------------------------------- canary


def canary_fleet(f: Fleet, committed: int, failed: int, rolled_back: int, in_progress: int = 0) -> None:
    for i in range(committed):
        f.attempt(f"ok-{i}", "downloading", "restarting", "watching")
        f.report(f"ok-{i}", "committed", version="0.1.44")
    for i in range(failed):
        f.attempt(f"bad-{i}", "downloading")
        f.report(f"bad-{i}", "failed", failed_state="verifying", error="checksum_mismatch: sha256 differs")
    for i in range(rolled_back):
        f.attempt(f"rb-{i}", "downloading", "restarting")
        f.report(f"rb-{i}", "rolled_back", failed_state="watching", error="too_many_boots: 4 boots")
    for i in range(in_progress):
        f.attempt(f"busy-{i}", "downloading", ("verifying", "watching")[i % 2])
    f.report("other", "committed", target_version="0.1.45", version="0.1.45")  # another version's attempt


def canary(f: Fleet, *args: str, version: str = "0.1.44") -> tuple[int, dict[str, Any]]:
    result = cli("canary", version, "--reports", f.url, "--json", *args)
    return result.exit_code, json.loads(result.stdout) if result.stdout else {}


def test_too_few_ended_attempts_hold_even_when_all_failed(sqlite_fleet: Fleet) -> None:
    canary_fleet(sqlite_fleet, committed=0, failed=1, rolled_back=2, in_progress=4)
    code, report = canary(sqlite_fleet, "--max-failure-rate", "0.05", "--min-agents", "5")
    assert code == 4
    assert (report["verdict"], report["ended"], report["failure_rate"]) == ("hold", 3, 1.0)


def test_over_the_threshold_fails_and_under_it_passes(any_fleet: Fleet) -> None:
    canary_fleet(any_fleet, committed=8, failed=1, rolled_back=1, in_progress=3)  # 2 of 10 = 20 %
    code, report = canary(any_fleet, "--max-failure-rate", "0.1", "--min-agents", "10")
    assert code == 5 and report["verdict"] == "fail"
    assert (report["ended"], report["committed"], report["failed"], report["rolled_back"]) == (10, 8, 1, 1)
    assert report["failure_rate"] == 0.2
    assert sorted(o["agent_id"] for o in report["failures"]) == ["bad-0", "rb-0"]
    # Mid-update agents are listed apart and not counted.
    assert sorted(o["agent_id"] for o in report["in_progress"]) == ["busy-0", "busy-1", "busy-2"]
    assert canary(any_fleet, "--max-failure-rate", "0.25", "--min-agents", "10")[0] == 0
    assert canary(any_fleet, "--max-failure-rate", "0.2", "--min-agents", "10")[0] == 0  # at it: not over
    assert canary(any_fleet, "--max-failure-rate", "0.25", "--min-agents", "11")[0] == 4


def test_a_version_given_as_a_tag_is_the_published_version(sqlite_fleet: Fleet) -> None:
    canary_fleet(sqlite_fleet, committed=3, failed=0, rolled_back=0)
    code, report = canary(sqlite_fleet, "--max-failure-rate", "0", "--min-agents", "3", version="v0.1.44")
    assert code == 0 and report["version"] == "0.1.44" and report["ended"] == 3


def test_canary_text_shows_failures_and_in_progress_apart(sqlite_fleet: Fleet) -> None:
    canary_fleet(sqlite_fleet, committed=3, failed=1, rolled_back=0, in_progress=2)
    result = cli(
        "canary", "0.1.44", "--reports", sqlite_fleet.url, "--max-failure-rate", "0.1", "--min-agents", "2"
    )
    assert result.exit_code == 5
    out = result.stdout
    assert out.startswith("canary 0.1.44: FAIL: failure rate 25.0% is above --max-failure-rate 10.0%")
    assert "ended        4 (committed 3, failed 1)" in out
    assert "in progress  2 (downloading 0" not in out and "in progress  2 (verifying 1, watching 1)" in out
    failures = out[out.index("failed or rolled back:") : out.index("still updating")]
    assert "bad-0" in failures and "checksum_mismatch" in failures and "ok-0" not in failures
    assert "busy-0" in out[out.index("still updating") :]


def test_canary_needs_its_thresholds() -> None:
    assert cli("canary", "0.1.44", "--reports", "sqlite:///x.db", "--min-agents", "3").exit_code == 2
    assert cli("canary", "0.1.44", "--max-failure-rate", "2", "--min-agents", "3").exit_code == 2
    assert cli("canary", "0.1.44", "--max-failure-rate", "0.1", "--min-agents", "0").exit_code == 2


# ---------------------------------------------------------------- --halt


@pytest.fixture
def released(tmp_path: Path) -> tuple[Path, Any]:
    """A store with 0.1.44 live at rollout 10 %, signed with a key file."""
    key = new_key_file(tmp_path)
    root = tmp_path / "updates"
    binary = tmp_path / "dist" / "avika-agent"
    make_binary(binary, 4096, "0.1.44")
    done = cli(
        "release", "0.1.44", "--binary", f"linux-amd64={binary}", "--rollout", "10", "--init", "--no-inspect",
        "--key", str(key.path), "--store", str(root),
    )  # fmt: skip
    assert done.exit_code == 0, done.stderr
    return root, key


def live(root: Path, key: Any) -> Any:
    return verify_manifest((root / "manifest.json").read_bytes(), trusted=[key.public], now=datetime.now(UTC))


def test_halt_resigns_the_manifest_at_rollout_0_once(sqlite_fleet: Fleet, released: tuple[Path, Any]) -> None:
    root, key = released
    before = live(root, key)
    assert (before.version, before.rollout.percent) == ("0.1.44", 10)
    canary_fleet(sqlite_fleet, committed=1, failed=0, rolled_back=3)
    halt = ("--halt", "--key", str(key.path), "--store", str(root))
    code, report = canary(sqlite_fleet, "--max-failure-rate", "0.05", "--min-agents", "3", *halt)
    assert code == 5
    after = live(root, key)  # the agent's own verifier accepts it
    assert (after.version, after.serial, after.rollout.percent) == ("0.1.44", before.serial + 1, 0)
    assert after.rollout.salt == before.rollout.salt and after.binaries == before.binaries
    assert report["halt"] == {"status": "halted", "version": "0.1.44", "serial": before.serial + 1}
    # Agents outside the (now empty) wave stay on the old version.
    for agent_id in (f"host-{i}" for i in range(50)):
        assert not in_wave(agent_id, after.rollout)
        host = Host(agent_id=agent_id, current_version="0.1.43", mode="vm", platform="linux-amd64")
        assert decide(after, host).action == NONE

    unchanged = snapshot(root)
    code, report = canary(sqlite_fleet, "--max-failure-rate", "0.05", "--min-agents", "3", *halt)
    assert code == 5 and report["halt"]["status"] == "already_halted"
    assert snapshot(root) == unchanged  # not signed again


def test_halt_refuses_when_another_version_is_live(
    tmp_path: Path, sqlite_fleet: Fleet, released: tuple[Path, Any]
) -> None:
    root, key = released
    newer = tmp_path / "dist" / "avika-agent-0.1.45"
    make_binary(newer, 4096, "0.1.45")
    done = cli(
        "release", "0.1.45", "--binary", f"linux-amd64={newer}", "--key", str(key.path), "--store", str(root),
        "--no-inspect",
    )  # fmt: skip
    assert done.exit_code == 0, done.stderr
    canary_fleet(sqlite_fleet, committed=0, failed=3, rolled_back=0)
    unchanged = snapshot(root)
    result = cli(
        "canary", "0.1.44", "--reports", sqlite_fleet.url, "--max-failure-rate", "0.05", "--min-agents", "3",
        "--halt", "--key", str(key.path), "--store", str(root),
    )  # fmt: skip
    assert result.exit_code == 1
    assert "0.1.45" in result.stderr and "refusing" in result.stderr
    assert snapshot(root) == unchanged


@pytest.mark.parametrize(("failed", "expected"), [(0, 0), (1, 4)], ids=["pass", "hold"])
def test_halt_signs_nothing_unless_the_canary_failed(
    sqlite_fleet: Fleet, released: tuple[Path, Any], failed: int, expected: int
) -> None:
    root, key = released
    canary_fleet(sqlite_fleet, committed=3 - failed, failed=failed, rolled_back=0)
    min_agents = "3" if expected == 0 else "5"
    unchanged = snapshot(root)
    code, report = canary(
        sqlite_fleet, "--max-failure-rate", "0.05", "--min-agents", min_agents,
        "--halt", "--key", str(key.path), "--store", str(root),
    )  # fmt: skip
    assert code == expected and report["halt"] is None
    assert snapshot(root) == unchanged


def test_halt_needs_a_signing_key(sqlite_fleet: Fleet) -> None:
    result = cli(
        "canary",
        "0.1.44",
        "--reports",
        sqlite_fleet.url,
        "--max-failure-rate",
        "0.1",
        "--min-agents",
        "1",
        "--halt",
    )
    assert result.exit_code == 2 and "--key" in result.stderr


# ---------------------------------------------------------------- end to end


def test_agents_reporting_through_serve_show_up_in_fleet_and_canary(tmp_path: Path) -> None:
    """Real queue sinks POST to a real ``serve`` endpoint; the publisher reads the same database."""
    db = tmp_path / "reports.db"
    root = tmp_path / "root"
    root.mkdir()
    server = make_server(root, port=0, reports_url=f"sqlite:///{db}", fleet_secret=SECRET)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = server.url + "/v1/reports"

    def sink(agent_id: str, version: str, mode: str = "vm") -> QueueSink:
        origin = Origin(agent_id, version, mode, "linux-amd64" if mode == "vm" else None)
        return QueueSink(
            origin, state_dir=tmp_path / agent_id, report_url=url, token=make_token(SECRET, agent_id)
        )

    try:
        old = sink("vm-1", "0.1.43")
        for state in ("downloading", "verifying", "staged", "restarting"):
            old.emit(state, target_version="0.1.44", manifest_serial=8)
        assert old.flush(5)
        new = sink("vm-1", "0.1.44")  # the same queue after the exec, now the new version
        for state in ("watching", "committed"):
            new.emit(state, target_version="0.1.44", manifest_serial=8)
        assert new.flush(5) and new.delivered == 2
        bad = sink("vm-2", "0.1.43")
        for state in ("downloading", "verifying", "staged", "restarting"):
            bad.emit(state, target_version="0.1.44", manifest_serial=8)
        bad.emit(
            "rolled_back",
            target_version="0.1.44",
            manifest_serial=8,
            failed_state="watching",
            error="died_before_commit: exit 1",
        )
        container = sink("ctr-1", "0.1.43", "container")
        container.emit(
            "update_available",
            target_version="0.1.44",
            manifest_serial=8,
            image="ghcr.io/avika/agent:0.1.44",
            in_wave=True,
        )
        assert bad.flush(5) and container.flush(5)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        server.reports.store.close()  # type: ignore[union-attr]

    view = json.loads(cli("fleet", "--reports", f"sqlite:///{db}", "--json").stdout)
    by_id = {a["agent_id"]: a for a in view["agents"]}
    assert (by_id["vm-1"]["version"], by_id["vm-1"]["state"], by_id["vm-1"]["update_available"]) == (
        "0.1.44",
        "committed",
        False,
    )
    # 0.1.44 is recorded as bad on vm-2: a failure to look at, not a pending update.
    assert by_id["vm-2"]["state"] == "rolled_back" and by_id["vm-2"]["update_available"] is False
    assert by_id["vm-2"]["last_error"] == "watching: died_before_commit: exit 1"
    assert (by_id["ctr-1"]["mode"], by_id["ctr-1"]["state"], by_id["ctr-1"]["update_available"]) == (
        "container",
        "update_available",
        True,
    )
    assert view["versions"] == {"0.1.43": 2, "0.1.44": 1}
    code, report = canary(
        Fleet(SQLiteStore(db), f"sqlite:///{db}"), "--max-failure-rate", "0.4", "--min-agents", "2"
    )
    assert code == 5 and (report["ended"], report["rolled_back"]) == (2, 1)


# ---------------------------------------------------------------- liveness, filters, history


def heartbeat(f: Fleet, agent_id: str, **fields: Any) -> dict[str, Any]:
    base = {"target_version": None, "manifest_serial": None, "last_result": "up_to_date", "uptime_s": 60}
    return f.report(agent_id, "heartbeat", **{**base, **fields})


def fleet_json(f: Fleet, *args: str) -> dict[str, Any]:
    result = cli("fleet", "--reports", f.url, "--json", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_a_silent_agent_is_stale_until_a_heartbeat(any_fleet: Fleet) -> None:
    any_fleet.now = NOW - 4 * 3600
    any_fleet.attempt("vm-a", "downloading", "restarting", "watching")
    any_fleet.report("vm-a", "committed", version="0.1.44")
    [agent] = fleet_json(any_fleet)["agents"]
    assert (agent["stale"], agent["state"], agent["last_seen"]) == (
        True,
        "committed",
        rfc3339_ms(NOW - 4 * 3600),
    )
    assert fleet_json(any_fleet, "--stale-after", "5h")["agents"][0]["stale"] is False

    any_fleet.now = NOW
    heartbeat(any_fleet, "vm-a", version="0.1.44", last_result="not_in_wave")
    [agent] = fleet_json(any_fleet)["agents"]
    assert (agent["stale"], agent["state"], agent["version"]) == (False, "committed", "0.1.44")
    assert (agent["last_seen"], agent["last_change"]) == (SEEN, rfc3339_ms(NOW - 4 * 3600))
    assert agent["last_result"] == "not_in_wave"
    text = cli("fleet", "--reports", any_fleet.url).stdout
    assert "0 silent for over 3h" in text and "not_in_wave" in text


def test_filters_select_by_state_version_mode_staleness_and_update(any_fleet: Fleet) -> None:
    mixed_fleet(any_fleet)
    any_fleet.now = NOW - 5 * 3600
    any_fleet.report("old-1", "committed", version="v0.1.44", target_version="0.1.44")
    any_fleet.now = NOW
    # A failed download is retried: 0.1.44 is still pending there (vm-b rolled it back: it is not).
    any_fleet.report("vm-f", "failed", failed_state="downloading", error="download_failed: reset")

    def ids(*args: str) -> list[str]:
        return [a["agent_id"] for a in fleet_json(any_fleet, *args)["agents"]]

    assert ids("--state", "rolled_back") == ["vm-b"]
    assert ids("--version", "0.1.44") == ["old-1", "vm-a"]  # v0.1.44 is 0.1.44
    assert ids("--version", "v0.1.43") == ["ctr-c", "vm-b", "vm-d", "vm-e", "vm-f"]
    assert ids("--mode", "container") == ["ctr-c"]
    assert ids("--stale") == ["old-1"]
    assert ids("--update-available") == ["ctr-c", "vm-f"]
    assert ids("--mode", "vm", "--update-available") == ["vm-f"]
    assert ids("--state", "committed", "--stale") == ["old-1"]
    view = fleet_json(any_fleet, "--mode", "vm", "--version", "0.1.43")
    assert view["versions"] == {"0.1.43": 4}
    assert cli("fleet", "--reports", any_fleet.url, "--state", "committed", "--mode", "container").stdout == (
        "no agents match\n"
    )


@pytest.mark.parametrize(
    "args",
    [
        ("--state", "sleeping"),
        ("--mode", "pod"),
        ("--stale-after", "soon"),
        ("--stale-after", "0s"),
        ("a b",),
    ],
)
def test_bad_fleet_arguments_exit_2(sqlite_fleet: Fleet, args: tuple[str, ...]) -> None:
    assert cli("fleet", "--reports", sqlite_fleet.url, *args).exit_code == 2


def test_fleet_agent_id_shows_its_history_oldest_first(any_fleet: Fleet) -> None:
    mixed_fleet(any_fleet)
    heartbeat(any_fleet, "vm-b", last_result="bad_version")
    history = fleet_json(any_fleet, "vm-b")
    assert list(history) == ["agent", "events"]
    assert history["agent"]["agent_id"] == "vm-b" and history["agent"]["last_result"] == "bad_version"
    assert list(history["agent"]) == list(fleet.FLEET_FIELDS)
    events = history["events"]
    assert [e["state"] for e in events] == ["downloading", "verifying", "staged", "restarting", "rolled_back"]
    assert all(list(e) == list(fleet.HISTORY_FIELDS) for e in events)
    assert events[-1]["error"] == "too_many_boots: 4 boots without a commit"
    assert events[-1]["received"] == SEEN and events[0]["time"] == "2026-02-15T19:59:00Z"
    text = cli("fleet", "vm-b", "--reports", any_fleet.url).stdout
    assert text.startswith("agent        vm-b\n") and "rolled_back" in text and "too_many_boots" in text
    missing = cli("fleet", "nobody", "--reports", any_fleet.url)
    assert missing.exit_code == 1 and "no reports from agent 'nobody'" in missing.stderr


def test_the_history_of_an_agent_known_only_by_heartbeats_is_empty(sqlite_fleet: Fleet) -> None:
    heartbeat(sqlite_fleet, "quiet-1")
    history = fleet_json(sqlite_fleet, "quiet-1")
    assert history["events"] == []
    assert (history["agent"]["state"], history["agent"]["last_result"]) == ("heartbeat", "up_to_date")


def test_states_are_coloured_on_a_terminal(sqlite_fleet: Fleet) -> None:
    """A real pseudo-terminal: the table colours states with the tones the console page uses."""
    import os
    import pty
    import re
    import subprocess
    import sys

    mixed_fleet(sqlite_fleet)
    sqlite_fleet.now = time.time() - 4 * 3600 - 5
    sqlite_fleet.report("old-1", "committed", version="0.1.44")
    controller, terminal = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "AVIKA_REPORTS")}
    proc = subprocess.run(
        [sys.executable, "-m", "publisher.cli", "fleet", "--reports", sqlite_fleet.url],
        stdout=terminal,
        stderr=subprocess.PIPE,
        env=env,
        timeout=60,
        check=False,
    )
    os.close(terminal)
    out = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(controller)
    text = out.decode()
    assert proc.returncode == 0, proc.stderr
    ansi = fleet.ANSI
    assert f"\x1b[{ansi['ok']}mcommitted\x1b[0m" in text
    assert f"\x1b[{ansi['bad']}mrolled_back\x1b[0m" in text
    assert f"\x1b[{ansi['warn']}mupdate_available\x1b[0m" in text
    assert f"\x1b[{ansi['busy']}mdownloading\x1b[0m" in text
    assert re.search(f"\x1b\\[{ansi['stale']}m4h0\\dm ago, SILENT\x1b\\[0m", text), text


def test_the_consoles_canary_is_the_clis_verdict_with_short_lists(any_fleet: Fleet) -> None:
    """``canary_view`` (the console's; SQL counts on SQLite) agrees with ``canary --json``."""
    canary_fleet(any_fleet, committed=8, failed=1, rolled_back=2, in_progress=3)
    for rate, minimum in (("0.1", "10"), ("0.5", "10"), ("0.5", "12")):
        _, cli_report = canary(any_fleet, "--max-failure-rate", rate, "--min-agents", minimum)
        view = fleet.canary_view(
            any_fleet.store, "0.1.44", max_failure_rate=float(rate), min_agents=int(minimum)
        )
        assert {k: view[k] for k in cli_report} == cli_report
    short = fleet.canary_view(any_fleet.store, "0.1.44", max_failure_rate=0.1, min_agents=1, rows=1)
    assert len(short["failures"]) == 1 and short["failures_total"] == 3
    assert len(short["in_progress"]) == 1 and short["in_progress_total"] == 3
