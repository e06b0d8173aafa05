"""The rollout plan's decision (publisher/plan.py), on data: manifest + archive + reports + now.

Rules (DESIGN section 6, ``progress``), in the order they apply:
- no plan: ``no_plan``; at the last step: ``complete``; at rollout 0: ``halted`` (whatever the
  reports say, and never reading them);
- the canary rule over ended attempts at the live version, with the plan's threshold and the
  attempts needed, says fail: ``halted_now`` (sign 0), mid-soak as well; with fewer ended attempts
  than needed it is a hold, never a fail (the canary checks that first);
- the soak is not over: ``waiting``, with ``next_at`` = start of the step + soak; the step starts
  with the earliest serial of the unbroken run at this version and rollout (refreshes do not
  restart it, a halt and resume does, a new salt does);
- soak over, too few ended attempts: ``hold``; needed = max(1, min(min_agents, 90 % of the wave,
  rounded down)); the wave: VM agents the reports know, in the wave, not yet on the version, plus
  every agent with an attempt at it; an empty fleet always holds;
- otherwise ``advanced`` to the first step above the current percent.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent.manifest import Binary, Manifest, Rollout, RolloutPlan, rollout_bucket
from publisher import plan as planning
from publisher.errors import Refused
from publisher.plan import (
    ADVANCED,
    COMPLETE,
    HALTED,
    HALTED_NOW,
    HOLD,
    NO_PLAN,
    WAITING,
    FleetFacts,
    decide,
    needed,
    plan_from_options,
    plan_status,
    wave_size,
)

VERSION = "0.1.44"
T0 = datetime(2026, 2, 15, 20, 0, 0, tzinfo=UTC)
PLAN = RolloutPlan((10, 50, 100), "2h", "0.05", 20)
SOAK = timedelta(hours=2)


@functools.cache
def agent_in(bucket_below: int | None, n: int, salt: str = VERSION) -> str:
    """The n-th agent id whose bucket under ``salt`` is below ``bucket_below`` (None: at or above 50)."""
    found = 0
    for i in range(100_000):
        agent_id = f"host-{i}"
        bucket = rollout_bucket(agent_id, salt)
        if (bucket < bucket_below) if bucket_below is not None else bucket >= 50:
            if found == n:
                return agent_id
            found += 1
    raise AssertionError("no such agent id")


def manifest(serial: int = 3, percent: int = 10, signed: timedelta = timedelta(0), **fields: Any) -> Manifest:
    return Manifest(
        serial=serial,
        version=fields.pop("version", VERSION),
        released_at=T0,
        expires=T0 + timedelta(days=30),
        binaries={"linux-amd64": Binary(url="binaries/x", sha256="a" * 64, size=10)},
        rollout=Rollout(percent, fields.pop("salt", VERSION)),
        signed_at=fields.pop("signed_at", T0 + signed),
        rollout_plan=fields.pop("rollout_plan", PLAN),
        **fields,
    )


def outcome(agent_id: str, state: str) -> dict[str, Any]:
    return {"agent_id": agent_id, "state": state, "target_version": VERSION, "version": "0.1.43"}


def agent(agent_id: str, mode: str = "vm", version: str = "0.1.43") -> dict[str, Any]:
    return {"agent_id": agent_id, "mode": mode, "version": version, "state": "committed"}


def fleet(committed: int = 0, failed: int = 0, in_progress: int = 0, extra_wave: int = 0) -> FleetFacts:
    """Agents in the 10 % wave: ``committed``/``failed`` ended, ``in_progress`` updating,
    ``extra_wave`` not started yet; every one of them is known to the reports."""
    ids = [agent_in(10, n) for n in range(committed + failed + in_progress + extra_wave)]
    states = ["committed"] * committed + ["rolled_back"] * failed + ["watching"] * in_progress
    outcomes = [outcome(a, s) for a, s in zip(ids, states, strict=False)]
    return FleetFacts(outcomes, [agent(a) for a in ids])


EMPTY = FleetFacts([], [])


def history(*manifests: Manifest) -> list[Manifest]:
    return list(manifests)


# ---------------------------------------------------------------- the table

CASES = [
    # (id, live, archive, fleet, now, action, target)
    ("no plan", manifest(rollout_plan=None), [], None, T0, NO_PLAN, None),
    ("at the last step", manifest(percent=100), [], None, T0 + SOAK * 9, COMPLETE, None),
    ("halted is left to a person", manifest(percent=0), [], None, T0 + SOAK, HALTED, None),
    ("right after the release: waiting", manifest(), [], fleet(committed=3), T0 + timedelta(minutes=1),
     WAITING, None),
    ("failures over the threshold halt mid-soak", manifest(), [], fleet(committed=2, failed=2),
     T0 + timedelta(minutes=1), HALTED_NOW, 0),
    ("failures over the threshold halt after the soak", manifest(), [], fleet(committed=8, failed=2),
     T0 + SOAK * 3, HALTED_NOW, 0),
    ("too few ended to judge is never a fail", manifest(), [], fleet(failed=2, extra_wave=8),
     T0 + timedelta(minutes=1), WAITING, None),
    ("exactly at the threshold passes", manifest(rollout_plan=replace(PLAN, max_failure_rate="0.25")), [],
     fleet(committed=3, failed=1), T0 + SOAK, ADVANCED, 50),
    ("soak over, too few ended: hold", manifest(), [], fleet(committed=2, extra_wave=8), T0 + SOAK,
     HOLD, None),
    ("attempts still in progress do not count", manifest(), [], fleet(committed=2, in_progress=8),
     T0 + SOAK, HOLD, None),
    ("an empty fleet holds", manifest(), [], EMPTY, T0 + SOAK, HOLD, None),
    ("an empty fleet holds forever", manifest(), [], EMPTY, T0 + SOAK * 1000, HOLD, None),
    ("soak over and healthy: advance", manifest(), [], fleet(committed=9, extra_wave=1), T0 + SOAK,
     ADVANCED, 50),
    ("one second before the soak ends: waiting", manifest(), [], fleet(committed=9),
     T0 + SOAK - timedelta(seconds=1), WAITING, None),
    ("from the second step to the last", manifest(percent=50), [], fleet(committed=9), T0 + SOAK,
     ADVANCED, 100),
    ("a percent set by hand between steps goes to the next", manifest(percent=30), [], fleet(committed=5),
     T0 + SOAK, ADVANCED, 50),
    ("a percent below the first step goes to the first", manifest(percent=5), [], fleet(committed=5),
     T0 + SOAK, ADVANCED, 10),
    ("a refresh does not restart the soak",
     manifest(serial=5, signed=SOAK - timedelta(minutes=1)),
     history(manifest(serial=4, signed=timedelta(minutes=30)), manifest(serial=3)),
     fleet(committed=9), T0 + SOAK, ADVANCED, 50),
    ("a halt and a resume restart the soak",
     manifest(serial=5, signed=SOAK - timedelta(minutes=1)),
     history(manifest(serial=4, percent=0, signed=timedelta(minutes=30)), manifest(serial=3)),
     fleet(committed=9), T0 + SOAK, WAITING, None),
    ("a new salt is a new wave: the soak restarts",
     manifest(serial=5, signed=SOAK - timedelta(minutes=1), salt="other"),
     history(manifest(serial=3)), FleetFacts([], []), T0 + SOAK, WAITING, None),
    ("another version in between starts a new step",
     manifest(serial=5, signed=SOAK - timedelta(minutes=1)),
     history(manifest(serial=4, version="0.1.45", signed=timedelta(minutes=30)), manifest(serial=3)),
     fleet(committed=9), T0 + SOAK, WAITING, None),
    ("unverified serials are not in the archive given: the run continues past them",
     manifest(serial=6, signed=SOAK - timedelta(minutes=1)),
     history(manifest(serial=3)), fleet(committed=9), T0 + SOAK, ADVANCED, 50),
]  # fmt: skip


@pytest.mark.parametrize(
    ("live", "archive", "facts", "now", "action", "target"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decision(
    live: Manifest,
    archive: list[Manifest],
    facts: FleetFacts | None,
    now: datetime,
    action: str,
    target: int | None,
) -> None:
    decision = decide(live, [live, *archive], facts, now)
    assert (decision.action, decision.target) == (action, target), decision.message
    assert decision.exit_code == {HALTED_NOW: 5, HOLD: 4}.get(action, 0)
    assert decision.serial == live.serial and decision.version == live.version
    assert decision.message


def test_waiting_says_when_the_next_step_is_due() -> None:
    live = manifest(serial=5, signed=timedelta(minutes=40))
    decision = decide(live, [live, manifest(serial=4, signed=timedelta(minutes=10))], fleet(committed=9), T0)
    assert decision.action == WAITING
    assert decision.step_started_at == T0 + timedelta(minutes=10)
    assert decision.next_at == T0 + timedelta(minutes=10) + SOAK
    assert decision.next_percent == 50
    out = decision.to_json()
    assert out["next_at"] == "2026-02-15T22:10:00Z" and out["next_percent"] == 50
    assert set(out) >= {"action", "version", "serial", "percent", "next_percent", "next_at", "canary"}
    assert out["canary"]["verdict"] == "pass" and out["canary"]["max_failure_rate"] == 0.05


def test_halted_and_complete_need_no_reports() -> None:
    for live in (manifest(percent=0), manifest(percent=100), manifest(rollout_plan=None)):
        assert not planning.needs_fleet(live)
        assert decide(live, [live], None, T0).canary is None
    assert planning.needs_fleet(manifest())
    with pytest.raises(RuntimeError):
        decide(manifest(), [], None, T0)


def test_a_serial_without_signed_at_counts_from_its_release() -> None:
    live = manifest(signed_at=None)
    assert decide(live, [live], fleet(committed=9), T0 + SOAK).action == ADVANCED
    assert decide(live, [live], fleet(committed=9), T0 + SOAK - timedelta(seconds=1)).action == WAITING


def test_applied_moves_the_decision_to_the_signed_step() -> None:
    live = manifest()
    decision = decide(live, [live], fleet(committed=9), T0 + SOAK)
    signed = manifest(serial=4, percent=50, signed=SOAK)
    after = decision.applied(signed)
    assert (after.action, after.serial, after.percent, after.next_percent) == (ADVANCED, 4, 50, 100)
    assert after.step_started_at == T0 + SOAK and after.next_at == T0 + SOAK * 2
    last = decide(signed, [signed], fleet(committed=9), T0 + SOAK * 2).applied(
        manifest(serial=5, percent=100, signed=SOAK * 2)
    )
    assert (last.percent, last.next_percent, last.next_at) == (100, None, None)
    halted = decide(live, [live], fleet(failed=9), T0).applied(manifest(serial=4, percent=0))
    assert (halted.action, halted.percent, halted.next_percent, halted.next_at) == (HALTED_NOW, 0, None, None)


# ---------------------------------------------------------------- enough attempts


@pytest.mark.parametrize(
    ("min_agents", "wave", "expected"),
    [(20, 0, 1), (20, 1, 1), (20, 2, 1), (20, 3, 2), (20, 5, 4), (20, 10, 9), (20, 22, 19), (20, 23, 20),
     (20, 1000, 20), (1, 1000, 1), (5, 3, 2)],
)  # fmt: skip
def test_needed_is_90_percent_of_the_wave_at_most_min_agents_at_least_one(
    min_agents: int, wave: int, expected: int
) -> None:
    assert needed(replace(PLAN, min_agents=min_agents), wave) == expected


def test_the_wave_counts_vm_agents_in_it_that_have_something_to_do_and_every_attempt() -> None:
    live = manifest(percent=10)
    inside = [agent_in(10, n) for n in range(6)]
    outside = agent_in(None, 0)
    forced = agent_in(None, 1)  # out of the wave, but attempted (min_version, a controller workload)
    agents = [
        agent(inside[0]),  # counts
        agent(inside[1]),  # counts (attempted below)
        agent(inside[2], mode="container"),  # never swaps: not counted
        agent(inside[3], version=VERSION),  # already there, no attempt: not counted
        agent(inside[4], version=f"v{VERSION}"),  # the same version, written as a tag
        agent(outside),  # out of the wave
        agent(forced),
        agent(inside[0]),  # listed twice: counted once
    ]
    outcomes = [
        outcome(inside[1], "committed"),
        outcome(forced, "rolled_back"),
        outcome(inside[5], "watching"),
    ]
    # inside[5] is not in agents(): its attempt still counts
    assert wave_size(live, FleetFacts(outcomes, agents)) == 4
    assert wave_size(manifest(percent=100), FleetFacts([], [agent(outside)])) == 1


# ---------------------------------------------------------------- the plan from options


def test_plan_from_options_builds_the_manifest_plan() -> None:
    assert plan_from_options("1, 10,50%,100", "30m", "0.1", 5) == RolloutPlan(
        (1, 10, 50, 100), "30m", "0.1", 5
    )
    assert plan_from_options("100") == RolloutPlan((100,), "2h", "0.05", 20)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("10,5,100",), "5 after 10"),
        (("1,1,100",), "1 after 1"),
        (("1,10,50",), "must be 100"),
        (("0,100",), "'0' is not a percent"),
        (("1,101",), "'101' is not a percent"),
        (("a,100",), "'a' is not a percent"),
        (("",), "'' is not a percent"),
        (("10,,100",), "'' is not a percent"),
        (("-5,100",), "'-5' is not a percent"),
        ((",".join(str(n) for n in range(1, 101)) + ",100",), "101 steps"),
        (("10,100", "2x"), "--soak '2x'"),
        (("10,100", " 2h"), "--soak ' 2h'"),
        (("10,100", "366d"), "--soak 366d is longer than 365d"),
        (("10,100", "2h", "0.0500001"), "--max-failure-rate"),
        (("10,100", "2h", "1.5"), "--max-failure-rate"),
        (("10,100", "2h", "5%"), "--max-failure-rate"),
        (("10,100", "2h", "0.05", 0), "--min-agents 0"),
    ],
)
def test_plan_from_options_refuses_what_the_manifest_would(args: tuple[Any, ...], names: str) -> None:
    with pytest.raises(Refused) as caught:
        plan_from_options(*args)
    assert names in caught.value.message


def test_plan_status_for_show_and_the_console() -> None:
    live = manifest(serial=5, percent=50, signed=timedelta(minutes=5))
    status = plan_status(live, [live], T0 + timedelta(minutes=6))
    assert status is not None
    assert status["steps"] == [10, 50, 100] and (status["step"], status["of"]) == (2, 3)
    assert status["next_percent"] == 100 and status["next_at"] == "2026-02-15T22:05:00Z"
    assert not status["due"] and not status["halted"] and not status["complete"]
    assert "verdict" not in status  # no reports given
    judged = plan_status(live, [live], T0 + SOAK * 2, fleet(committed=1, failed=1))
    assert (
        judged is not None
        and judged["due"]
        and judged["verdict"] == "fail"
        and judged["action"] == HALTED_NOW
    )
    assert plan_status(manifest(rollout_plan=None), [], T0) is None
    halted = plan_status(manifest(percent=0), [], T0)
    assert (
        halted is not None
        and halted["halted"]
        and halted["next_percent"] is None
        and halted["next_at"] is None
    )
    complete = plan_status(manifest(percent=100), [], T0)
    assert complete is not None and complete["complete"] and complete["next_at"] is None
