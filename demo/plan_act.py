"""The demo's rollout-plan act: a release that climbs by itself, and a bad one that stops itself.

Called by ``demo/run_demo.py`` with its running demo (``run(demo)``), after step 3 (0.1.43 live,
the fleet running it, ``serve`` up):

1. 0.1.44 is released with a plan (``release --plan 25,50,100 --soak 3s``) and
   ``avika-publish progress`` runs every second, as the hourly maintenance job would run it: it
   waits out each step's soak, holds while too few agents of the wave have finished, then
   re-signs the next step, until 100 %. Nobody types ``rollout``.
2. the broken 0.1.45 is released with the same plan: its canaries roll it back on their own, and
   the same ``progress`` loop halts it (exit 5, rollout 0) at its first step. Nobody types
   ``canary --halt``.

It fills in what the demo's summary and checks read (``committed_in_wave``, ``canary_exit``,
``halt_serial``), so ``demo.summary()`` and ``demo.check_story()`` work after it unchanged.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from run_demo import Agent, Demo

EVERY = 1.0  # seconds between two `progress` runs (the maintenance job: every hour)
PLAN_REST = (50, 100)  # after the demo's first wave (FIRST_WAVE, 25 %)


def _story(demo: Demo) -> ModuleType:
    """The demo's own module (``__main__`` when run as a script): its narration, versions and
    ``DemoError``, which its ``main`` catches. Importing ``run_demo`` here would load a second
    copy whose ``DemoError`` that ``main`` does not catch."""
    return sys.modules[type(demo).__module__]


@dataclass
class ProgressLoop:
    """``avika-publish progress`` in a loop (a real process each run), narrating each change."""

    demo: Demo
    runs: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _last: tuple[Any, ...] | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="progress-loop", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout=130)

    def _run(self) -> None:
        args = ("progress", "--reports", self.demo.reports, *self.demo.signing(), "--json")
        while not self.stop.is_set():
            try:
                done = self.demo.publish(*args, ok=(0, 4, 5))
                out = json.loads(done.stdout)
            except (_story(self.demo).DemoError, ValueError) as exc:
                with self.lock:
                    self.errors.append(str(exc))
                return
            with self.lock:
                self.runs.append((done.returncode, out))
            self._narrate(done.returncode, out)
            self.stop.wait(EVERY)

    def _narrate(self, code: int, out: dict[str, Any]) -> None:
        """One line when what progress says changes (not one per run)."""
        key = (out["version"], out["action"], out["percent"], out["serial"])
        if key == self._last:
            return
        self._last = key
        canary = out.get("canary") or {}
        what = {
            "waiting": f"waiting at {out['percent']} %: soak until {_clock(out['next_at'])}, "
            f"then {out['next_percent']} % if healthy",
            "hold": f"hold at {out['percent']} %: soak over, {canary.get('ended')} attempt(s) finished, "
            f"{canary.get('min_agents')} needed",
            "advanced": f"advanced: re-signed at {out['percent']} % (serial {out['serial']})",
            "complete": f"complete: {out['percent']} %, the plan's last step",
            "halted_now": f"HALTED: {canary.get('rolled_back', 0) + canary.get('failed', 0)} of "
            f"{canary.get('ended')} finished attempt(s) failed; re-signed at 0 % (serial {out['serial']})",
            "halted": "halted: waits for a person (`avika-publish rollout N` resumes it)",
        }.get(out["action"], out["action"])
        _story(self.demo).note(f"[progress, exit {code}] {out['version']} {what}")

    def actions(self, version: str) -> list[tuple[int, str, int]]:
        with self.lock:
            return [(code, r["action"], r["percent"]) for code, r in self.runs if r["version"] == version]

    def check(self) -> None:
        with self.lock:
            if self.errors:
                raise _story(self.demo).DemoError(f"avika-publish progress failed: {self.errors[0]}")


def _clock(moment: str | None) -> str:
    return "-" if moment is None else moment[11:19]


def _step_of(agent: Agent, version: str, plan: tuple[int, ...]) -> int:
    return next(step for step in plan if agent.in_wave(version, step))


def _timeline(demo: Demo, version: str) -> str:
    """The serials of ``version`` as ``history`` lists them: who signed what, when."""
    rows = json.loads(demo.publish("history", *demo.signing(), "--json").stdout)
    mine = sorted((r for r in rows if r["version"] == version), key=lambda r: r["serial"])
    return " → ".join(f"serial {r['serial']}: {r['rollout']} % at {_clock(r['signed_at'])}" for r in mine)


def run(demo: Demo, number: int = 4) -> int:
    """The act, its steps numbered from ``number``; returns the next step's number."""
    story = _story(demo)
    say, note, indent, demo_error = story.say, story.note, story.indent, story.DemoError
    new, bad, first = story.NEW, story.BAD, story.FIRST_WAVE
    steps = (first, *PLAN_REST)
    soak = "3s" if demo.quick else "5s"
    plan = ",".join(str(step) for step in steps)
    options = ("--plan", plan, "--soak", soak)
    loop = ProgressLoop(demo)
    try:
        say(
            f"{number}. Publish {new} with a rollout plan {' → '.join(map(str, steps))} % (soak {soak}); "
            "`avika-publish progress`, run every second as the hourly job would, climbs it by itself"
        )
        out = demo.release(new, *options, "--changelog", "Fixed WAL directory creation")
        note(f"$ avika-publish release {new} ... --plan {plan} --soak {soak}   (serial {out['serial']})")
        shown = demo.publish("show", "--store", str(demo.store)).stdout.splitlines()
        print(indent("\n".join(line for line in shown if line.startswith(("rollout", "plan", "next")))))
        note(
            "progress advances a step once its soak is over and at least min(20, 90 % of the wave) "
            "attempts finished, within the failure threshold; it halts at once above it"
        )
        loop.start()
        demo.wait_for(f"every VM agent to commit {new}", demo.not_committed(demo.vms, new))
        demo.wait_for(
            f"progress to reach the plan's last step for {new}",
            lambda: [] if any(a == "complete" for _, a, _ in loop.actions(new)) else demo.vms[:1],
        )
        loop.check()
        for agent in demo.vms:
            demo.committed_in_wave[agent.agent_id] = f"at {_step_of(agent, new, steps)} % (plan)"
        note(f"{new}: {_timeline(demo, new)}; no rollout typed by anyone")
        demo.show_fleet()

        canaries = [a for a in demo.vms if a.in_wave(bad)]
        if not canaries:
            raise demo_error(f"no VM agent is in {bad}'s {first} % wave: pick other agent ids")
        say(
            f"{number + 1}. Publish the broken {bad} with the same plan: each canary of its {first} % wave "
            f"({', '.join(a.agent_id for a in canaries)}) that tries it rolls it back, and progress halts it "
            f"at {first} %"
        )
        out = demo.release(bad, *options, "--changelog", "Broken on purpose: exits 1 on start")
        note(f"$ avika-publish release {bad} ... --plan {plan} --soak {soak}   (serial {out['serial']})")
        demo.wait_for(
            f"progress to halt {bad} (exit 5)",
            lambda: [] if (5, "halted_now", 0) in loop.actions(bad) else canaries,
        )
        loop.check()
        demo.canary_exit = 5
        manifest = demo.manifest()
        demo.halt_serial = manifest["serial"]
        if manifest["version"] != bad or manifest["rollout"]["percent"] != 0:
            raise demo_error(
                f"the live manifest is {manifest['version']} at {manifest['rollout']['percent']} %"
            )
        rows = json.loads(demo.publish("history", *demo.signing(), "--json").stdout)
        if any(r["version"] == bad and r["rollout"] not in (first, 0) for r in rows):
            raise demo_error(f"{bad} went past its first step")
        note(f"{bad}: {_timeline(demo, bad)}; no canary or halt typed by anyone")
        demo.wait_for(
            f"every VM agent to see the halted manifest (serial {demo.halt_serial})", _settled(demo)
        )
        demo.wait_for(f"every canary's {bad} attempt to end", _attempts_ended(demo, canaries, bad))
        tried = [a for a in canaries if _tried(demo, a, bad)]
        demo.show_chain(tried[0], bad)
        note(f"{tried[0].agent_id}'s log ({tried[0].log.relative_to(demo.workdir)}), from the swap on:")
        print(indent(demo.log_excerpt(tried[0], f"-> {bad}")), flush=True)
        for agent in canaries:
            if agent not in tried:  # one failure is enough to halt a wave this small (min 1 attempt)
                halted = f"{bad} was halted before its next check: never tried"
                note(f"{agent.agent_id}: in the wave, but {halted}")
        others = [a.agent_id for a in demo.vms if not a.in_wave(bad)]
        note(f"{', '.join(others)}: not in the {first} % wave, never tried {bad}, still {new}")
        demo.show_fleet()
    finally:
        loop.close()
    return number + 2


def _tried(demo: Demo, agent: Agent, version: str) -> bool:
    return any(e.get("target_version") == version for e in demo.agent_events(agent))


def _attempts_ended(demo: Demo, canaries: list[Agent], version: str) -> Any:
    """Canaries that started ``version`` and have not reported its rollback yet (a halt does not
    stop an attempt under way); one that never tried it (halted first) is not waited for."""

    def late() -> list[Agent]:
        out = []
        for agent in canaries:
            states = [e["state"] for e in demo.agent_events(agent) if e.get("target_version") == version]
            if states and "rolled_back" not in states:
                out.append(agent)
        return out

    return late


def _settled(demo: Demo) -> Any:
    def late() -> list[Agent]:
        out = []
        for agent in demo.vms:
            try:
                state = json.loads((agent.state_dir / "state.json").read_text())
            except (OSError, ValueError):
                state = {}
            if state.get("highest_serial") != demo.halt_serial or (agent.state_dir / "pending.json").exists():
                out.append(agent)
        return out

    return late
