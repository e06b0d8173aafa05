"""The reports endpoint through the real Lambda handler, over both real stores (DESIGN §5).

Every test in this module runs twice via the `backend` fixture: SQLite in tmp_path and DynamoDB
under moto. Outcomes are read back from the store, and refusals assert the store did not change.
"""

from __future__ import annotations

import json

import pytest
import reports_fixtures
from reports_fixtures import (
    AGENT,
    NOW,
    PREVIOUS,
    SECRET,
    Backend,
    api_event,
    bearer,
    make_event,
    stream_at,
)

from infra.reports.auth import make_token

DAY = 86400

# Fixtures shared through the helper module (tests/ has no conftest of ours).
aws = reports_fixtures.aws
backend = reports_fixtures.backend
clean_config = reports_fixtures.clean_config


def test_valid_batch_is_accepted_and_stored(backend: Backend) -> None:
    events = [make_event(seq=1, state="checking"), make_event(seq=2, state="update_available")]
    events.append(
        make_event(seq=3, state="downloading", in_wave=True, image="x/agent:0.1.44", extra="dropped")
    )

    status, body = backend.post(events)

    assert (status, body) == (202, {"accepted": 3, "duplicates": 0})
    state = backend.store.agent(AGENT)
    assert state is not None
    assert (state["state"], state["seq"], state["in_wave"], state["image"]) == (
        "downloading",
        3,
        True,
        "x/agent:0.1.44",
    )
    assert "extra" not in state  # unknown fields are dropped
    assert state["last_seen"] == "2026-02-15T20:00:00.000Z"
    stored = {e["event_id"]: e for e in backend.store.agent_events(AGENT)}
    assert set(stored) == {e["event_id"] for e in events}
    assert [a["agent_id"] for a in backend.store.agents()] == [AGENT]


def test_replayed_event_ids_are_counted_as_duplicates(backend: Backend) -> None:
    first, second = make_event(seq=1), make_event(seq=2)
    assert backend.post([first]) == (202, {"accepted": 1, "duplicates": 0})

    # A retry after a lost 202 resends the same events; one event is even repeated inside the batch.
    assert backend.post([first, second, second]) == (202, {"accepted": 1, "duplicates": 2})
    assert backend.post([first, second]) == (202, {"accepted": 0, "duplicates": 2})

    assert len(backend.store.agent_events(AGENT)) == 2
    assert backend.store.agent(AGENT)["seq"] == 2


def test_upper_case_event_id_is_the_same_event(backend: Backend) -> None:
    event = make_event()
    backend.post([event])
    assert backend.post([{**event, "event_id": event["event_id"].upper()}]) == (
        202,
        {"accepted": 0, "duplicates": 1},
    )


def test_older_event_arriving_late_does_not_move_state_back(backend: Backend) -> None:
    newer = make_event(seq=7, state="committed", version="0.1.44")
    older = make_event(seq=6, state="watching", version="0.1.44")
    backend.post([newer])
    backend.clock.now += 60

    assert backend.post([older]) == (202, {"accepted": 1, "duplicates": 0})

    state = backend.store.agent(AGENT)
    assert (state["state"], state["seq"], state["event_id"]) == ("committed", 7, newer["event_id"])
    assert state["last_seen"] == "2026-02-15T20:01:00.000Z"  # the late report still shows it alive
    [outcome] = backend.store.version_outcomes("0.1.44")
    assert outcome["state"] == "committed"


def test_order_inside_one_batch_does_not_matter(backend: Backend) -> None:
    events = [make_event(seq=3, state="staged"), make_event(seq=1, state="checking"), make_event(seq=2)]
    backend.post(events)
    assert backend.store.agent(AGENT)["state"] == "staged"


def test_newer_stream_wins_whatever_its_seq(backend: Backend) -> None:
    backend.post([make_event(stream=stream_at(NOW - 7200), seq=500, state="failed", error="x")])
    new_stream = stream_at(NOW - 60, "fedcba9876543210")
    backend.post([make_event(stream=new_stream.upper(), seq=1, state="checking")])
    backend.post([make_event(stream=stream_at(NOW - 7200), seq=501, state="committed")])

    state = backend.store.agent(AGENT)
    assert (state["stream"], state["seq"], state["state"]) == (new_stream, 1, "checking")
    assert state.get("error") is None  # fields of the replaced event do not linger


def test_stream_from_the_future_counts_as_made_at_receive_time(backend: Backend) -> None:
    # An agent whose clock ran a year ahead made this stream; the server sees it at NOW.
    future = stream_at(NOW + 365 * DAY, "1111111111111111")
    backend.post([make_event(stream=future, seq=1, state="checking")])
    backend.clock.now += 30
    backend.post([make_event(stream=future, seq=2, state="downloading")])
    backend.post([make_event(stream=future, seq=1, state="checking")])  # late retry of seq 1
    assert backend.store.agent(AGENT)["seq"] == 2

    # The clock is fixed and the queue recreated: its stream, made after NOW, must win.
    backend.clock.now += 120
    fixed = stream_at(NOW + 60, "2222222222222222")
    backend.post([make_event(stream=fixed, seq=1, state="committed")])

    state = backend.store.agent(AGENT)
    assert (state["stream"], state["state"]) == (fixed, "committed")


def test_stream_less_than_five_minutes_ahead_is_taken_at_face_value(backend: Backend) -> None:
    ahead = stream_at(NOW + 240, "3333333333333333")  # 4 min: ordinary clock skew
    backend.post([make_event(stream=ahead, seq=1, state="checking")])
    backend.clock.now += 60
    backend.post([make_event(stream=stream_at(NOW + 30, "4444444444444444"), seq=9, state="failed")])

    assert backend.store.agent(AGENT)["stream"] == ahead


def test_version_outcome_only_for_lifecycle_states(backend: Backend) -> None:
    backend.post([make_event(seq=1, state="checking"), make_event(seq=2, state="update_available")])
    assert backend.store.version_outcomes("0.1.44") == []

    backend.post([make_event(seq=3, state="downloading")])
    backend.post([make_event(seq=4, state="checking", target_version=None)])

    [outcome] = backend.store.version_outcomes("0.1.44")
    assert (outcome["agent_id"], outcome["state"], outcome["seq"]) == (AGENT, "downloading", 3)
    assert backend.store.agent(AGENT)["state"] == "checking"  # STATE still follows every event


def test_version_outcomes_are_per_agent_and_keyed_as_sent(backend: Backend) -> None:
    backend.post([make_event(seq=1, state="committed", target_version="v0.1.44")])
    other = "host-02"
    backend.post(
        [
            make_event(
                agent_id=other, seq=1, state="rolled_back", failed_state="watching", error="too_many_boots"
            )
        ],
        agent_id=other,
    )
    backend.post(
        [
            make_event(
                agent_id=other, seq=2, state="failed", failed_state="verifying", target_version="0.1.45"
            )
        ],
        agent_id=other,
    )

    assert [o["state"] for o in backend.store.version_outcomes("v0.1.44")] == ["committed"]
    [rolled] = backend.store.version_outcomes("0.1.44")
    assert (rolled["agent_id"], rolled["state"], rolled["failed_state"]) == (other, "rolled_back", "watching")
    assert [o["state"] for o in backend.store.version_outcomes("0.1.45")] == ["failed"]


def test_ttl_counts_from_receive_time_not_event_time(backend: Backend) -> None:
    event = make_event(time="2020-01-01T00:00:00Z")
    backend.post([event])
    [stored] = backend.store.agent_events(AGENT)
    assert stored["expires_at"] == int(NOW) + 30 * DAY
    assert stored["received_at"] == "2026-02-15T20:00:00.000Z"
    assert stored["time"] == "2020-01-01T00:00:00Z"


def test_fleet_view_lists_every_agent(backend: Backend) -> None:
    ids = [f"agent-{i:03d}" for i in range(24)]
    for agent_id in ids:
        assert backend.post([make_event(agent_id=agent_id, state="committed")], agent_id=agent_id)[0] == 202
    assert sorted(a["agent_id"] for a in backend.store.agents()) == ids


# --- refusals -----------------------------------------------------------------------------------


def _assert_nothing_stored(backend: Backend) -> None:
    assert list(backend.store.agents()) == []
    assert backend.store.agent_events(AGENT) == []


INVALID_FIELDS = [
    ("missing event_id", {"event_id": ...}, "events[0].event_id"),
    ("bad uuid", {"event_id": "not-a-uuid"}, "events[0].event_id"),
    ("uuid without dashes", {"event_id": "12345678123412341234123456789abc"}, "events[0].event_id"),
    ("missing stream", {"stream": ...}, "events[0].stream"),
    ("short stream", {"stream": "abc"}, "events[0].stream"),
    ("non-hex stream", {"stream": "z" * 29}, "events[0].stream"),
    ("missing seq", {"seq": ...}, "events[0].seq"),
    ("seq as string", {"seq": "1"}, "events[0].seq"),
    ("seq as bool", {"seq": True}, "events[0].seq"),
    ("seq as float", {"seq": 1.0}, "events[0].seq"),
    ("seq zero", {"seq": 0}, "events[0].seq"),
    ("seq beyond int64", {"seq": 2**63}, "events[0].seq"),
    ("missing time", {"time": ...}, "events[0].time"),
    ("time without zone", {"time": "2026-02-15T20:00:00"}, "events[0].time"),
    ("time not a date", {"time": "2026-02-30T20:00:00Z"}, "events[0].time"),
    ("time as number", {"time": 1771185600}, "events[0].time"),
    ("unknown state", {"state": "exploded"}, "events[0].state"),
    ("null state", {"state": None}, "events[0].state"),
    ("empty version", {"version": ""}, "events[0].version"),
    ("long version", {"version": "1" * 65}, "events[0].version"),
    ("bad mode", {"mode": "bare-metal"}, "events[0].mode"),
    ("missing platform", {"platform": ...}, "events[0].platform"),
    ("long platform", {"platform": "p" * 33}, "events[0].platform"),
    ("missing target_version", {"target_version": ...}, "events[0].target_version"),
    ("missing manifest_serial", {"manifest_serial": ...}, "events[0].manifest_serial"),
    ("serial as bool", {"manifest_serial": False}, "events[0].manifest_serial"),
    ("bad failed_state", {"failed_state": "nope"}, "events[0].failed_state"),
    ("control char in error", {"error": "boom\nsecond line"}, "events[0].error"),
    ("NUL in error", {"error": "a\u0000b"}, "events[0].error"),
    ("error too long", {"error": "e" * 513}, "events[0].error"),
    ("lone surrogate in error", {"error": "\ud800"}, "events[0].error"),
    ("C1 control in version", {"version": "0.1\x85"}, "events[0].version"),
    ("long image", {"image": "i" * 257}, "events[0].image"),
    ("in_wave as int", {"in_wave": 1}, "events[0].in_wave"),
    ("negative dropped", {"dropped": -1}, "events[0].dropped"),
]


@pytest.mark.parametrize(
    ("overrides", "field"), [c[1:] for c in INVALID_FIELDS], ids=[c[0] for c in INVALID_FIELDS]
)
def test_invalid_field_is_refused_with_its_name(backend: Backend, overrides: dict, field: str) -> None:
    status, body = backend.post([make_event(**overrides)])
    assert status == 400
    assert body["reason"].startswith(field + ":")
    _assert_nothing_stored(backend)


def test_reason_names_the_event_index_and_nothing_of_the_batch_is_stored(backend: Backend) -> None:
    status, body = backend.post([make_event(seq=1), make_event(seq=2), make_event(seq=3, error="x" * 600)])
    assert (status, body["reason"].split(":")[0]) == (400, "events[2].error")
    _assert_nothing_stored(backend)


def test_limits_are_inclusive(backend: Backend) -> None:
    event = make_event(error="e" * 512, version="v" * 64, platform="p" * 32, image="i" * 256, dropped=0)
    assert backend.post([event])[0] == 202


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"events": []}, "events: must hold 1 to 100"),
        ({"events": [make_event(seq=i + 1) for i in range(101)]}, "events: must hold 1 to 100"),
        ({"event": [make_event()]}, "events: must be a list"),
        ({"events": make_event()}, "events: must be a list"),
        ({"events": ["not an object"]}, "events[0]: must be an object"),
        ('[{"events": []}]', "body must be a JSON object"),
        ("{not json", "body is not valid JSON"),
        ('{"events": [{"seq": NaN}]}', "body is not valid JSON"),
        ('{"events": [], "events": []}', "body is not valid JSON"),
        ("[" * 100_000, "body is not valid JSON"),
        ("", "body is not valid JSON"),
    ],
    ids=["empty", "101 events", "no events key", "events not a list", "event not an object", "array",
         "invalid json", "NaN", "duplicate keys", "deep nesting", "empty body"],
)  # fmt: skip
def test_malformed_batch_is_400(backend: Backend, body: object, reason: str) -> None:
    status, answer, _ = backend.invoke(api_event(body, headers=bearer()))
    assert (status, answer["error"]) == (400, "bad_request")
    assert answer["reason"].startswith(reason)
    _assert_nothing_stored(backend)


def test_hundred_events_is_the_maximum_accepted(backend: Backend) -> None:
    assert backend.post([make_event(seq=i + 1) for i in range(100)]) == (
        202,
        {"accepted": 100, "duplicates": 0},
    )


def test_non_utf8_body_is_400(backend: Backend) -> None:
    status, answer, _ = backend.invoke(api_event(b'{"events": ["\xff\xfe"]}', headers=bearer()))
    assert (status, answer["reason"]) == (400, "body is not UTF-8")


def test_undecodable_base64_is_400(backend: Backend) -> None:
    event = api_event("x", headers=bearer())
    event.update(body="%%% not base64", isBase64Encoded=True)
    assert backend.invoke(event)[0] == 400


def test_base64_encoded_json_is_decoded(backend: Backend) -> None:
    event = api_event(json.dumps({"events": [make_event()]}), headers=bearer(), base64_encoded=True)
    assert backend.invoke(event)[0] == 202


def test_body_over_256_kib_is_413_before_anything_else(backend: Backend) -> None:
    status, answer, _ = backend.invoke(api_event(b"x" * (1024 * 1024)))  # no token either
    assert (status, answer["error"]) == (413, "too_large")
    padded = json.dumps({"events": [make_event()], "pad": "p" * (256 * 1024)})
    assert backend.invoke(api_event(padded, headers=bearer()))[0] == 413
    _assert_nothing_stored(backend)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS", "HEAD"])
def test_only_post_is_allowed(backend: Backend, method: str) -> None:
    status, answer, headers = backend.invoke(api_event(None, method=method, headers=bearer()))
    assert (status, answer["error"], headers["Allow"]) == (405, "method_not_allowed", "POST")


AUTH_FAILURES = [
    ("missing", {}),
    ("basic scheme", {"authorization": "Basic dXNlcjpwYXNz"}),
    ("bearer without token", {"authorization": "Bearer "}),
    ("short token", {"authorization": "Bearer abc123"}),
    ("non-hex token", {"authorization": "Bearer " + "g" * 64}),
    ("wrong secret", {"authorization": f"Bearer {make_token('some-other-secret-123456', AGENT)}"}),
    ("another agent's token", {"authorization": f"Bearer {make_token(SECRET, 'host-02')}"}),
]


@pytest.mark.parametrize("headers", [c[1] for c in AUTH_FAILURES], ids=[c[0] for c in AUTH_FAILURES])
def test_bad_credentials_are_401(backend: Backend, headers: dict[str, str]) -> None:
    status, answer, answer_headers = backend.invoke(api_event({"events": [make_event()]}, headers=headers))
    assert (status, answer["error"], answer_headers["WWW-Authenticate"]) == (401, "unauthorized", "Bearer")
    _assert_nothing_stored(backend)


def test_token_must_match_every_event_in_the_batch(backend: Backend) -> None:
    events = [make_event(), make_event(agent_id="host-02")]
    status, answer = backend.post(events)
    assert (status, answer["reason"]) == (401, "token does not match events[1].agent_id")
    _assert_nothing_stored(backend)


def test_auth_is_checked_before_other_fields(backend: Backend) -> None:
    # An unauthenticated caller must not be able to probe field validation.
    status, _ = backend.post([make_event(seq="bad")], secret="not-the-fleet-secret-xyz")
    assert status == 401


def test_token_of_the_previous_secret_is_accepted(backend: Backend) -> None:
    assert backend.post([make_event()], secret=PREVIOUS)[0] == 202
    assert backend.store.agent(AGENT) is not None


def test_scheme_and_hex_case_are_not_significant(backend: Backend) -> None:
    token = make_token(SECRET, AGENT).upper()
    status, _, _ = backend.invoke(
        api_event({"events": [make_event()]}, headers={"Authorization": f"bearer {token}"})
    )
    assert status == 202


HOSTILE_AGENT_IDS = [
    "'; DROP TABLE agent_state; --",
    "x\u0000y",
    "agent\n",
    "agént",
    "\uff41\uff47\uff45\uff4e\uff54",  # full-width look-alikes
    "a" * 129,
    "",
    "AGENT#x STATE",
]


@pytest.mark.parametrize("agent_id", HOSTILE_AGENT_IDS, ids=range(len(HOSTILE_AGENT_IDS)))
def test_hostile_agent_id_is_400_and_store_intact(backend: Backend, agent_id: str) -> None:
    backend.post([make_event(state="committed")])
    before = list(backend.store.agents())

    status, answer, _ = backend.invoke(
        api_event(
            {"events": [make_event(agent_id=agent_id)]}, headers={"authorization": f"Bearer {'0' * 64}"}
        )
    )

    assert (status, answer["reason"].split(":")[0]) == (400, "events[0].agent_id")
    assert list(backend.store.agents()) == before


def test_path_like_agent_id_is_only_data(backend: Backend) -> None:
    # `.` and `/` are allowed agent_id characters (DESIGN §5); they must never act as paths or keys.
    odd = "../../etc/passwd"
    backend.post([make_event(state="committed")])
    assert backend.post([make_event(agent_id=odd, state="failed")], agent_id=odd)[0] == 202
    assert backend.store.agent(odd)["state"] == "failed"
    assert backend.store.agent(AGENT)["state"] == "committed"
