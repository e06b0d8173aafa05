"""Report event validation (DESIGN §5): strict JSON in, normalised event dicts out.

This module is the one definition of the report vocabulary: the agent's config and the publisher's
`enroll` import `AGENT_ID_RE` / `valid_agent_id`, and the agent imports `STATES`. It is pure (no I/O)
and imports only the standard library, so the agent (no boto3) and the Lambda (cold start) can both
afford it.

Rules, in the order the endpoint applies them (see `core.py`): the body is strict UTF-8 JSON (no
duplicate keys, no NaN/Infinity) holding an object with 1-100 `events`, each an object whose
`agent_id` is valid (`parse_batch`); after the token check, every other field (`validate_event`).
Unknown fields are dropped; `event_id` and `stream` are lower-cased, so replays and stream ordering
do not depend on the agent's hex case.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

MAX_BODY_BYTES = 256 * 1024  # one POST /v1/reports body (agents split larger batches)
MAX_EVENTS = 100
MAX_INT = 2**63 - 1  # SQLite INTEGER and a Go int64 both stop here

# DESIGN §4 lifecycle plus the two pre-update states; the order is the happy path.
STATES: tuple[str, ...] = (
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
# States that belong to an install attempt, so they update the VERSION# outcome item.
LIFECYCLE_STATES: frozenset[str] = frozenset(STATES) - {"checking", "update_available", "heartbeat"}
# Liveness, not history (DESIGN section 5): it moves `last_seen`, never the lifecycle state.
HEARTBEAT = "heartbeat"
MODES: tuple[str, ...] = ("vm", "container")

# `\Z`-anchored via fullmatch; the class is ASCII-only, so no Unicode look-alikes get through.
AGENT_ID_RE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# 13 hex digits of ms since the epoch, then 16 random hex digits.
STREAM_RE = re.compile(r"[0-9a-fA-F]{29}")
STREAM_TIME_DIGITS = 13
RFC3339_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
SURROGATE_RE = re.compile(r"[\ud800-\udfff]")


class ValidationError(ValueError):
    """A request the endpoint answers with 400; `reason` names the field (and event index)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def valid_agent_id(value: object) -> bool:
    """True for 1-128 characters of `A-Z a-z 0-9 . _ : @ / + = -` (DESIGN §5)."""
    return isinstance(value, str) and AGENT_ID_RE.fullmatch(value) is not None


def stream_time_ms(stream: str) -> int:
    """The creation time (ms since the epoch) embedded in a valid stream id."""
    return int(stream[:STREAM_TIME_DIGITS], 16)


def parse_rfc3339(value: str) -> datetime | None:
    """Parse RFC 3339 with a mandatory offset; None when invalid (fractions beyond µs are cut)."""
    m = RFC3339_RE.fullmatch(value)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    micros = int((m.group(7) or ".0")[1:7].ljust(6, "0"))
    zone = m.group(8)
    try:
        if zone in ("Z", "z"):
            tz = timezone.utc
        else:
            sign = -1 if zone[0] == "-" else 1
            offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
            if offset >= timedelta(hours=24):
                return None
            tz = timezone(sign * offset)
        return datetime(year, month, day, hour, minute, second, micros, tzinfo=tz)
    except ValueError:
        return None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def loads_strict(body: bytes) -> Any:
    """Decode UTF-8 JSON, refusing duplicate keys and NaN/Infinity (a smuggling and parity risk)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError("body is not UTF-8") from exc
    try:
        return json.loads(text, object_pairs_hook=_unique_object, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested arrays
        raise ValidationError(f"body is not valid JSON: {str(exc)[:200]}") from exc


def parse_batch(body: bytes) -> list[dict[str, Any]]:
    """Shape checks that come before the token check: JSON object, 1-100 events, valid agent_ids."""
    doc = loads_strict(body)
    if not isinstance(doc, dict):
        raise ValidationError("body must be a JSON object")
    events = doc.get("events")
    if not isinstance(events, list):
        raise ValidationError("events: must be a list")
    if not 1 <= len(events) <= MAX_EVENTS:
        raise ValidationError(f"events: must hold 1 to {MAX_EVENTS} events, got {len(events)}")
    for i, event in enumerate(events):
        if not isinstance(event, dict):
            raise ValidationError(f"events[{i}]: must be an object")
        if not valid_agent_id(event.get("agent_id")):
            raise ValidationError(
                f"events[{i}].agent_id: must be 1-128 characters of A-Z a-z 0-9 . _ : @ / + = -"
            )
    return events


# --- field checks: each returns the normalised value or raises _FieldError(message) ---


class _FieldError(Exception):
    pass


def _text(value: Any, *, min_len: int, max_len: int) -> str:
    if not isinstance(value, str):
        raise _FieldError("must be a string")
    if not min_len <= len(value) <= max_len:
        raise _FieldError(f"must be {min_len}-{max_len} characters")
    if CONTROL_RE.search(value):
        raise _FieldError("must not contain control characters")
    if SURROGATE_RE.search(value):  # JSON "\ud800" decodes to text no store can encode as UTF-8
        raise _FieldError("must not contain lone surrogates")
    return value


def _integer(value: Any, *, minimum: int) -> int:
    # bool is an int subclass in Python; JSON true is not a number.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _FieldError("must be an integer")
    if not minimum <= value <= MAX_INT:
        raise _FieldError(f"must be an integer from {minimum} to {MAX_INT}")
    return value


def _event_id(value: Any) -> str:
    if not isinstance(value, str) or UUID_RE.fullmatch(value) is None:
        raise _FieldError("must be a UUID (8-4-4-4-12 hex digits)")
    return value.lower()


def _stream(value: Any) -> str:
    if not isinstance(value, str) or STREAM_RE.fullmatch(value) is None:
        raise _FieldError("must be 29 hex digits (13 of creation ms, 16 random)")
    return value.lower()


def _time(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 40 or parse_rfc3339(value) is None:
        raise _FieldError("must be an RFC 3339 date-time with a time zone")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise _FieldError("must be one of " + ", ".join(options))
        return value

    return check


def _agent_id(value: Any) -> str:
    # parse_batch checked it already; checked again so validate_event stands alone.
    if not valid_agent_id(value):
        raise _FieldError("must be 1-128 characters of A-Z a-z 0-9 . _ : @ / + = -")
    return value


def _version(value: Any) -> str:
    return _text(value, min_len=1, max_len=64)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _FieldError("must be true or false")
    return value


REQUIRED = {
    "event_id": _event_id,
    "agent_id": _agent_id,
    "stream": _stream,
    "seq": lambda v: _integer(v, minimum=1),
    "time": _time,
    "state": _choice(STATES),
    "version": _version,
    "mode": _choice(MODES),
    "platform": lambda v: _text(v, min_len=0, max_len=32),
}
# Must be present; null is a meaningful value ("no target", "no manifest yet").
NULLABLE = {
    "target_version": _version,
    "manifest_serial": lambda v: _integer(v, minimum=0),
}
# May be absent; null means absent.
OPTIONAL = {
    "failed_state": _choice(tuple(s for s in STATES if s != HEARTBEAT)),
    "error": lambda v: _text(v, min_len=0, max_len=512),
    "image": lambda v: _text(v, min_len=0, max_len=256),
    "in_wave": _bool,
    "dropped": lambda v: _integer(v, minimum=0),
    "last_result": lambda v: _text(v, min_len=0, max_len=64),
    "uptime_s": lambda v: _integer(v, minimum=0),
}
# Every field a stored event can carry, in a stable order.
EVENT_FIELDS: tuple[str, ...] = (*REQUIRED, *NULLABLE, *OPTIONAL)


def validate_event(event: dict[str, Any], index: int) -> dict[str, Any]:
    """Check every field of one event and return it normalised, unknown fields dropped."""
    out: dict[str, Any] = {}
    for name, check in (*REQUIRED.items(), *NULLABLE.items(), *OPTIONAL.items()):
        where = f"events[{index}].{name}"
        if name not in event:
            if name in OPTIONAL:
                continue
            raise ValidationError(f"{where}: is required")
        value = event[name]
        if value is None and name not in REQUIRED:
            if name in NULLABLE:
                out[name] = None
            continue
        try:
            out[name] = check(value)
        except _FieldError as exc:
            raise ValidationError(f"{where}: {exc}") from None
    return out


def validate_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate a batch that already passed `parse_batch` and the token check."""
    return [validate_event(event, i) for i, event in enumerate(events)]
