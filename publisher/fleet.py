"""The fleet view, liveness and the canary verdict (DESIGN sections 5, 6, 9): pure rules over store rows.

This module is the one definition of what the CLI (``fleet``, ``canary``) and the operator API
(``/v1/fleet``, ``/v1/agents``, ``/v1/releases``) show. Rows come from
``infra.reports.store.ReportStore``: ``scan()`` (each agent's latest state as the event with the
highest (stream, seq) left it, plus ``last_seen`` and ``last_change``), ``agent_events(ID)`` and
``version_outcomes(VERSION)``. Nothing here reads every event, so ``fleet`` holds at any size the
store's ``scan()`` holds.

Fleet row (``avika-publish fleet --json``, contract): ``agent_id``, ``mode``, ``platform``,
``version`` (what the agent runs, as it last said), ``state`` (its latest reported state),
``target_version``, ``last_seen`` (receive time of its latest event of any kind, heartbeats
included), ``last_change`` (of the event that set ``state``), ``last_result`` (the last check's
reason or error code, from heartbeats), ``in_wave`` and ``image`` (as the agent last reported
them), and three derived fields:

- ``stale``: ``last_seen`` is older than ``--stale-after`` (default 3 h): the agent went silent.
  An agent sends a heartbeat after ``UPDATE_HEARTBEAT_INTERVAL`` (default 1 h) of silence, so 3 h
  is three missed heartbeats. One cutoff string (``stale_cutoff``) serves the rule here and the
  store's own filter (stored times are fixed-width RFC 3339, so they compare as text).
- ``update_available``: the agent was offered a version it does not run and is not installing it
  now, i.e. ``target_version`` is set, differs from ``version`` (compared as versions, so
  ``v0.1.44`` = ``0.1.44``; a downgrade counts), and ``state`` is neither an install step in
  progress (``downloading`` .. ``watching``) nor ``rolled_back`` (that version is recorded as bad
  and never tried again: the row is a failure, not a pending update). This covers a container (or
  ``signal-only``) agent reporting ``update_available`` for a newer image, and a VM whose attempt
  failed (it retries). ``checking`` and check failures carry no target: false.
- ``last_error``: when the latest state is ``failed`` or ``rolled_back``, ``"<failed_state>: <error>"``
  (either part alone when the other is missing, the state name when both are), else null.

``versions``: agents per running version, ordered by version. Filters (``--state``, ``--version``,
``--mode``, ``--stale``, ``update_available``) select rows by the same fields.

Rollout progress (the console's chart), per mode, against the live release: ``on_live`` (runs
its version), ``ahead`` (runs a newer one and the release is no downgrade: it will not move),
``in_wave`` (its wave bucket is below the rollout percent, or it is below ``min_version``: it is
updating, about to, or failed to), ``behind`` (not in the wave yet). A host agent's bucket is
``fnv1a32(salt + agent_id) % 100``; a Kubernetes workload (``k8s/<cluster>/<ns>/<kind>/<name>``)
uses the controller's ``fnv1a32(salt + cluster/ns/name)`` (section 10).

The whole-fleet summary of ``/v1/fleet`` is ``publisher/fleet_summary.py``, over these rules.

Canary (``avika-publish canary VERSION``): over the agents whose latest attempt at VERSION has ended
(``committed``, ``failed``, ``rolled_back``); attempts still in progress are listed apart and not
counted. Failure rate = (failed + rolled_back) / ended. Exit 4 ("hold") when fewer than
``--min-agents`` attempts ended, checked first, so too little data never passes, however bad or good
it looks; else 5 ("fail") when the rate is above ``--max-failure-rate``; else 0 ("pass").
:func:`halt` is what ``--halt`` does after a 5: re-sign the live manifest at rollout 0 (serial + 1),
unless it already is at 0; refused (exit 1) when the live release is another version, so a canary
of an old release never stops a newer one.
"""

from __future__ import annotations

import base64
import binascii
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion

from agent.manifest import Manifest, PublicKey, Signer, fnv1a32, format_time, normalize_version, parse_version
from infra.reports.store import ReportStore, StoreError, Where, rfc3339_ms
from infra.reports.validation import MODES, STATES
from publisher import release as publishing
from publisher import resign as resigning
from publisher.errors import PublishError, Refused
from publisher.stores import Store

IN_PROGRESS = ("downloading", "verifying", "staged", "restarting", "watching")
# States in which the offered version is not pending: being installed now, or rolled back (the agent,
# or the controller, recorded it as bad and never installs it again).
NOT_PENDING = (*IN_PROGRESS, "rolled_back")
ENDED = ("committed", "failed", "rolled_back")
FAILURES = ("failed", "rolled_back")
FLEET_FIELDS = (
    "agent_id",
    "mode",
    "platform",
    "version",
    "state",
    "target_version",
    "last_seen",
    "last_change",
    "stale",
    "last_result",
    "in_wave",
    "image",
    "update_available",
    "last_error",
)
HISTORY_FIELDS = ("time", "received", "state", "version", "target_version", "failed_state", "error")
DEFAULT_STALE_AFTER = timedelta(hours=3)
MAX_HISTORY_EVENTS = 200  # /v1/agents/{id}: the newest are kept
PROGRESS = ("on_live", "in_wave", "behind", "ahead")

# One colour per kind of state, the same in the CLI table and on the page (publisher/console/
# states.js holds the same map; tests/test_console_page.py holds them together).
STATE_TONES = {
    "committed": "ok",
    "failed": "bad",
    "rolled_back": "bad",
    "update_available": "warn",
    **{state: "busy" for state in IN_PROGRESS},
    "checking": "idle",
    "heartbeat": "idle",
}
STALE_TONE = "stale"
ANSI = {"ok": "32", "bad": "31", "warn": "33", "busy": "94", "idle": "2", "stale": "35"}

EXIT_PASS, EXIT_HOLD, EXIT_FAIL = 0, 4, 5
VERDICTS = {EXIT_PASS: "pass", EXIT_HOLD: "hold", EXIT_FAIL: "fail"}
MAX_TEXT_ERROR = 80


# ---------------------------------------------------------------- reading the store


def open_reports(url: str | None) -> ReportStore:
    """The reports store at ``url``; a SQLite file must exist (a typo must not read as an empty fleet)."""
    if not url:
        raise Refused(
            "no reports store: pass --reports sqlite:///PATH or dynamodb://TABLE (or AVIKA_REPORTS)"
        )
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        if not path.is_file():
            raise Refused(f"--reports {url}: no reports database at {path}")
    try:
        return ReportStore.from_url(url)
    except ValueError as exc:
        raise Refused(f"--reports: {exc}") from None
    except StoreError as exc:
        raise PublishError(f"reports store {url}: {exc}") from None


def read_failed(store: ReportStore, exc: StoreError) -> PublishError:
    """A read error that names the store; a missing DynamoDB table is named as such (a typo in
    ``--reports`` / ``AVIKA_REPORTS``, or another region), not as a bare AWS error code."""
    table = getattr(store, "table", None)
    if table is not None and "ResourceNotFoundException" in str(exc):
        return Refused(
            f"reports table {table!r} not found (--reports dynamodb://{table}): check the name "
            "(the stack output ReportsTableName) and the AWS region"
        )
    return PublishError(f"reading the reports store: {exc}")


def read_or_fail(store: ReportStore, what: Callable[[], Any]) -> Any:
    try:
        return what()
    except StoreError as exc:
        raise read_failed(store, exc) from None


def read_agents(store: ReportStore) -> list[dict[str, Any]]:
    """Every agent's scan row (``STATE_ROW_FIELDS``), in the store's order."""
    return read_or_fail(store, lambda: list(store.scan_all()))


def read_outcomes(store: ReportStore, version: str) -> list[dict[str, Any]]:
    return read_or_fail(store, lambda: store.version_outcomes(version))


# ---------------------------------------------------------------- versions


@lru_cache(maxsize=4096)
def canonical_version(text: str) -> str:
    """``v0.1.44`` -> ``0.1.44`` (as the publisher publishes it); text that is no version, as is."""
    try:
        return normalize_version(text)
    except (InvalidVersion, ValueError):
        return text


def same_version(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    return canonical_version(a) == canonical_version(b)


@lru_cache(maxsize=4096)
def version_key(text: str) -> tuple[int, Any]:
    try:
        return (0, parse_version(text))
    except (InvalidVersion, ValueError):
        return (1, text)


def _newer(a: str, b: str) -> bool:
    """``a`` is a higher version than ``b`` (unparsable versions are never newer)."""
    ka, kb = version_key(a), version_key(b)
    return ka[0] == kb[0] == 0 and ka[1] > kb[1]


# ---------------------------------------------------------------- liveness and rows


def epoch_seconds(now: datetime | float) -> float:
    return now.timestamp() if isinstance(now, datetime) else float(now)


def stale_cutoff(now: datetime | float, stale_after: timedelta = DEFAULT_STALE_AFTER) -> str:
    """``last_seen`` below this (as stored: RFC 3339 with ms) is stale."""
    return rfc3339_ms(epoch_seconds(now) - stale_after.total_seconds())


def is_stale(row: dict[str, Any], cutoff: str) -> bool:
    seen = row.get("last_seen")
    return seen is None or seen < cutoff


def update_available(row: dict[str, Any]) -> bool:
    """See the module docstring: offered a version it does not run, and not installing it now."""
    target = row.get("target_version")
    if target is None or row.get("state") in NOT_PENDING:
        return False
    return not same_version(target, row.get("version"))


def last_error(row: dict[str, Any]) -> str | None:
    state = row.get("state")
    if state not in FAILURES:
        return None
    parts = [p for p in (row.get("failed_state"), row.get("error")) if p]
    return ": ".join(parts) if parts else state


def fleet_row(row: dict[str, Any], cutoff: str) -> dict[str, Any]:
    """The contract's row (``FLEET_FIELDS``, in that order) of one agent's latest state."""
    return {
        "agent_id": row.get("agent_id"),
        "mode": row.get("mode"),
        "platform": row.get("platform"),
        "version": row.get("version"),
        "state": row.get("state"),
        "target_version": row.get("target_version"),
        "last_seen": row.get("last_seen"),
        "last_change": row.get("last_change"),
        "stale": is_stale(row, cutoff),
        "last_result": row.get("last_result"),
        "in_wave": row.get("in_wave"),
        "image": row.get("image"),
        "update_available": update_available(row),
        "last_error": last_error(row),
    }


def counts_by_version(agents: Iterable[dict[str, Any]]) -> dict[str, int]:
    counts = Counter(a["version"] for a in agents)
    return {v: counts[v] for v in sorted(counts, key=lambda v: version_key(v or ""))}


# ---------------------------------------------------------------- filters and pages


@dataclass(frozen=True)
class FleetFilter:
    """Which agents to list; None means any. The store applies what it can, every row is checked."""

    state: str | None = None
    version: str | None = None
    mode: str | None = None
    stale: bool | None = None
    update_available: bool | None = None

    def __post_init__(self) -> None:
        if self.state is not None and self.state not in STATES:
            raise Refused(f"state {self.state!r} is not one of {', '.join(STATES)}")
        if self.mode is not None and self.mode not in MODES:
            raise Refused(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.version is not None and not 1 <= len(self.version) <= 64:
            raise Refused("version must be 1-64 characters")

    def where(self, cutoff: str) -> Where:
        """What the store may filter itself: exact fields, staleness, and for ``update_available``
        a superset (another version as text, no install in progress) that ``matches`` narrows."""
        available = self.update_available is True
        return Where(
            state=self.state,
            mode=self.mode,
            seen_before=cutoff if self.stale else None,
            not_states=NOT_PENDING if available else (),
            target_differs=available,
        )

    def matches(self, view: dict[str, Any]) -> bool:
        return (
            (self.state is None or view["state"] == self.state)
            and (self.mode is None or view["mode"] == self.mode)
            and (self.version is None or same_version(view["version"], self.version))
            and (self.stale is None or view["stale"] is self.stale)
            and (self.update_available is None or view["update_available"] is self.update_available)
        )


def fleet_view(
    rows: Iterable[dict[str, Any]],
    *,
    now: datetime | float,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
    where: FleetFilter = FleetFilter(),
) -> dict[str, Any]:
    """``{"agents": [...by agent_id], "versions": {version: count, ...by version}}`` (contract)."""
    cutoff = stale_cutoff(now, stale_after)
    agents = sorted(
        (v for v in (fleet_row(r, cutoff) for r in rows) if where.matches(v)),
        key=lambda a: a["agent_id"] or "",
    )
    return {"agents": agents, "versions": counts_by_version(agents)}


def read_fleet(
    store: ReportStore,
    *,
    now: datetime | float,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
    where: FleetFilter = FleetFilter(),
) -> dict[str, Any]:
    """``fleet --json``: every agent that passes ``where``."""
    cutoff = stale_cutoff(now, stale_after)
    rows = read_or_fail(store, lambda: [row for _, row in store.scan(where=where.where(cutoff))])
    return fleet_view(rows, now=now, stale_after=stale_after, where=where)


def encode_cursor(position: str) -> str:
    return base64.urlsafe_b64encode(position.encode("utf-8")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The store position in a ``next`` cursor; Refused for anything else."""
    try:
        if len(cursor) > 512:
            raise ValueError("too long")
        padded = (cursor + "=" * (-len(cursor) % 4)).encode("ascii")
        return base64.b64decode(padded, altchars=b"-_", validate=True).decode("utf-8")
    except (ValueError, binascii.Error, UnicodeError):
        raise Refused("cursor: not a cursor this server returned") from None


def fleet_page(
    store: ReportStore,
    *,
    limit: int,
    cursor: str | None = None,
    now: datetime | float,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
    where: FleetFilter = FleetFilter(),
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of matching rows in store order, and the cursor of the next (None: last page).

    A page examines at most the store's ``scan_budget`` rows, so a filter that matches few agents
    may return a short (even empty) page with a ``next`` cursor: keep following it.
    """
    cutoff = stale_cutoff(now, stale_after)
    after = decode_cursor(cursor) if cursor else None
    agents: list[dict[str, Any]] = []
    resume: str | None = None
    budget = store.scan_budget
    try:
        rows = store.scan(after, where.where(cutoff), page_size=min(limit + 1, 1000))
        for examined, (position, row) in enumerate(rows, 1):
            view = fleet_row(row, cutoff)
            if where.matches(view):
                if len(agents) == limit:
                    return agents, encode_cursor(resume or position)
                agents.append(view)
                resume = position
            if budget is not None and examined >= budget:
                return agents, encode_cursor(position)
    except ValueError:
        raise Refused("cursor: not a cursor this server returned") from None
    except StoreError as exc:
        raise read_failed(store, exc) from None
    return agents, None


# ---------------------------------------------------------------- one agent


def history_event(event: dict[str, Any]) -> dict[str, Any]:
    return {
        "time": event.get("time"),
        "received": event.get("received_at"),
        "state": event.get("state"),
        "version": event.get("version"),
        "target_version": event.get("target_version"),
        "failed_state": event.get("failed_state"),
        "error": event.get("error"),
    }


def agent_history(
    store: ReportStore,
    agent_id: str,
    *,
    now: datetime | float,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
    limit: int | None = None,
) -> dict[str, Any] | None:
    """``fleet AGENT_ID --json``: ``{"agent": row, "events": [...oldest first]}``; None if unknown.

    Events are ordered as the agent made them ((stream, seq): a new stream per fresh queue);
    ``limit`` keeps the newest. Heartbeats are liveness, not history: they are not among them.
    """
    latest = read_or_fail(store, lambda: store.agent(agent_id))
    if latest is None:
        return None
    events = read_or_fail(store, lambda: store.agent_events(agent_id))
    events.sort(key=lambda e: (str(e.get("stream", "")).lower(), e.get("seq", 0)))
    if limit is not None:
        events = events[-limit:] if limit else []
    return {
        "agent": fleet_row(latest, stale_cutoff(now, stale_after)),
        "events": [history_event(e) for e in events],
    }


# ---------------------------------------------------------------- the live release


def release_view(manifest: Manifest | None, *, verified: bool | None = None) -> dict[str, Any] | None:
    """What the console shows of the live release (the contract's five fields first)."""
    if manifest is None:
        return None
    plan = manifest.rollout_plan
    return {
        "version": manifest.version,
        "serial": manifest.serial,
        "rollout_percent": manifest.rollout.percent,
        "expires": format_time(manifest.expires),
        "halted": manifest.rollout.halted,
        "released_at": format_time(manifest.released_at),
        "signed_at": None if manifest.signed_at is None else format_time(manifest.signed_at),
        "rollout_plan": None if plan is None else plan.to_dict(),
        "image": manifest.container_image,
        "min_version": manifest.min_version,
        "downgrade": manifest.downgrade,
        "changelog": manifest.changelog,
        "verified": verified,
    }


# ---------------------------------------------------------------- summary


_BUCKETS: dict[tuple[str, str], int] = {}
_BUCKETS_MAX = 400_000


def wave_bucket(agent_id: str, salt: str) -> int:
    """The agent's wave bucket for ``salt`` (module docstring: hosts and Kubernetes workloads)."""
    key = (salt, agent_id)
    bucket = _BUCKETS.get(key)
    if bucket is None:
        parts = agent_id.split("/")  # k8s/<cluster>/<namespace>/<kind>/<name>: the workload's rule
        text = f"{parts[1]}/{parts[2]}/{parts[4]}" if parts[0] == "k8s" and len(parts) == 5 else agent_id
        bucket = fnv1a32((salt + text).encode("utf-8")) % 100
        if len(_BUCKETS) >= _BUCKETS_MAX:
            _BUCKETS.clear()
        _BUCKETS[key] = bucket
    return bucket


def progress_position(version: str, bucket: int | None, live: Manifest) -> str:
    """Where an agent stands in the live release's rollout (module docstring)."""
    if same_version(version, live.version):
        return "on_live"
    if not live.downgrade and _newer(version, live.version):
        return "ahead"
    if live.min_version is not None and _newer(live.min_version, version):
        return "in_wave"  # forced: below min_version, whatever its wave
    if bucket is not None and bucket < live.rollout.percent:
        return "in_wave"
    return "behind"


# ---------------------------------------------------------------- text


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Aligned columns, two spaces apart; None shows as ``-``."""
    return coloured_table(headers, ([(v, None) for v in row] for row in rows), colour=False)


def coloured_table(
    headers: Sequence[str], rows: Iterable[Sequence[tuple[Any, str | None]]], *, colour: bool
) -> list[str]:
    """Like :func:`table`, each cell a (value, tone); tones become ANSI colours when ``colour``."""
    cells = [[("-" if v is None else str(v), tone) for v, tone in row] for row in rows]
    widths = [max([len(h)] + [len(r[i][0]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for line in cells:
        out = []
        for (text, tone), w in zip(line, widths, strict=True):
            padded = text.ljust(w)
            if colour and tone in ANSI:
                padded = f"\x1b[{ANSI[tone]}m{text}\x1b[0m" + " " * (w - len(text))
            out.append(padded)
        lines.append("  ".join(out).rstrip())
    return lines


def shorten(text: str | None, limit: int = MAX_TEXT_ERROR) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 3] + "..."


def counts_text(counter: Counter[str] | dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.items()) or "-"


# ---------------------------------------------------------------- canary


def canary_exit_code(ended: int, failures: int, *, max_failure_rate: float, min_agents: int) -> int:
    """The canary rule (module docstring): hold below ``min_agents`` ended attempts, checked first."""
    if ended < min_agents:  # checked first: too little data never passes
        return EXIT_HOLD
    if failures / ended > max_failure_rate:
        return EXIT_FAIL
    return EXIT_PASS


def canary_view(
    store: ReportStore, version: str, *, max_failure_rate: float, min_agents: int, rows: int = 50
) -> dict[str, Any]:
    """``canary --json`` for the console: the same verdict, its lists cut to ``rows`` each.

    A store that aggregates (SQLite) counts in SQL; any other reads the version's outcomes once.
    ``failures_total`` / ``in_progress_total`` say how many the cut lists stand for.
    """
    if store.aggregates:
        counts = read_or_fail(store, lambda: store.outcome_counts(version))  # type: ignore[attr-defined]
        failing = read_or_fail(store, lambda: store.outcomes_in(version, FAILURES, rows))  # type: ignore[attr-defined]
        busy = read_or_fail(store, lambda: store.outcomes_in(version, IN_PROGRESS, rows))  # type: ignore[attr-defined]
    else:
        outcomes = sorted(read_outcomes(store, version), key=lambda o: o.get("agent_id") or "")
        counts = dict(Counter(str(o.get("state")) for o in outcomes))
        failing = [o for o in outcomes if o.get("state") in FAILURES][:rows]
        busy = [o for o in outcomes if o.get("state") in IN_PROGRESS][:rows]
    ended = sum(counts.get(s, 0) for s in ENDED)
    failed = sum(counts.get(s, 0) for s in FAILURES)
    code = canary_exit_code(ended, failed, max_failure_rate=max_failure_rate, min_agents=min_agents)
    return {
        "version": version,
        "verdict": VERDICTS[code],
        "exit_code": code,
        "ended": ended,
        "committed": counts.get("committed", 0),
        "failed": counts.get("failed", 0),
        "rolled_back": counts.get("rolled_back", 0),
        "failure_rate": round(failed / ended, 6) if ended else 0.0,
        "max_failure_rate": max_failure_rate,
        "min_agents": min_agents,
        "failures": [_outcome(o) for o in failing],
        "in_progress": [_outcome(o) for o in busy],
        "failures_total": failed,
        "in_progress_total": sum(counts.get(s, 0) for s in IN_PROGRESS),
        "halt": None,
    }


@dataclass
class Halt:
    """What ``--halt`` did: ``halted`` (re-signed at 0), ``already_halted`` or ``dry_run``."""

    status: str
    version: str
    serial: int
    outcome: publishing.Outcome | None = None

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "version": self.version, "serial": self.serial}


@dataclass
class CanaryReport:
    version: str
    max_failure_rate: float
    min_agents: int
    ended: list[dict[str, Any]]
    in_progress: list[dict[str, Any]]
    halt: Halt | None = field(default=None)

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [o for o in self.ended if o.get("state") in FAILURES]

    @property
    def failure_rate(self) -> float:
        return len(self.failures) / len(self.ended) if self.ended else 0.0

    @property
    def exit_code(self) -> int:
        return canary_exit_code(
            len(self.ended),
            len(self.failures),
            max_failure_rate=self.max_failure_rate,
            min_agents=self.min_agents,
        )

    @property
    def verdict(self) -> str:
        return VERDICTS[self.exit_code]

    def to_json(self) -> dict[str, Any]:
        ended = Counter(o.get("state") for o in self.ended)
        return {
            "version": self.version,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "ended": len(self.ended),
            "committed": ended["committed"],
            "failed": ended["failed"],
            "rolled_back": ended["rolled_back"],
            "failure_rate": round(self.failure_rate, 6),
            "max_failure_rate": self.max_failure_rate,
            "min_agents": self.min_agents,
            "failures": [_outcome(o) for o in self.failures],
            "in_progress": [_outcome(o) for o in self.in_progress],
            "halt": None if self.halt is None else self.halt.to_json(),
        }


def _state_counts(rows: list[dict[str, Any]], order: Sequence[str]) -> dict[str, int]:
    """Rows per state: the states of ``order`` first, in that order, then any others."""
    counts = Counter(str(o.get("state")) for o in rows)
    rank = {s: i for i, s in enumerate(order)}
    return {s: counts[s] for s in sorted(counts, key=lambda s: (rank.get(s, len(rank)), s))}


def _outcome(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "agent_id": row.get("agent_id"),
        "state": row.get("state"),
        "failed_state": row.get("failed_state"),
        "error": row.get("error"),
        "version": row.get("version"),
        "time": row.get("time"),
        "received_at": row.get("received_at"),
    }


def evaluate_canary(
    version: str, outcomes: Iterable[dict[str, Any]], *, max_failure_rate: float, min_agents: int
) -> CanaryReport:
    """Split VERSION's outcomes into ended attempts and attempts in progress (module docstring)."""
    ended: list[dict[str, Any]] = []
    in_progress: list[dict[str, Any]] = []
    for row in sorted(outcomes, key=lambda o: o.get("agent_id") or ""):
        (ended if row.get("state") in ENDED else in_progress).append(row)
    return CanaryReport(version, max_failure_rate, min_agents, ended, in_progress)


def format_canary(report: CanaryReport) -> str:
    ended, rate, limit = len(report.ended), report.failure_rate, report.max_failure_rate
    why = {
        EXIT_HOLD: f"HOLD: {ended} ended attempt(s), fewer than --min-agents {report.min_agents}",
        EXIT_FAIL: f"FAIL: failure rate {rate:.1%} is above --max-failure-rate {limit:.1%}",
        EXIT_PASS: f"PASS: failure rate {rate:.1%} is within --max-failure-rate {limit:.1%}",
    }[report.exit_code]
    lines = [
        f"canary {report.version}: {why} (exit {report.exit_code})",
        f"ended        {ended} ({counts_text(_state_counts(report.ended, ENDED))})",
        f"in progress  {len(report.in_progress)} "
        f"({counts_text(_state_counts(report.in_progress, IN_PROGRESS))}) - not counted",
        f"failure rate {rate:.1%} of ended attempts (max {report.max_failure_rate:.1%}, "
        f"min agents {report.min_agents})",
    ]
    if report.failures:
        lines += ["", "failed or rolled back:"]
        lines += table(
            ("AGENT", "STATE", "FAILED IN", "ERROR"),
            (
                (o.get("agent_id"), o.get("state"), o.get("failed_state"), shorten(o.get("error")))
                for o in report.failures
            ),
        )
    if report.in_progress:
        lines += ["", "still updating (not counted):"]
        lines += table(
            ("AGENT", "STATE", "LAST REPORT"),
            ((o.get("agent_id"), o.get("state"), o.get("received_at")) for o in report.in_progress),
        )
    halt = report.halt
    if halt is not None:
        lines.append("")
        lines.append(
            {
                "halted": f"halted: {halt.version} re-signed at rollout 0 as serial {halt.serial}",
                "already_halted": f"already halted: {halt.version} is at rollout 0 (serial {halt.serial}); "
                "nothing signed",
                "dry_run": f"dry run: would re-sign {halt.version} at rollout 0 as serial {halt.serial}",
            }[halt.status]
        )
    return "\n".join(lines) + "\n"


def halt(
    store: Store,
    signers: Sequence[Signer],
    version: str,
    *,
    expires_in: timedelta = publishing.DEFAULT_EXPIRES_IN,
    trusted: Sequence[PublicKey] = (),
    dry_run: bool = False,
    invalidate: publishing.Invalidate | None = None,
) -> Halt:
    """Stop VERSION's rollout: re-sign the live manifest at rollout 0 (module docstring)."""
    _, live = resigning.read_live(store, signers, trusted)  # only a verified live release counts
    if not same_version(live.version, version):
        raise PublishError(
            f"the live release in {store.location} is {live.version}, not {version}: "
            "refusing to halt another version's rollout"
        )
    if live.rollout.percent == 0:
        return Halt("already_halted", live.version, live.serial)
    outcome = resigning.resign(
        store,
        signers,
        percent=0,
        expires_in=expires_in,
        trusted=trusted,
        dry_run=dry_run,
        invalidate=invalidate,
    )
    return Halt(
        "dry_run" if dry_run else "halted", outcome.manifest.version, outcome.manifest.serial, outcome
    )
