"""The fleet view and the canary verdict (DESIGN section 6): pure logic over report-store rows.

Rows come from ``infra.reports.store.ReportStore``: ``agents()`` (each agent's latest state, as
the event with the highest (stream, seq) left it, plus ``last_seen``, the server's receive time of
its latest report) and ``version_outcomes(VERSION)`` (each agent's latest install-attempt event
whose ``target_version`` is VERSION). Nothing here reads events, so ``fleet`` holds at any size the
store's ``agents()`` holds.

Fleet row (``avika-publish fleet --json``, contract): ``agent_id``, ``mode``, ``platform``,
``version`` (what the agent runs, as it last said), ``state`` (its latest reported state),
``target_version``, ``last_seen``, and two derived fields:

- ``update_available``: the agent was offered a version it does not run and is not installing it
  now, i.e. ``target_version`` is set, differs from ``version`` (compared as versions, so
  ``v0.1.44`` = ``0.1.44``; a downgrade counts), and ``state`` is not an install step in progress
  (``downloading`` .. ``watching``). This covers a container (or ``signal-only``) agent reporting
  ``update_available`` for a newer image, and a VM whose attempt failed or rolled back (it still
  runs the old version). ``checking`` and check failures carry no target: false.
- ``last_error``: when the latest state is ``failed`` or ``rolled_back``, ``"<failed_state>: <error>"``
  (either part alone when the other is missing, the state name when both are), else null.

``versions``: agents per running version, ordered by version.

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

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion

from agent.manifest import PublicKey, Signer, normalize_version, parse_version
from infra.reports.store import ReportStore, StoreError
from publisher import release as publishing
from publisher import resign as resigning
from publisher.errors import PublishError, Refused
from publisher.stores import Store

IN_PROGRESS = ("downloading", "verifying", "staged", "restarting", "watching")
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
    "update_available",
    "last_error",
)

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


def read_agents(store: ReportStore) -> list[dict[str, Any]]:
    try:
        return list(store.agents())
    except StoreError as exc:
        raise read_failed(store, exc) from None


def read_outcomes(store: ReportStore, version: str) -> list[dict[str, Any]]:
    try:
        return store.version_outcomes(version)
    except StoreError as exc:
        raise read_failed(store, exc) from None


# ---------------------------------------------------------------- versions


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


def _version_key(text: str) -> tuple[int, Any]:
    try:
        return (0, parse_version(text))
    except (InvalidVersion, ValueError):
        return (1, text)


# ---------------------------------------------------------------- fleet


def update_available(row: dict[str, Any]) -> bool:
    """See the module docstring: offered a version it does not run, and not installing it now."""
    target = row.get("target_version")
    if target is None or row.get("state") in IN_PROGRESS:
        return False
    return not same_version(target, row.get("version"))


def last_error(row: dict[str, Any]) -> str | None:
    state = row.get("state")
    if state not in FAILURES:
        return None
    parts = [p for p in (row.get("failed_state"), row.get("error")) if p]
    return ": ".join(parts) if parts else state


def fleet_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "agent_id": row.get("agent_id"),
        "mode": row.get("mode"),
        "platform": row.get("platform"),
        "version": row.get("version"),
        "state": row.get("state"),
        "target_version": row.get("target_version"),
        "last_seen": row.get("last_seen"),
        "update_available": update_available(row),
        "last_error": last_error(row),
    }


def fleet_view(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """``{"agents": [...by agent_id], "versions": {version: count, ...by version}}`` (contract)."""
    agents = sorted((fleet_row(r) for r in rows), key=lambda a: a["agent_id"] or "")
    counts = Counter(a["version"] for a in agents)
    versions = {v: counts[v] for v in sorted(counts, key=_version_key)}
    return {"agents": agents, "versions": versions}


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Aligned columns, two spaces apart; None shows as ``-``."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    return [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [list(headers), *cells]
    ]


def _short(text: str | None, limit: int = MAX_TEXT_ERROR) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 3] + "..."


def _counts(counter: Counter[str] | dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.items()) or "-"


def format_fleet(view: dict[str, Any]) -> str:
    agents = view["agents"]
    if not agents:
        return "no agents have reported yet\n"
    lines = table(
        ("AGENT", "MODE", "PLATFORM", "VERSION", "STATE", "TARGET", "LAST SEEN", "UPDATE", "LAST ERROR"),
        (
            (
                a["agent_id"],
                a["mode"],
                a["platform"] or None,
                a["version"],
                a["state"],
                a["target_version"],
                a["last_seen"],
                "available" if a["update_available"] else None,
                _short(a["last_error"]),
            )
            for a in agents
        ),
    )
    states = Counter(a["state"] for a in agents)
    available = sum(1 for a in agents if a["update_available"])
    lines += [
        "",
        f"versions: {_counts(view['versions'])}",
        f"states:   {_counts(dict(sorted(states.items())))}",
        f"{len(agents)} agent(s), {available} with an update available",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- canary


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
        if len(self.ended) < self.min_agents:  # checked first: too little data never passes
            return EXIT_HOLD
        if self.failure_rate > self.max_failure_rate:
            return EXIT_FAIL
        return EXIT_PASS

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
        f"ended        {ended} ({_counts(_state_counts(report.ended, ENDED))})",
        f"in progress  {len(report.in_progress)} ({_counts(_state_counts(report.in_progress, IN_PROGRESS))})"
        " - not counted",
        f"failure rate {rate:.1%} of ended attempts (max {report.max_failure_rate:.1%}, "
        f"min agents {report.min_agents})",
    ]
    if report.failures:
        lines += ["", "failed or rolled back:"]
        lines += table(
            ("AGENT", "STATE", "FAILED IN", "ERROR"),
            (
                (o.get("agent_id"), o.get("state"), o.get("failed_state"), _short(o.get("error")))
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
