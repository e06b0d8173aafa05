"""The operator API on ``avika-publish serve --console`` (DESIGN section 9), over real HTTP.

Rules enforced here (each against the real server, the real store and the real database):
- no or a wrong token: 401 (with ``WWW-Authenticate``); an agent's report token never opens it;
- a ``read`` token may read, not act: 403 and the store unchanged;
- actions need ``If-Match: "<serial>"``: 428 without it, 412 when the live serial moved (and the
  store unchanged), 400 malformed; two operators halting the same serial: one signs, one gets 412;
- a publish landing between an operator's check and the write is refused, not overwritten;
- ``rollout N`` / ``halt`` re-sign (serial + 1, verifiable by the agent), at that percent already
  nothing is signed; every action is audited (who, what, serial before and after, time);
- ``/v1/fleet``: the ``fleet --json`` rows plus a whole-fleet summary and the live release, paged
  with a cursor, filtered, with an ETag (304 until something changes);
- ``/v1/agents/{id}``: the agent's history, oldest first, heartbeats not in it (ids with slashes);
- ``/v1/releases``: live release, archived serials, canary verdict, audit, who is asking;
- errors are JSON ``{"error", "message"}``; every answer says ``Cache-Control: no-store``;
- ``serve --console`` refuses to start without tokens or a reports store (exit 2).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_fixtures import (
    FLEET_SECRET,
    OPERATE_SECRET,
    READ_SECRET,
    Site,
    mixed_reports,
    release,
    sign_plan,
    start_site,
)

from infra.reports.auth import make_token
from publisher import fleet
from tests.publisher_fixtures import cli, snapshot

OPS = OPERATE_SECRET
VIEWER = READ_SECRET
AGENT_TOKEN = make_token(FLEET_SECRET, "vm-a")

READS = [("GET", "/v1/fleet"), ("GET", "/v1/agents/vm-a"), ("GET", "/v1/releases")]
ACTIONS = [("POST", "/v1/rollout", {"percent": 50}), ("POST", "/v1/halt", None)]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = start_site(tmp_path)
    mixed_reports(s)
    yield s
    s.close()


def json_of(answer: Any) -> dict[str, Any]:
    assert answer.headers["Content-Type"] == "application/json", answer.headers
    assert answer.headers["Cache-Control"] == "no-store"
    return answer.json()


# ---------------------------------------------------------------- auth


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789", AGENT_TOKEN, f"{READ_SECRET}x", ""])
@pytest.mark.parametrize(("method", "path"), [*READS, *((m, p) for m, p, _ in ACTIONS)])
def test_without_a_console_token_everything_is_401(
    site: Site, method: str, path: str, token: str | None
) -> None:
    before = snapshot(site.root)
    answer = site.call(method, path, token, headers={"If-Match": '"1"'})
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert json_of(answer)["error"] == "unauthorized"
    assert snapshot(site.root) == before


@pytest.mark.parametrize(("method", "path", "body"), ACTIONS)
def test_a_read_token_cannot_act(site: Site, method: str, path: str, body: Any) -> None:
    before = snapshot(site.root)
    answer = site.call(method, path, VIEWER, body=body, headers={"If-Match": '"1"'})
    assert answer.status_code == 403 and json_of(answer)["error"] == "forbidden"
    assert snapshot(site.root) == before
    assert site.call("GET", "/v1/releases", VIEWER).json()["audit"] == []


@pytest.mark.parametrize(("method", "path"), READS)
def test_both_scopes_read(site: Site, method: str, path: str) -> None:
    assert site.call(method, path, VIEWER).status_code == 200
    assert site.call(method, path, OPS).status_code == 200


@pytest.mark.parametrize(("method", "path", "body"), ACTIONS)
def test_an_action_without_if_match_is_428(site: Site, method: str, path: str, body: Any) -> None:
    before = snapshot(site.root)
    answer = site.call(method, path, OPS, body=body)
    assert answer.status_code == 428 and json_of(answer)["error"] == "precondition_required"
    assert "If-Match" in answer.json()["message"]
    assert snapshot(site.root) == before


@pytest.mark.parametrize(("method", "path", "body"), ACTIONS)
def test_an_action_on_a_serial_that_moved_is_412(site: Site, method: str, path: str, body: Any) -> None:
    release(site.root, site.key, "0.1.45", "--rollout", "10")  # someone published meanwhile: serial 2
    before = snapshot(site.root)
    answer = site.call(method, path, OPS, body=body, headers={"If-Match": '"1"'})
    assert answer.status_code == 412
    problem = json_of(answer)
    assert (problem["error"], problem["live_serial"], problem["live_version"]) == (
        "precondition_failed",
        2,
        "0.1.45",
    )
    assert "not 1" in problem["message"]
    assert snapshot(site.root) == before
    assert site.live().version == "0.1.45" and site.live().rollout.percent == 10


@pytest.mark.parametrize(
    ("if_match", "body", "path"),
    [
        ("1", {"percent": 50}, "/v1/rollout"),  # unquoted
        ('"one"', {"percent": 50}, "/v1/rollout"),
        ('"1"', {"percent": 101}, "/v1/rollout"),
        ('"1"', {"percent": True}, "/v1/rollout"),
        ('"1"', {"percent": 50.0}, "/v1/rollout"),
        ('"1"', {}, "/v1/rollout"),
        ('"1"', {"percent": 50, "force": True}, "/v1/rollout"),
        ('"1"', b'{"percent": 50, "percent": 0}', "/v1/rollout"),  # duplicate keys
        ('"1"', b"[50]", "/v1/rollout"),
        ('"1"', {"percent": 0}, "/v1/halt"),  # halt takes no percent: a mistake, not a halt
    ],
)
def test_malformed_actions_are_400_and_sign_nothing(site: Site, if_match: str, body: Any, path: str) -> None:
    before = snapshot(site.root)
    answer = site.call("POST", path, OPS, body=body, headers={"If-Match": if_match})
    assert answer.status_code == 400 and json_of(answer)["error"] == "bad_request"
    assert snapshot(site.root) == before


# ---------------------------------------------------------------- actions


def test_rollout_and_halt_resign_the_release_the_operator_saw(site: Site) -> None:
    assert (site.live().serial, site.live().rollout.percent) == (1, 25)
    answer = site.call("POST", "/v1/rollout", OPS, body={"percent": 50}, headers={"If-Match": '"1"'})
    assert answer.status_code == 200, answer.text
    assert json_of(answer) == {
        "serial": 2,
        "version": "0.1.44",
        "percent": 50,
        "status": "published",
        "previous_serial": 1,
    }
    assert answer.headers["ETag"] == '"2"'
    live = site.live()  # verifies with the agent's own verifier
    assert (live.serial, live.rollout.percent, live.rollout.salt) == (2, 50, "0.1.44")

    before = snapshot(site.root)
    again = site.call("POST", "/v1/rollout", OPS, body={"percent": 50}, headers={"If-Match": '"2"'})
    assert again.status_code == 200 and again.json()["status"] == "unchanged" and again.json()["serial"] == 2
    assert snapshot(site.root) == before  # idempotent: nothing signed

    halted = site.call("POST", "/v1/halt", OPS, headers={"If-Match": '"2"'})
    assert halted.status_code == 200 and halted.json()["percent"] == 0
    assert (site.live().serial, site.live().rollout.percent) == (3, 0)

    audit = site.call("GET", "/v1/releases", VIEWER).json()["audit"]
    assert [
        (e["who"], e["action"], e["percent"], e["serial_before"], e["serial_after"], e["status"])
        for e in audit
    ] == [
        ("ops", "halt", 0, 2, 3, "published"),
        ("ops", "rollout", 50, 2, 2, "unchanged"),
        ("ops", "rollout", 50, 1, 2, "published"),
    ]
    assert all(e["time"].endswith("Z") and e["version"] == "0.1.44" for e in audit)


def test_two_operators_halting_the_same_serial_sign_once(site: Site) -> None:
    site.call("POST", "/v1/rollout", OPS, body={"percent": 50}, headers={"If-Match": '"1"'})  # serial 2
    results: list[int] = []
    barrier = threading.Barrier(2)

    def halt() -> None:
        barrier.wait()
        results.append(site.call("POST", "/v1/halt", OPS, headers={"If-Match": '"2"'}).status_code)

    threads = [threading.Thread(target=halt) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200, 412]
    assert (site.live().serial, site.live().rollout.percent) == (3, 0)
    audit = site.call("GET", "/v1/releases", VIEWER).json()["audit"]
    assert (audit[0]["action"], audit[0]["serial_before"], audit[0]["serial_after"]) == ("halt", 2, 3)
    assert [e["action"] for e in audit] == ["halt", "rollout"]  # the loser signed nothing live
    # The loser may have archived the serial after (the publisher archives before it swaps
    # manifest.json, and the swap is what refused it): such an envelope is never the live one.
    assert (site.root / "manifests" / "3.json").read_bytes() == (site.root / "manifest.json").read_bytes()


def test_a_publish_between_the_check_and_the_write_is_refused(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish landing after the serial was checked and before the write: the write's
    compare-and-swap refuses it, and the operator hears 412, not a retry and not a halt."""
    from publisher import resign as resigning

    real = resigning.publish_envelope

    def raced(*args: Any, **kwargs: Any) -> Any:
        release(site.root, site.key, "0.1.45", "--rollout", "5")  # lands between check and write
        return real(*args, **kwargs)

    monkeypatch.setattr(resigning, "publish_envelope", raced)
    answer = site.call("POST", "/v1/halt", OPS, headers={"If-Match": '"1"'})
    assert answer.status_code == 412, answer.text
    live = site.live()
    assert (live.version, live.serial, live.rollout.percent) == ("0.1.45", 2, 5)  # not halted by mistake


def test_actions_without_a_signing_key_are_503(tmp_path: Path) -> None:
    s = start_site(tmp_path, signing=False)
    try:
        before = snapshot(s.root)
        answer = s.call("POST", "/v1/halt", OPS, headers={"If-Match": '"1"'})
        assert answer.status_code == 503 and json_of(answer)["error"] == "not_configured"
        assert snapshot(s.root) == before
        assert s.call("GET", "/v1/releases", OPS).json()["session"] == {
            "who": "ops",
            "scopes": ["read", "operate"],
            "can_sign": False,
        }
    finally:
        s.close()


# ---------------------------------------------------------------- reads


def test_fleet_has_the_rows_a_whole_fleet_summary_and_the_release(site: Site) -> None:
    body = json_of(site.call("GET", "/v1/fleet", VIEWER))
    rows = {a["agent_id"]: a for a in body["agents"]}
    assert sorted(rows) == ["ctr-d", "vm-a", "vm-b", "vm-c", "vm-e"]
    assert all(list(a) == list(fleet.FLEET_FIELDS) for a in body["agents"])
    assert rows["vm-b"]["last_error"] == "watching: too_many_boots: 4 boots without a commit"
    assert rows["ctr-d"]["update_available"] and rows["ctr-d"]["image"] == "ghcr.io/avika/agent:0.1.44"
    assert (rows["vm-e"]["state"], rows["vm-e"]["last_result"]) == ("heartbeat", "up_to_date")
    summary = body["summary"]
    assert summary["total"] == 5
    assert summary["by_version"] == {"0.1.43": 3, "0.1.44": 2}
    assert summary["by_state"] == {
        "update_available": 1,
        "downloading": 1,
        "committed": 1,
        "rolled_back": 1,
        "heartbeat": 1,
    }
    assert (summary["stale"], summary["update_available"], summary["failures"]) == (
        0,
        1,
        1,
    )  # vm-b rolled back: a failure, not pending
    assert summary["attention"]["update_available"][0]["agent_id"] == "ctr-d"
    assert [a["agent_id"] for a in summary["attention"]["failures"]] == ["vm-b"]
    rollout = summary["rollout"]
    assert (rollout["version"], rollout["percent"]) == ("0.1.44", 25)
    assert rollout["vm"]["on_live"] == 2 and sum(rollout["vm"].values()) == 4
    assert sum(rollout["container"].values()) == 1
    release_ = body["release"]
    assert {k: release_[k] for k in ("version", "serial", "rollout_percent", "halted", "verified")} == {
        "version": "0.1.44",
        "serial": 1,
        "rollout_percent": 25,
        "halted": False,
        "verified": True,
    }
    assert release_["expires"].endswith("Z") and "next" not in body


def test_fleet_answers_304_until_something_changes(site: Site) -> None:
    first = site.call("GET", "/v1/fleet", VIEWER)
    tag = first.headers["ETag"]
    again = site.call("GET", "/v1/fleet", VIEWER, headers={"If-None-Match": tag})
    assert again.status_code == 304 and again.content == b"" and again.headers["ETag"] == tag
    assert again.headers["Cache-Control"] == "no-store"
    site.report("vm-c", "verifying")
    changed = site.call("GET", "/v1/fleet", VIEWER, headers={"If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["ETag"] != tag


def test_fleet_pages_with_a_cursor_and_filters(site: Site) -> None:
    seen: list[str] = []
    path = "/v1/fleet?limit=2"
    pages = 0
    while True:
        body = site.call("GET", path, VIEWER).json()
        pages += 1
        assert len(body["agents"]) <= 2 and body["summary"]["total"] == 5  # the summary is never the page's
        seen += [a["agent_id"] for a in body["agents"]]
        if "next" not in body:
            break
        path = f"/v1/fleet?limit=2&cursor={body['next']}"
    assert seen == ["ctr-d", "vm-a", "vm-b", "vm-c", "vm-e"] and pages == 3

    def ids(query: str) -> list[str]:
        answer = site.call("GET", f"/v1/fleet?{query}", VIEWER)
        assert answer.status_code == 200, answer.text
        return [a["agent_id"] for a in answer.json()["agents"]]

    assert ids("mode=container") == ["ctr-d"]
    assert ids("state=rolled_back") == ["vm-b"]
    assert ids("version=v0.1.44") == ["vm-a", "vm-e"]
    assert ids("update_available=true") == ["ctr-d"]  # vm-b rolled back: not pending
    assert ids("update_available=false&mode=vm") == ["vm-a", "vm-b", "vm-c", "vm-e"]
    assert ids("stale=true") == []
    assert ids("stale=true&stale_after=1s") in ([], ["ctr-d", "vm-a", "vm-b", "vm-c", "vm-e"])


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=5001",
        "limit=ten",
        "stale=yes",
        "state=sleeping",
        "mode=pod",
        "version=",
        "stale_after=soon",
        "cursor=!!!",
        "cursor=bm90LWEtY3Vyc29y&cursor=x",
        "colour=red",
    ],
)
def test_bad_fleet_queries_are_400(site: Site, query: str) -> None:
    answer = site.call("GET", f"/v1/fleet?{query}", VIEWER)
    assert answer.status_code == 400, answer.text
    assert json_of(answer)["error"] == "bad_request" and answer.json()["message"]


def test_an_agents_history_oldest_first_without_heartbeats(site: Site) -> None:
    site.heartbeat("vm-b", last_result="bad_version")
    body = json_of(site.call("GET", "/v1/agents/vm-b", VIEWER))
    assert body["agent"]["last_result"] == "bad_version" and body["agent"]["state"] == "rolled_back"
    assert [e["state"] for e in body["events"]] == [
        "downloading",
        "verifying",
        "staged",
        "restarting",
        "rolled_back",
    ]
    assert body["events"][-1]["error"] == "too_many_boots: 4 boots without a commit"
    kube = "k8s/prod-eu/avika/daemonset/avika-agent"
    site.report(kube, "update_available", mode="container", image="ghcr.io/avika/agent:0.1.44")
    for path in (f"/v1/agents/{kube}", "/v1/agents/k8s%2Fprod-eu%2Favika%2Fdaemonset%2Favika-agent"):
        assert site.call("GET", path, VIEWER).json()["agent"]["agent_id"] == kube
    missing = site.call("GET", "/v1/agents/nobody", VIEWER)
    assert missing.status_code == 404 and json_of(missing)["error"] == "not_found"
    bad = site.call("GET", "/v1/agents/a%20b", VIEWER)
    assert bad.status_code == 400


def test_releases_lists_live_history_canary_and_audit(site: Site) -> None:
    site.call("POST", "/v1/rollout", OPS, body={"percent": 40}, headers={"If-Match": '"1"'})
    body = json_of(site.call("GET", "/v1/releases?max_failure_rate=0.5&min_agents=2", VIEWER))
    assert (body["live"]["serial"], body["live"]["rollout_percent"]) == (2, 40)
    assert [(h["serial"], h["rollout"], h["verified"], h["live"]) for h in body["history"]] == [
        (2, 40, True, True),
        (1, 25, True, False),
    ]
    canary = body["canary"]
    assert (canary["version"], canary["ended"], canary["committed"], canary["rolled_back"]) == (
        "0.1.44",
        2,
        1,
        1,
    )
    assert (canary["verdict"], canary["exit_code"]) == ("pass", 0)  # 50 % is not over 0.5
    assert [o["agent_id"] for o in canary["in_progress"]] == ["vm-c"]
    assert json_of(site.call("GET", "/v1/releases", VIEWER))["canary"]["verdict"] == "hold"  # min_agents 20
    assert body["session"] == {"who": "viewer", "scopes": ["read"], "can_sign": True}
    assert body["audit"][0]["who"] == "ops"
    assert site.call("GET", "/v1/releases?max_failure_rate=2", VIEWER).status_code == 400


def test_unknown_routes_and_methods(site: Site) -> None:
    assert site.call("DELETE", "/v1/fleet", OPS).status_code == 405
    wrong = site.call("GET", "/v1/halt", OPS)
    assert wrong.status_code == 405 and wrong.headers["Allow"] == "POST"
    assert site.call("POST", "/v1/fleet", OPS).status_code == 405
    assert site.call("GET", "/v1/agents/", OPS).status_code == 404  # not a console route: a file path
    assert site.call("GET", "/v1/reports").status_code == 405  # the reports endpoint, untouched


def test_oversized_and_unframed_bodies_are_refused_before_reading(site: Site) -> None:
    big = site.call("POST", "/v1/rollout", OPS, body=b"x" * 5000, headers={"If-Match": '"1"'})
    assert big.status_code == 413
    assert (site.live().serial, site.live().rollout.percent) == (1, 25)


# ---------------------------------------------------------------- starting


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (None, "AVIKA_CONSOLE_TOKENS"),
        ("", "AVIKA_CONSOLE_TOKENS"),
        ("ops:admin:0123456789abcdef0123", "scope must be read or operate"),
        ("ops:read:short", "at least 16"),
        ("ops:read", "name:scope:secret"),
        ("ops:read:0123456789abcdef0123,ops:operate:fedcba9876543210fedc", "twice"),
        ("bad name:read:0123456789abcdef0123", "name must be"),
    ],
)
def test_serve_console_refuses_to_start_without_good_tokens(
    tmp_path: Path, tokens: str | None, message: str
) -> None:
    root = tmp_path / "updates"
    root.mkdir()
    env = {"AVIKA_FLEET_SECRET": FLEET_SECRET, "AVIKA_CONSOLE_TOKENS": tokens}
    done = cli(
        "serve",
        "--root",
        str(root),
        "--port",
        "0",
        "--reports",
        f"sqlite:///{tmp_path}/r.db",
        "--console",
        env=env,
    )
    assert done.exit_code == 2, done.stdout
    assert message in done.stderr
    assert "0123456789abcdef" not in done.stderr  # a secret is never echoed


def test_serve_console_needs_a_reports_store(tmp_path: Path) -> None:
    root = tmp_path / "updates"
    root.mkdir()
    env = {"AVIKA_CONSOLE_TOKENS": f"ops:operate:{OPERATE_SECRET}"}
    done = cli("serve", "--root", str(root), "--port", "0", "--console", env=env)
    assert done.exit_code == 2 and "--reports" in done.stderr


def test_the_canary_takes_the_release_plans_thresholds(site: Site) -> None:
    sign_plan(site, (10, 25, 50, 100), 25, min_agents=2)
    body = json_of(site.call("GET", "/v1/releases", VIEWER))
    assert body["live"]["rollout_plan"] == {
        "steps": [10, 25, 50, 100],
        "soak": "2h",
        "max_failure_rate": "0.25",
        "min_agents": 2,
    }
    assert body["live"]["signed_at"].endswith("Z")
    canary = body["canary"]
    assert (canary["min_agents"], canary["max_failure_rate"]) == (2, 0.25)
    assert canary["verdict"] == "fail"  # 1 of 2 ended rolled back: 50 % > 25 %
    assert json_of(site.call("GET", "/v1/releases?min_agents=5", VIEWER))["canary"]["verdict"] == "hold"


def test_a_publish_caught_between_its_archive_and_its_swap_is_412(site: Site) -> None:
    """Another publish has archived serial 2 but not yet swapped manifest.json: the store moved past
    what the operator saw, so the action is refused with 412 and the store's own words."""
    from dataclasses import replace

    from agent.manifest import sign_envelope
    from publisher.signing import load_key_file

    live = site.live()
    newer = replace(live, serial=2, rollout=replace(live.rollout, percent=60), raw=b"")
    (site.root / "manifests" / "2.json").write_bytes(
        sign_envelope(newer.to_payload(), [load_key_file(site.key.path)])
    )
    before = snapshot(site.root)
    answer = site.call("POST", "/v1/halt", OPS, headers={"If-Match": '"1"'})
    assert answer.status_code == 412, answer.text
    problem = json_of(answer)
    assert problem["live_serial"] == 2 and "manifests/2.json" in problem["message"]
    assert snapshot(site.root) == before
