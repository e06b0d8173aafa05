"""Pure parts of the reports endpoint: vocabulary, tokens, secrets, ordering (DESIGN §5)."""

from __future__ import annotations

import pytest
from reports_fixtures import NOW, make_event, stream_at

from infra.reports.auth import ConfigError, bearer_token, make_token, parse_secrets, token_matches
from infra.reports.store import Position, pinned, plan_batch, stream_key, supersedes
from infra.reports.validation import (
    AGENT_ID_RE,
    LIFECYCLE_STATES,
    STATES,
    ValidationError,
    parse_batch,
    parse_rfc3339,
    valid_agent_id,
    validate_event,
)


@pytest.mark.parametrize(
    "agent_id",
    ["a", "host-01.example.com", "i-0abc:eu-west-1", "svc@node/3", "b64+key=", "A" * 128, "../x"],
)
def test_valid_agent_ids(agent_id: str) -> None:
    assert valid_agent_id(agent_id)
    assert AGENT_ID_RE.fullmatch(agent_id)


@pytest.mark.parametrize(
    "agent_id",
    [
        "",
        "A" * 129,
        "has space",
        "new\nline",
        "trailing\n",
        "nul\x00",
        "agént",
        "\uff41",
        "semi;colon",
        "a'b",
        7,
        None,
    ],
)
def test_invalid_agent_ids(agent_id: object) -> None:
    assert not valid_agent_id(agent_id)


def test_states_are_the_design_states_in_order() -> None:
    # DESIGN section 4's happy path, its two endings, then section 5's liveness event.
    assert STATES == (
        "checking",
        "update_available",
        "downloading",
        "verifying",
        "staged",
        "restarting",
        "watching",
        "committed",
        "rolled_back",
        "failed",
        "heartbeat",
    )
    # Only an install attempt's states are lifecycle states (they move the VERSION# outcome item);
    # a heartbeat is liveness, not history.
    assert set(STATES) - LIFECYCLE_STATES == {"checking", "update_available", "heartbeat"}
    assert {"committed", "rolled_back", "failed"} <= LIFECYCLE_STATES


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("2026-02-15T20:00:00Z", True),
        ("2026-02-15t20:00:00z", True),
        ("2026-02-15T20:00:00.123456789+05:30", True),
        ("2026-02-15T20:00:00-00:00", True),
        ("2026-02-15T20:00:00", False),
        ("2026-02-15 20:00:00Z", False),
        ("2026-02-15T20:00Z", False),
        ("2026-13-01T00:00:00Z", False),
        ("2026-02-15T24:00:00Z", False),
        ("2026-02-15T20:00:00+24:00", False),
        ("\uff12\uff10\uff12\uff16-02-15T20:00:00Z", False),  # full-width digits
    ],
)
def test_rfc3339(text: str, ok: bool) -> None:
    assert (parse_rfc3339(text) is not None) is ok


def test_validate_event_normalises_and_drops_unknown_fields() -> None:
    event = make_event(
        event_id="0F0E0D0C-0B0A-4908-8706-050403020100", stream="A" * 29, extra=1, failed_state=None
    )
    out = validate_event(event, 0)
    assert out["event_id"] == "0f0e0d0c-0b0a-4908-8706-050403020100"
    assert out["stream"] == "a" * 29
    assert "extra" not in out and "failed_state" not in out


def test_nullable_fields_keep_null() -> None:
    out = validate_event(make_event(target_version=None, manifest_serial=None), 0)
    assert out["target_version"] is None and out["manifest_serial"] is None


def test_parse_batch_rejects_duplicate_keys() -> None:
    with pytest.raises(ValidationError, match="duplicate key"):
        parse_batch(b'{"events": [{"agent_id": "a", "agent_id": "b"}]}')


# --- tokens and secrets -------------------------------------------------------------------------


def test_token_known_answer() -> None:
    # `echo -n agent-1 | openssl dgst -sha256 -hmac 0123456789abcdef`
    assert make_token("0123456789abcdef", "agent-1") == (
        "b2b6fd11085a283626d66159b6ab79fabef5f4855a2480e7f105b857fcf122c7"
    )
    assert make_token(b"0123456789abcdef", "agent-1") == make_token("0123456789abcdef", "agent-1")


def test_token_matches_current_or_previous_only() -> None:
    current, previous = parse_secrets("c" * 16 + ",p" + "p" * 15)
    token = make_token(previous, "a")
    assert token_matches(token, "a", [current, previous])
    assert not token_matches(token, "a", [current])
    assert not token_matches(token, "b", [current, previous])


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer " + "A" * 64, "a" * 64),
        ("bearer  " + "0" * 64 + " ", "0" * 64),
        (None, None),
        ("Bearer", None),
        ("Bearer " + "0" * 63, None),
        ("Bearer " + "0" * 65, None),
        ("Token " + "0" * 64, None),
        ("Bearer " + "0" * 64 + ",x", None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_parse_secrets() -> None:
    assert parse_secrets(" current-secret-0001 \n") == [b"current-secret-0001"]
    assert parse_secrets("current-secret-0001,previous-secret-01") == [
        b"current-secret-0001",
        b"previous-secret-01",
    ]


@pytest.mark.parametrize(
    "value", [None, "", "  ", "short", "current-secret-0001,", "a" * 16 + "," + "b" * 16 + ",c" * 9]
)
def test_parse_secrets_refuses_weak_or_malformed(value: str | None) -> None:
    with pytest.raises(ConfigError):
        parse_secrets(value)


# --- ordering -----------------------------------------------------------------------------------


def test_stream_key_replaces_only_times_more_than_five_minutes_ahead() -> None:
    exactly = stream_at(NOW + 300)
    assert stream_key(exactly, NOW) == exactly
    ahead = stream_at(NOW + 301, "ABCDEF0123456789")
    assert stream_key(ahead, NOW) == stream_at(NOW, "abcdef0123456789")


@pytest.mark.parametrize(
    ("new", "old", "wins"),
    [
        (("s1", "s1", 2), None, True),
        (("s1", "s1", 2), ("s1", "s1", 1), True),
        (("s1", "s1", 1), ("s1", "s1", 1), False),  # replay: no change
        (("s1", "s1", 1), ("s1", "s1", 2), False),
        # Same stream compares seq only, even if its (receive-time) key differs.
        (("s9", "s3", 1), ("s9", "s5", 2), False),
        (("s2", "s2", 1), ("s1", "s1", 99), True),
        (("s1", "s1", 100), ("s2", "s2", 1), False),
    ],
)
def test_supersedes(new: tuple, old: tuple | None, wins: bool) -> None:
    assert supersedes(Position(*new), Position(*old) if old else None) is wins


def test_pinned_keeps_the_stored_streams_key() -> None:
    stored = Position("f" * 29, "a" * 29, 1)
    assert pinned(Position("f" * 29, "b" * 29, 2), stored) == Position("f" * 29, "a" * 29, 2)
    assert pinned(Position("e" * 29, "e" * 29, 1), stored) == Position("e" * 29, "e" * 29, 1)


def test_plan_batch_picks_newest_per_agent_and_lifecycle_per_version() -> None:
    events = [
        validate_event(make_event(seq=2, state="downloading"), 0),
        validate_event(make_event(seq=3, state="checking"), 1),
        validate_event(make_event(seq=1, state="checking", target_version=None), 2),
    ]
    plan = plan_batch(events, NOW, ttl_seconds=60)
    [(agent, latest)] = plan.latest.items()
    assert latest.record["seq"] == 3
    assert [(k, c.record["seq"]) for k, c in plan.outcomes.items()] == [(("0.1.44", agent), 2)]
    assert plan.expires_at == int(NOW) + 60
