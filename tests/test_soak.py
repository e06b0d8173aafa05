"""The soak (``bench/soak.py``) as a test: a short run must hold every invariant, and its checks
must really catch what they claim to (a lost report, a duplicated one, a target that is no binary
this cycle allowed).

Also the regression test of the bug the soak found: the report sender and the run loop looked
up the cached manifest's ``reports_url`` at the same time, and the one that came second read the
half-filled cache as "no endpoint known", so the sender idled for ``IDLE_POLL`` (30 s) and a new
version's commit, which waits for one delivered report, came 30 s late.
"""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent import reports
from agent.events import Origin
from agent.reports import QueueSink
from agent.state import CACHED_ENVELOPE
from tests.agent_fixtures import Release

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "bench" / "soak.py"
SEED = 20261127  # plans kills and faults in most of the 8 cycles

pytestmark = pytest.mark.slow


def load_soak() -> Any:
    spec = importlib.util.spec_from_file_location("avika_bench_soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_eight_cycles_with_faults_and_kills_hold_every_invariant(tmp_path: Path) -> None:
    figures_path = tmp_path / "figures.json"
    done = subprocess.run(
        [
            sys.executable,
            str(SOAK),
            *("--cycles", "8", "--seed", str(SEED), "--no-results", "--max-minutes", "3"),
            *("--json-out", str(figures_path)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert figures_path.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(figures_path.read_text())
    assert figures["violations"] == [], done.stdout[-4000:]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert figures["cycles"] == 8 and figures["stopped_early"] is None
    assert figures["kills"] > 0 and figures["faults"] > 0, figures
    assert figures["commits"] > 0 and figures["events"] > 0, figures


def test_a_hung_release_cycle_ends_remembered_for_good_and_holds_every_invariant(tmp_path: Path) -> None:
    """The soak's "hung" kind: the build boots, then its loop hangs; the cycle converges only when
    the watchdog has rolled it back and the host remembers it for good."""
    soak_module = load_soak()
    out = soak_module.Report()
    with soak_module.Soak(tmp_path / "work", SEED, out) as soak:
        soak.setup()
        soak.pick_kind = lambda: "hung"  # type: ignore[method-assign]
        soak.run_cycle(1)
        assert soak.stats.violations == [], [v.line() for v in soak.stats.violations]
        assert soak.stats.kinds == {"hung": 1} and soak.stats.outcomes == {"rolled_back": 1}
        new = soak._current
        assert soak.bad_pairs()[(new.version, new.sha)] in ("hung", "too_many_boots")


def test_the_checks_catch_a_lost_report_a_duplicate_and_a_foreign_target(tmp_path: Path) -> None:
    soak_module = load_soak()
    out = soak_module.Report()
    with soak_module.Soak(tmp_path / "work", SEED, out) as soak:
        soak.setup()
        soak.run_cycle(1)
        assert soak.stats.violations == [], [v.line() for v in soak.stats.violations]
        new, serial = soak._current, soak.serial

        # A target that is neither the running binary nor this cycle's signed one is seen at once.
        soak.sampler.allowed = frozenset({"0" * 64})
        deadline = time.monotonic() + 5
        while not soak.stats.violations and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [v.what for v in soak.stats.violations] == ["target is not the running or the signed binary"]
        soak.sampler.allowed = frozenset({new.sha})

        # Lose one acknowledged report and resend another under a new event_id.
        stored = sorted(soak.reports.agent_events(soak.agent_id), key=lambda e: e["seq"])
        assert len(stored) >= 3
        lost, twice = stored[1], stored[2]
        db = sqlite3.connect(tmp_path / "work" / "reports.db")
        with db:
            db.execute("DELETE FROM events WHERE event_id = ?", (lost["event_id"],))
            row = db.execute("SELECT * FROM events WHERE event_id = ?", (twice["event_id"],)).fetchone()
            data = json.loads(row[4])
            data["event_id"] = str(uuid.uuid4())
            db.execute(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                (row[0], data["event_id"], *row[2:4], json.dumps(data)),
            )
        db.close()
        soak.check_reports(soak_module.INSTALL, new, serial)
        found = {v.what for v in soak.stats.violations}
        assert {
            "gap in the stored seqs",
            "duplicate seq in the store",
            "acknowledged event missing from the store",
        } <= found, found


def test_the_reports_url_is_never_read_half_cached_by_a_second_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run loop (``configured``) and the sender both call ``report_url()`` at start-up."""
    release = Release()
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    url = "http://127.0.0.1:9/v1/reports"
    (state_dir / CACHED_ENVELOPE).write_bytes(release.envelope(reports_url=url))
    sink = QueueSink(
        Origin("host-1", "1.0.0", "vm", "linux-amd64"),
        state_dir=state_dir,
        token="t" * 64,
        manifest_url="http://127.0.0.1:9/updates/manifest.json",
        public_keys=[s.public_key for s in release.signers],
    )
    verify = reports.verify_envelope
    entered = threading.Event()

    def slow_verify(*args: Any, **kwargs: Any) -> bytes:
        entered.set()
        time.sleep(0.3)  # an Ed25519 verify on a busy host, stretched
        return verify(*args, **kwargs)

    monkeypatch.setattr(reports, "verify_envelope", slow_verify)
    first: list[str | None] = []
    thread = threading.Thread(target=lambda: first.append(sink.report_url()))
    thread.start()
    assert entered.wait(5)
    second = sink.report_url()  # while the first lookup is still verifying
    thread.join(5)
    assert first == [url] and second == url
    if sink.queue is not None:
        sink.queue.close()
