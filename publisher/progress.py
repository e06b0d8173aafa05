"""``avika-publish progress``: one idempotent step of the live release's rollout plan (DESIGN section 6).

The I/O around ``publisher.plan.decide``: read the store as the publisher believes it
(``publisher.archive``: only verified envelopes count), read the reports only when the decision
needs them, decide, and re-sign through ``publisher.resign`` when the decision says so.

Safe to run from several places at once (the hourly workflow, a second scheduler, a person):

- the re-sign names the serial the decision was made on (``expect_serial``), and ``manifest.json``
  is replaced by compare-and-swap (``manifests/<serial>.json`` create-only first), so of two runs
  that decide to advance, one signs and the other loses;
- the loser never reports a traceback: it reads the store again and decides again (typically
  ``waiting``, the step having just begun), with a note that another publish came first. A publish
  caught between its two writes (archived, not yet live) is waited out briefly the same way;
- a person's ``halt`` that lands between the decision and the re-sign wins: the serial moved, the
  next look sees ``halted``, and nothing is signed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.manifest import (
    Manifest,
    ManifestError,
    PublicKey,
    Signer,
    parse_manifest,
    read_envelope_unverified,
)
from infra.reports.store import ReportStore
from publisher import fleet as fleet_view
from publisher import plan as planning
from publisher.archive import StoreView, read_store
from publisher.errors import Refused
from publisher.release import DEFAULT_EXPIRES_IN, Invalidate, LostRace, Outcome, trusted_keys
from publisher.resign import NoLiveRelease, SerialMoved, require_live, resign
from publisher.stores import Reader, Store, archive_key

ATTEMPTS = 5
"""Reads and decisions per run when other publishes get in the way (lost races, publishes in flight)."""
BACKOFF = 0.25  # seconds before the second attempt; doubled each time (0.25 + 0.5 + 1 + 2)
MAX_WALK = 1000  # archived serials ``show`` reads back to find when the live step began


@dataclass
class StepResult:
    """What one ``progress`` run decided and did."""

    decision: planning.Decision
    outcome: Outcome | None = None  # the re-sign (published or dry run), when there was one
    lost: list[str] = field(default_factory=list)  # races lost before the final decision
    warnings: list[str] = field(default_factory=list)

    @property
    def dry_run(self) -> bool:
        return self.outcome is not None and self.outcome.status == "dry_run"

    @property
    def exit_code(self) -> int:
        return self.decision.exit_code

    def to_json(self) -> dict[str, Any]:
        out = self.decision.to_json()
        if self.lost:
            out["message"] = f"{self.lost[-1]}; then: {out['message']}"
        out["dry_run"] = self.dry_run
        out["warnings"] = self.warnings
        return out


def read_fleet(reports: ReportStore, version: str) -> planning.FleetFacts:
    """The canary's rows for ``version`` and every agent's latest state."""
    return planning.FleetFacts(fleet_view.read_outcomes(reports, version), fleet_view.read_agents(reports))


def _in_flight(view: StoreView) -> bool:
    """A verified archive newer than the verified ``manifest.json``: a publish between its writes
    (or one that died there, which the last attempt then reports)."""
    return view.live is not None and view.live.verified and view.live_release is None


def take_step(
    store: Store,
    signers: Sequence[Signer],
    reports: Callable[[], ReportStore],
    *,
    trusted: Sequence[PublicKey] = (),
    expires_in: timedelta = DEFAULT_EXPIRES_IN,
    now: datetime | None = None,
    dry_run: bool = False,
    invalidate: Invalidate | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> StepResult:
    """One step of the live release's plan (module docstring). ``reports`` opens the reports store;
    it is called only when the decision needs the fleet. ``now`` (tests) is also the signing time."""
    if not signers and not dry_run:
        raise Refused("progress re-signs the manifest: pass --key KEY or --kms-key-id ID")
    keys = trusted_keys(signers, trusted)
    lost: list[str] = []
    delay = BACKOFF
    for attempt in range(1, ATTEMPTS + 1):
        view = read_store(store, keys)
        if _in_flight(view) and attempt < ATTEMPTS:
            lost.append(f"{view.no_live_release()}: waited for it")
            sleep(delay)
            delay *= 2
            continue
        live = require_live(view)
        moment = _moment(now)
        facts = _facts(reports, live) if planning.needs_fleet(live) else None
        decision = planning.decide(live, [e.manifest for e in view.verified if e.manifest], facts, moment)
        warnings = view.warnings()
        if not decision.signs:
            return StepResult(decision, lost=lost, warnings=warnings)
        try:
            outcome = resign(
                store,
                signers,
                percent=decision.target,
                expires_in=expires_in,
                trusted=trusted,
                expect_serial=decision.serial,
                now=moment,
                dry_run=dry_run,
                invalidate=invalidate,
            )
        except (SerialMoved, LostRace, NoLiveRelease) as exc:
            if attempt == ATTEMPTS:
                raise
            lost.append(f"another publish came first ({exc.message.split(';')[0]}); this run signed nothing")
            sleep(delay)
            delay *= 2
            continue
        return StepResult(decision.applied(outcome.manifest), outcome, lost, warnings + outcome.warnings)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _moment(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)


def _facts(reports: Callable[[], ReportStore], live: Manifest) -> planning.FleetFacts:
    store = reports()
    try:
        return read_fleet(store, live.version)
    finally:
        store.close()


# ---------------------------------------------------------------- the console's release card


def release_plan_status(
    store: Store,
    trusted: Sequence[PublicKey],
    reports: ReportStore | None = None,
    now: datetime | None = None,
) -> dict[str, Any] | None:
    """``publisher.plan.plan_status`` of the live, verified release (the console's ``GET
    /v1/releases``): the steps, the current one, the next one and ``next_at``; with ``reports``,
    also the ``verdict`` and the ``action`` the next ``progress`` run would take. None when there
    is no verified live release or it has no plan. Reads the whole archive and, with ``reports``,
    every agent: cache it as the console caches its other slow reads."""
    view = read_store(store, trusted)
    live = view.live_release
    if live is None or live.rollout_plan is None:
        return None
    facts = read_fleet(reports, live.version) if reports is not None and planning.needs_fleet(live) else None
    manifests = [e.manifest for e in view.verified if e.manifest]
    return planning.plan_status(live, manifests, _moment(now), facts)


# ---------------------------------------------------------------- show (unverified, for display)


def step_history(reader: Reader, live: Manifest, limit: int = MAX_WALK) -> list[Manifest]:
    """The archived manifests just below the live serial that continue its step (same version and
    rollout), read back one serial at a time: ``show`` needs no listing, so this works over HTTP
    too. Decoded without checking signatures, as everything ``show`` prints; a gap ends the walk
    (the step then looks younger than it is: the next step looks later, never earlier)."""
    found: list[Manifest] = []
    serial = live.serial - 1
    while serial >= 1 and len(found) < limit:
        data = reader.read(archive_key(serial))
        if data is None:
            break
        try:
            manifest = parse_manifest(read_envelope_unverified(data))
        except ManifestError:
            break
        if manifest.serial != serial or manifest.version != live.version or manifest.rollout != live.rollout:
            break
        found.append(manifest)
        serial -= 1
    return found


def show_status(reader: Reader, live: Manifest, now: datetime | None = None) -> dict[str, Any] | None:
    """``plan_status`` for ``show``: from what the store serves, unverified (None without a plan)."""
    if live.rollout_plan is None:
        return None
    return planning.plan_status(live, step_history(reader, live), _moment(now))


# ---------------------------------------------------------------- text


def format_result(result: StepResult) -> str:
    """``progress`` without ``--json``: the action and why, the plan, the canary by the plan's thresholds."""
    d = result.decision
    verb = {
        planning.ADVANCED: f"ADVANCED to {d.percent} % (serial {d.serial})",
        planning.HALTED_NOW: f"HALTED NOW at 0 % (serial {d.serial})",
    }.get(d.action, d.action.upper().replace("_", " "))
    if result.dry_run:
        verb = f"dry run: would sign {d.percent} % as serial {d.serial} ({d.action})"
    lines = [f"progress {d.version}: {verb} (exit {d.exit_code})", f"  {d.message}"]
    plan = d.plan
    if plan is not None:
        lines.append(f"  plan         {planning.describe_plan(plan)}")
    if d.action == planning.ADVANCED and d.next_at is not None:
        lines.append(f"  next         {d.next_percent} % at {planning.format_time(d.next_at)} if healthy")
    report = d.canary
    if report is not None and plan is not None:
        c = report.to_json()
        lines.append(
            f"  canary       {report.verdict}: {c['ended']} attempt(s) ended, {report.min_agents} needed "
            f"({c['committed']} committed, {c['failed']} failed, {c['rolled_back']} rolled back; "
            f"{len(report.in_progress)} in progress)"
        )
        lines.append(
            f"               failure rate {planning.percent_text(report.failure_rate)} "
            f"(max {planning.percent_text(report.max_failure_rate)}); needed = min_agents {plan.min_agents}, "
            f"or {planning.WAVE_SHARE_PERCENT} % of the {d.in_wave} agent(s) in the wave, at least 1"
        )
        for o in report.failures[:10]:
            why = " ".join(str(v) for v in (o.get("state"), o.get("failed_state"), o.get("error")) if v)
            lines.append(f"    {o.get('agent_id')}: {why}")
        if len(report.failures) > 10:
            lines.append(f"    ... and {len(report.failures) - 10} more (avika-publish canary {d.version})")
    return "\n".join(lines) + "\n"
