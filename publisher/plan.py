"""A release that rolls itself out: the signed ``rollout_plan`` and what ``progress`` does with it.

Pure logic (DESIGN section 6, ``progress``): the live manifest, the verified manifests of the
store's archive, the fleet's facts from the reports and ``now`` in; one :class:`Decision` out.
``publisher.progress`` is the I/O around it (read, decide, re-sign), ``show`` and the console
call :func:`plan_status`. In order, the first rule that applies decides:

1. ``no_plan``: the live release has no ``rollout_plan``; ``complete``: it is at the last step
   (100 %). Nothing is signed.
2. ``halted``: rollout 0 (a person or ``progress`` halted it). Nothing is signed: only a person
   resumes (``rollout N``), because a halt means someone should look.
3. ``halted_now``: the ``canary`` rule (``publisher.fleet.evaluate_canary``, not a copy) over the
   ended attempts at the live version says ``fail`` with the plan's ``max_failure_rate`` and the
   number of attempts needed (rule 5): re-sign at 0, exit 5, whether the soak is over or not.
4. ``waiting``: the current step's soak is not over. The step began with the earliest serial of
   the unbroken run of verified serials, up to the live one, that carry this version at this
   rollout (percent and salt): re-signs at the same percent (``refresh``) do not restart the soak,
   a halt followed by a resume does. A run that starts or skips late only delays an advance,
   never shortens a soak, because the start is read from signed manifests, not from the clock of
   the last run.
5. ``hold`` (exit 4): the soak is over but fewer attempts ended than needed. Needed is
   ``max(1, min(min_agents, 90 % of the agents in the wave))``, 90 % rounded down, so one silent
   host does not hold a small wave forever and an empty fleet never advances. The agents in the
   wave: those the reports know that run another version and whose bucket for this release is
   below the current percent, VM agents only (a container never swaps, so never ends an attempt),
   plus every agent that has an attempt at this version (forced updates, the Kubernetes
   controller's workloads).
6. ``advanced``: otherwise re-sign at the next step (the first step above the current percent, so
   a percent set by hand between two steps continues to the next one).

Times are whole seconds, as the manifest writes them.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from agent.manifest import MAX_SOAK_SECONDS, Manifest, RolloutPlan, duration_seconds, format_time, in_wave
from publisher.errors import Refused
from publisher.fleet import EXIT_FAIL, EXIT_HOLD, CanaryReport, evaluate_canary, same_version

NO_PLAN, COMPLETE, HALTED, HALTED_NOW, WAITING, HOLD, ADVANCED = (
    "no_plan",
    "complete",
    "halted",
    "halted_now",
    "waiting",
    "hold",
    "advanced",
)
ACTIONS = (NO_PLAN, COMPLETE, HALTED, HALTED_NOW, WAITING, HOLD, ADVANCED)
EXIT_CODES = {HALTED_NOW: EXIT_FAIL, HOLD: EXIT_HOLD}  # every other action exits 0

WAVE_SHARE_PERCENT = 90
"""Enough ended attempts: at most this share of the wave (rounded down), so a few silent hosts do
not hold a small fleet forever (DESIGN section 6)."""
DEFAULT_SOAK = "2h"
DEFAULT_MAX_FAILURE_RATE = "0.05"
DEFAULT_MIN_AGENTS = 20
MAX_STEPS = 100  # the manifest's bound
MAX_MIN_AGENTS = 1_000_000  # the manifest's bound
_RATE_RE = re.compile(r"^(0(\.[0-9]{1,6})?|1(\.0{1,6})?)$")  # the manifest's: a decimal string, no float


# ---------------------------------------------------------------- the plan from options


def plan_from_options(
    steps: str,
    soak: str = DEFAULT_SOAK,
    max_failure_rate: str = DEFAULT_MAX_FAILURE_RATE,
    min_agents: int = DEFAULT_MIN_AGENTS,
) -> RolloutPlan:
    """``release --plan 1,10,50,100 --soak 2h --max-failure-rate 0.05 --min-agents 20``, checked
    as the manifest checks it (DESIGN section 2), each refusal naming the option."""
    parsed = []
    for part in steps.replace(" ", "").split(","):
        text = part.removesuffix("%")
        if not text.isdigit() or not 1 <= int(text) <= 100:
            raise Refused(
                f"--plan {steps}: {part!r} is not a percent 1..100 (a plan is percents separated by "
                "commas, e.g. 1,10,50,100)"
            )
        parsed.append(int(text))
    if len(parsed) > MAX_STEPS:
        raise Refused(f"--plan {steps}: {len(parsed)} steps; a plan has at most {MAX_STEPS}")
    for before, after in itertools.pairwise(parsed):
        if after <= before:
            raise Refused(
                f"--plan {steps}: steps must go up, each above the one before ({after} after {before})"
            )
    if parsed[-1] != 100:
        raise Refused(f"--plan {steps}: the last step must be 100 (a plan ends with the whole fleet)")
    try:
        seconds = duration_seconds(soak)
    except ValueError:
        raise Refused(f"--soak {soak!r} is not a duration like 30s, 15m, 2h or 1h30m") from None
    if seconds > MAX_SOAK_SECONDS:
        raise Refused(f"--soak {soak} is longer than {MAX_SOAK_SECONDS // 86400}d (a typo?)")
    if not _RATE_RE.fullmatch(max_failure_rate):
        raise Refused(
            f"--max-failure-rate {max_failure_rate!r} is not a decimal from 0 to 1 with at most 6 "
            "decimals (0.05 = 5 %)"
        )
    if not 1 <= min_agents <= MAX_MIN_AGENTS:
        raise Refused(f"--min-agents {min_agents} is not 1..{MAX_MIN_AGENTS}")
    return RolloutPlan(tuple(parsed), soak, max_failure_rate, min_agents)


# ---------------------------------------------------------------- steps and soak


def next_step(plan: RolloutPlan, percent: int) -> int | None:
    """The first step above ``percent`` (None at or past the last step)."""
    return next((step for step in plan.steps if step > percent), None)


def step_number(plan: RolloutPlan, percent: int) -> int:
    """How many steps are reached at ``percent`` (0 before the first, ``len(steps)`` at the last)."""
    return sum(1 for step in plan.steps if step <= percent)


def _signed(manifest: Manifest) -> datetime:
    # A serial signed before ``signed_at`` existed counts from its release.
    return manifest.signed_at or manifest.released_at


def step_start(live: Manifest, manifests: Iterable[Manifest]) -> Manifest:
    """The serial that began the live step: the earliest of the unbroken run of serials, up to the
    live one, with the live version and rollout (module docstring, rule 4). ``manifests``: the
    verified ones the store holds (any order; the live one may be among them)."""
    start = live
    older = sorted((m for m in manifests if m.serial < live.serial), key=lambda m: m.serial, reverse=True)
    for manifest in older:
        if manifest.version != live.version or manifest.rollout != live.rollout:
            break
        start = manifest
    return start


def soak_end(live: Manifest, manifests: Iterable[Manifest]) -> tuple[datetime, datetime]:
    """(when the live step began, when its soak ends)."""
    assert live.rollout_plan is not None
    began = _signed(step_start(live, manifests))
    return began, began + timedelta(seconds=live.rollout_plan.soak_seconds)


# ---------------------------------------------------------------- the fleet


@dataclass(frozen=True)
class FleetFacts:
    """What the reports say: each agent's latest attempt at the live version (the canary's input,
    ``ReportStore.version_outcomes``) and each agent's latest state (``ReportStore.agents``)."""

    outcomes: Sequence[dict[str, Any]]
    agents: Sequence[dict[str, Any]]


def wave_size(live: Manifest, fleet: FleetFacts) -> int:
    """Agents expected to attempt the live version at its current percent (module docstring)."""
    attempted = {o.get("agent_id") for o in fleet.outcomes}
    known = set()
    count = 0
    on_version: dict[Any, bool] = {}  # a fleet runs a few versions: parse each once
    for agent in fleet.agents:
        agent_id = agent.get("agent_id")
        if not isinstance(agent_id, str) or agent_id in known:
            continue
        known.add(agent_id)
        version = agent.get("version")
        if version not in on_version:
            on_version[version] = same_version(version, live.version)
        # A container never swaps (no attempt ends); one already on the version has nothing to do.
        if agent_id in attempted or (
            agent.get("mode") != "container" and not on_version[version] and in_wave(agent_id, live.rollout)
        ):
            count += 1
    return count + len(attempted - known)


def needed(plan: RolloutPlan, wave: int) -> int:
    """Ended attempts enough to judge a step: max(1, min(min_agents, 90 % of the wave))."""
    return max(1, min(plan.min_agents, wave * WAVE_SHARE_PERCENT // 100))


# ---------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Decision:
    """What ``progress`` does (or did) with the live release. ``target`` is the percent to sign
    (0 for ``halted_now``, the next step for ``advanced``, else None)."""

    action: str
    version: str
    serial: int
    percent: int
    message: str
    plan: RolloutPlan | None = None
    target: int | None = None
    next_percent: int | None = None
    step_started_at: datetime | None = None
    next_at: datetime | None = None
    canary: CanaryReport | None = None
    in_wave: int | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.action, 0)

    @property
    def signs(self) -> bool:
        return self.target is not None

    def applied(self, signed: Manifest) -> Decision:
        """The decision after its re-sign (``signed``): the new serial, percent, next step and due time."""
        assert self.target is not None and signed.rollout.percent == self.target
        plan = self.plan
        began = _signed(signed)
        following = next_step(plan, signed.rollout.percent) if plan and signed.rollout.percent else None
        due = began + timedelta(seconds=plan.soak_seconds) if plan and following is not None else None
        return replace(
            self,
            serial=signed.serial,
            percent=signed.rollout.percent,
            next_percent=following,
            step_started_at=began,
            next_at=due,
        )

    def to_json(self) -> dict[str, Any]:
        """``progress --json`` (DESIGN section 6), plus ``message``, ``step_started_at`` and ``in_wave``."""
        return {
            "action": self.action,
            "version": self.version,
            "serial": self.serial,
            "percent": self.percent,
            "next_percent": self.next_percent,
            "next_at": _time(self.next_at),
            "canary": None if self.canary is None else self.canary.to_json(),
            "message": self.message,
            "step_started_at": _time(self.step_started_at),
            "in_wave": self.in_wave,
        }


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else format_time(moment)


def needs_fleet(live: Manifest) -> bool:
    """Does deciding need the reports? Not without a plan, when halted or complete."""
    plan = live.rollout_plan
    return (
        plan is not None and live.rollout.percent != 0 and next_step(plan, live.rollout.percent) is not None
    )


def percent_text(rate: float) -> str:
    """0.05 -> ``5.0 %``."""
    return f"{rate * 100:.1f} %"


def decide(
    live: Manifest, manifests: Iterable[Manifest], fleet: FleetFacts | None, now: datetime
) -> Decision:
    """One step of the live release's plan (module docstring): pure."""
    base = Decision("", live.version, live.serial, live.rollout.percent, "", live.rollout_plan)
    plan, percent, where = live.rollout_plan, live.rollout.percent, f"{live.version} (serial {live.serial})"
    if plan is None:
        return replace(
            base,
            action=NO_PLAN,
            message=f"{where} has no rollout plan: nothing to do; its rollout moves when a person moves it",
        )
    following = next_step(plan, percent)
    if following is None:
        return replace(
            base, action=COMPLETE, message=f"{where} is at {percent} %, the plan's last step: nothing to do"
        )
    if percent == 0:
        return replace(
            base,
            action=HALTED,
            message=f"{where} is halted (rollout 0 %): the plan waits for a person; resume with "
            "`avika-publish rollout N` (the plan continues from N)",
        )
    if fleet is None:
        raise RuntimeError("decide() needs the fleet's facts for a release with a plan in progress")
    began, due = soak_end(live, manifests)
    wave = wave_size(live, fleet)
    report = evaluate_canary(
        live.version,
        fleet.outcomes,
        max_failure_rate=float(plan.max_failure_rate),
        min_agents=needed(plan, wave),
    )
    base = replace(
        base, next_percent=following, step_started_at=began, next_at=due, canary=report, in_wave=wave
    )
    ended, rate, limit = len(report.ended), report.failure_rate, float(plan.max_failure_rate)
    if report.exit_code == EXIT_FAIL:
        return replace(
            base,
            action=HALTED_NOW,
            target=0,
            message=f"{len(report.failures)} of {ended} ended attempts at {live.version} failed or rolled "
            f"back ({percent_text(rate)}, above the plan's {percent_text(limit)}): halting {where} at 0 % "
            f"(was {percent} %)",
        )
    if now < due:
        return replace(
            base,
            action=WAITING,
            message=f"{where} is at {percent} % since {format_time(began)}; soak {plan.soak}: "
            f"{following} % is due at {format_time(due)} if healthy",
        )
    if report.exit_code == EXIT_HOLD:
        return replace(
            base,
            action=HOLD,
            message=f"the soak at {percent} % is over, but {ended} attempt(s) at {live.version} ended; "
            f"{report.min_agents} needed (min_agents {plan.min_agents}, or {WAVE_SHARE_PERCENT} % of the "
            f"{wave} agent(s) in the wave): holding {where} at {percent} %",
        )
    return replace(
        base,
        action=ADVANCED,
        target=following,
        message=f"soak over and healthy ({len(report.failures)} of {ended} ended attempts failed, "
        f"{percent_text(rate)}, at most {percent_text(limit)}): {live.version} goes from {percent} % "
        f"to {following} %",
    )


# ---------------------------------------------------------------- status (show, console)


def plan_status(
    live: Manifest, manifests: Iterable[Manifest], now: datetime, fleet: FleetFacts | None = None
) -> dict[str, Any] | None:
    """The plan's state for ``show`` and the console's release card: the steps, the current one,
    the next one and when it is due; with ``fleet``, also what ``progress`` would do now and the
    canary verdict with the plan's thresholds. None without a plan."""
    plan = live.rollout_plan
    if plan is None:
        return None
    manifests = list(manifests)
    percent = live.rollout.percent
    following = next_step(plan, percent) if percent else None
    began, due = soak_end(live, manifests)
    status = {
        "steps": list(plan.steps),
        "soak": plan.soak,
        "max_failure_rate": plan.max_failure_rate,
        "min_agents": plan.min_agents,
        "percent": percent,
        "step": step_number(plan, percent),
        "of": len(plan.steps),
        "halted": percent == 0,
        "complete": next_step(plan, percent) is None,
        "next_percent": following,
        "step_started_at": format_time(began),
        "next_at": format_time(due) if following is not None else None,
        "due": following is not None and now >= due,
    }
    if fleet is not None:
        decision = decide(live, manifests, fleet, now)
        status.update(
            action=decision.action,
            message=decision.message,
            verdict=None if decision.canary is None else decision.canary.verdict,
            canary=None if decision.canary is None else decision.canary.to_json(),
            in_wave=decision.in_wave,
        )
    return status


def describe_plan(plan: RolloutPlan) -> str:
    """``25 → 50 → 100 %, soak 2h, max failure rate 0.05, min agents 20``."""
    steps = " → ".join(str(s) for s in plan.steps)
    return (
        f"{steps} %, soak {plan.soak}, max failure rate {plan.max_failure_rate}, min agents {plan.min_agents}"
    )


def format_status(status: dict[str, Any]) -> list[str]:
    """Lines for ``show``, in its two-column layout: where the plan stands and what comes next."""
    steps = " → ".join(f"[{s}]" if s == status["percent"] else str(s) for s in status["steps"])
    since = status["step_started_at"]
    if status["halted"]:
        return [
            f"{'plan step':<13}halted at 0 % since {since} ({steps} %)",
            f"{'next step':<13}none until a person resumes it: `avika-publish rollout N` (goes on from N)",
        ]
    lines = [f"{'plan step':<13}{steps} % (step {status['step']} of {status['of']}, since {since})"]
    if status["complete"]:
        lines.append(f"{'next step':<13}none: the plan is complete")
    else:
        when = "due since" if status["due"] else "at"
        lines.append(
            f"{'next step':<13}{status['next_percent']} % {when} {status['next_at']} if healthy "
            "(`avika-publish progress` takes it)"
        )
    return lines
