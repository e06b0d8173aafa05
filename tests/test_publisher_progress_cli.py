"""``release --plan``, ``progress`` and ``show`` through the real CLI, on real stores (DESIGN section 6).

Everything is real: keys are generated, releases are published into a directory or an S3 bucket
(moto), the agents' reports go through the real reports endpoint into SQLite or DynamoDB (moto),
and every manifest ``progress`` signs is checked with the agent's own verifier. Time is real: the
soaks are seconds long, and a test waits for one to pass. The hidden ``--now`` pins "right after a
step began" to the step's ``signed_at`` (moto alone can take longer than a short soak), and looks
a month ahead for "an empty fleet never advances"; it never makes a soak pass.

What must hold:
- ``release --plan`` signs ``rollout_plan`` with the first step as the percent; ``--rollout`` may
  repeat it, never contradict it; bad plans and thresholds without ``--plan`` exit 2 naming the
  option, with the store untouched; every re-sign keeps the plan;
- ``progress``: ``waiting`` right after a release, ``advanced`` after the soak with enough healthy
  reports, ``waiting`` again right after advancing; ``halted_now`` (exit 5) as soon as failures
  pass the threshold, mid-soak; then ``halted``, with nothing signed; ``hold`` (exit 4) with too
  few reports, and with an empty fleet, a month later too; ``complete`` at 100 %; ``no_plan``;
  a run that decides nothing signs nothing (the store is byte for byte the same);
- ``--json`` is the contract's object; ``--dry-run`` writes nothing;
- ``show`` prints the plan, the current step and when the next one is due (and ``plan_status``
  in ``--json``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import reports_fixtures
from reports_fixtures import create_table

from agent.manifest import parse_time
from infra.reports.store import ReportStore, SQLiteStore
from tests.progress_fixtures import VERSION, Site, agents_in_wave, soak_over
from tests.publisher_fixtures import cli, new_key_file, snapshot

BUCKET = "avika-releases"
TABLE = "avika-reports"

aws = reports_fixtures.aws


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    path = tmp_path / "reports.db"
    store = SQLiteStore(path)
    yield Site(tmp_path, str(tmp_path / "updates"), f"sqlite:///{path}", new_key_file(tmp_path), store)
    store.close()


@pytest.fixture(params=["dir+sqlite", "s3+dynamodb"])
def any_site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    if request.param == "dir+sqlite":
        yield request.getfixturevalue("site")
        return
    request.getfixturevalue("aws")
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    create_table(TABLE)
    reports = ReportStore.from_url(f"dynamodb://{TABLE}")
    yield Site(tmp_path, f"s3://{BUCKET}/updates", f"dynamodb://{TABLE}", new_key_file(tmp_path), reports)


# ---------------------------------------------------------------- release --plan


def test_release_signs_the_plan_and_starts_at_its_first_step(site: Site) -> None:
    out = site.release(
        "--plan", "10,50,100", "--soak", "2h", "--max-failure-rate", "0.1", "--min-agents", "5"
    )
    assert out["percent"] == 10
    live = site.live()
    assert live.rollout.percent == 10 and live.signed_at is not None
    assert live.rollout_plan is not None
    assert live.rollout_plan.to_dict() == {
        "steps": [10, 50, 100],
        "soak": "2h",
        "max_failure_rate": "0.1",
        "min_agents": 5,
    }
    payload = json.loads(live.raw)
    assert payload["rollout_plan"]["max_failure_rate"] == "0.1"  # a string: the payload has no floats


def test_release_plan_defaults_and_a_rollout_that_repeats_the_first_step(site: Site) -> None:
    site.release("--plan", "25,100", "--rollout", "25")
    plan = site.live().rollout_plan
    assert plan is not None and plan.to_dict() == {
        "steps": [25, 100],
        "soak": "2h",
        "max_failure_rate": "0.05",
        "min_agents": 20,
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--plan", "10,50,100", "--rollout", "50"), "--rollout 50 disagrees with --plan 10,50,100"),
        (("--plan", "10,50,100", "--rollout", "100"), "the plan's first step is the starting percent (10)"),
        (("--plan", "50,10,100"), "10 after 50"),
        (("--plan", "10,50"), "the last step must be 100"),
        (("--plan", "0,100"), "'0' is not a percent"),
        (("--plan", "10,100", "--soak", "soon"), "--soak 'soon'"),
        (("--plan", "10,100", "--max-failure-rate", "5%"), "--max-failure-rate '5%'"),
        (("--plan", "10,100", "--min-agents", "0"), "--min-agents 0"),
        (("--soak", "1h"), "--soak set a rollout plan's thresholds: give --plan too"),
        (("--max-failure-rate", "0.1", "--min-agents", "3"), "--max-failure-rate, --min-agents set"),
    ],
)
def test_bad_plans_are_refused_before_anything_is_written(
    site: Site, args: tuple[str, ...], message: str
) -> None:
    done = site.release(*args, code=2)
    assert message in done.stderr, done.stderr
    assert not Path(site.store).exists()


def test_every_re_sign_keeps_the_plan(site: Site) -> None:
    site.release("--plan", "10,50,100", "--soak", "1h")
    plan = site.live().rollout_plan
    for command in (("rollout", "50"), ("halt",), ("refresh",), ("rollout", "10")):
        done = cli(*command, *site.signing)
        assert done.exit_code == 0, done.stderr
        assert site.live().rollout_plan == plan, command


def test_a_release_without_a_plan_has_nothing_to_progress(site: Site) -> None:
    site.release("--rollout", "10")
    before = site.state()
    done = cli("progress", *site.signing, "--json")  # no --reports needed: nothing to judge
    assert done.exit_code == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["action"], out["percent"], out["next_percent"], out["next_at"], out["canary"]) == (
        "no_plan", 10, None, None, None
    )  # fmt: skip
    assert site.state() == before


# ---------------------------------------------------------------- progress


def at(moment: datetime | None) -> tuple[str, str]:
    """``--now`` pinned to ``moment``: "right after" a step began, however slow the machine (moto)."""
    assert moment is not None
    return ("--now", moment.strftime("%Y-%m-%dT%H:%M:%SZ"))


def test_a_plan_climbs_waiting_advanced_waiting_then_complete(any_site: Site) -> None:
    site = any_site
    soak = 2
    site.release("--plan", "10,50,100", "--soak", f"{soak}s", "--min-agents", "20")
    first = site.live()

    code, out, _ = site.progress(*at(first.signed_at))  # right after the release
    assert code == 0 and out["action"] == "waiting"
    assert (out["version"], out["serial"], out["percent"], out["next_percent"]) == (
        VERSION,
        first.serial,
        10,
        50,
    )
    assert parse_time(out["next_at"]) == first.signed_at + timedelta(seconds=soak)
    assert set(out) >= {"action", "version", "serial", "percent", "next_percent", "next_at", "canary"}

    wave = agents_in_wave(4, 10)
    site.committed(*wave)  # the whole wave (4 agents, 3 needed) updated and stayed healthy
    before = site.state()
    code, out, _ = site.progress(*at(first.signed_at))
    assert (
        code == 0 and out["action"] == "waiting" and site.state() == before
    )  # still soaking: nothing signed

    soak_over(first, soak)
    code, out, _ = site.progress()  # the real clock from here on
    second = site.live()
    assert code == 0 and out["action"] == "advanced", out
    assert (second.serial, second.rollout.percent, second.rollout.salt) == (
        first.serial + 1,
        50,
        first.rollout.salt,
    )
    assert second.rollout_plan == first.rollout_plan and second.binaries == first.binaries
    assert (out["serial"], out["percent"], out["next_percent"]) == (second.serial, 50, 100)
    assert parse_time(out["next_at"]) == second.signed_at + timedelta(seconds=soak)
    assert (
        out["canary"]["verdict"] == "pass"
        and out["canary"]["ended"] == 4
        and out["canary"]["min_agents"] == 3
    )

    before = site.state()
    code, out, _ = site.progress(*at(second.signed_at))  # right after advancing: the new step soaks first
    assert code == 0 and out["action"] == "waiting" and out["serial"] == second.serial
    assert site.state() == before

    more = agents_in_wave(4, 50, start=int(wave[-1].split("-")[1]) + 1)
    site.committed(*more)
    soak_over(second, soak)
    code, out, _ = site.progress()
    assert code == 0 and out["action"] == "advanced" and site.live().rollout.percent == 100
    assert (out["next_percent"], out["next_at"]) == (None, None)

    before = site.state()
    code, out, _ = site.progress()
    assert code == 0 and out["action"] == "complete" and out["percent"] == 100
    assert site.state() == before


def test_failures_halt_the_release_mid_soak_and_nothing_is_signed_after(any_site: Site) -> None:
    site = any_site
    site.release("--plan", "10,50,100", "--soak", "1h", "--max-failure-rate", "0.05")
    first = site.live()
    wave = agents_in_wave(4, 10)
    site.committed(*wave[:3])
    site.rolled_back(wave[3])  # 1 of 4 ended attempts: 25 % > 5 %, and 4 >= 3 needed

    code, out, _ = site.progress()
    assert code == 5 and out["action"] == "halted_now", out
    halted = site.live()
    assert (halted.serial, halted.rollout.percent, halted.rollout_plan) == (
        first.serial + 1,
        0,
        first.rollout_plan,
    )
    assert (out["serial"], out["percent"], out["next_percent"], out["next_at"]) == (
        halted.serial,
        0,
        None,
        None,
    )
    assert out["canary"]["verdict"] == "fail" and out["canary"]["rolled_back"] == 1

    before = site.state()
    for _ in range(2):
        code, out, _ = site.progress()
        assert code == 0 and out["action"] == "halted" and out["serial"] == halted.serial
    assert site.state() == before


def test_too_few_reports_hold_after_the_soak(site: Site) -> None:
    site.release("--plan", "10,50,100", "--soak", "1s", "--min-agents", "20")
    wave = agents_in_wave(10, 10)
    site.committed(*wave[:2])
    site.known(*wave[2:])  # 10 in the wave: 9 needed, 2 ended
    soak_over(site.live(), 1)
    before = site.state()
    code, out, _ = site.progress()
    assert code == 4 and out["action"] == "hold", out
    assert (
        out["canary"]["verdict"] == "hold"
        and out["canary"]["ended"] == 2
        and out["canary"]["min_agents"] == 9
    )
    assert out["in_wave"] == 10 and out["percent"] == 10 and out["next_percent"] == 50
    assert site.state() == before
    site.committed(*wave[2:9])  # 9 of 10: enough
    code, out, _ = site.progress()
    assert code == 0 and out["action"] == "advanced"


def test_an_empty_fleet_holds_and_never_advances(site: Site) -> None:
    site.release("--plan", "1,100", "--soak", "1s")
    soak_over(site.live(), 1)
    before = site.state()
    for now in ([], ["--now", (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")]):
        code, out, _ = site.progress(*now)
        assert code == 4 and out["action"] == "hold"
        assert out["in_wave"] == 0 and out["canary"]["ended"] == 0 and out["canary"]["min_agents"] == 1
    assert site.state() == before


def test_a_step_skipped_by_hand_continues_from_there(site: Site) -> None:
    site.release("--plan", "10,50,100", "--soak", "1h")
    assert cli("rollout", "50", *site.signing).exit_code == 0
    code, out, _ = site.progress()
    assert (code, out["action"], out["percent"], out["next_percent"]) == (0, "waiting", 50, 100)
    assert parse_time(out["next_at"]) == site.live().signed_at + timedelta(hours=1)  # the soak restarts at 50
    assert cli("rollout", "100", *site.signing).exit_code == 0
    code, out, _ = site.progress()
    assert (code, out["action"]) == (0, "complete")


def test_a_halted_plan_is_resumed_by_hand_and_soaks_again(site: Site) -> None:
    site.release("--plan", "10,50,100", "--soak", "1h")
    assert cli("halt", *site.signing).exit_code == 0
    code, out, _ = site.progress()
    assert (code, out["action"], out["next_percent"], out["next_at"]) == (0, "halted", None, None)
    assert cli("rollout", "10", *site.signing).exit_code == 0
    code, out, _ = site.progress()
    assert (code, out["action"], out["percent"]) == (0, "waiting", 10)
    assert parse_time(out["next_at"]) == site.live().signed_at + timedelta(hours=1)


def test_dry_run_decides_but_writes_nothing(site: Site) -> None:
    site.release("--plan", "10,100", "--soak", "1s")
    site.committed(*agents_in_wave(2, 10))
    soak_over(site.live(), 1)
    before = site.state()
    code, out, _ = site.progress("--dry-run")
    assert code == 0 and out["action"] == "advanced" and out["dry_run"] is True and out["percent"] == 100
    assert site.state() == before
    code, out, _ = site.progress()
    assert code == 0 and out["action"] == "advanced" and out["dry_run"] is False


def test_progress_text_says_what_it_did_and_why(site: Site) -> None:
    site.release("--plan", "10,50,100", "--soak", "1h")
    done = cli("progress", "--reports", site.reports, *site.signing)
    assert done.exit_code == 0, done.stderr
    text = done.stdout
    assert text.startswith(f"progress {VERSION}: WAITING (exit 0)")
    assert "10 → 50 → 100 %, soak 1h, max failure rate 0.05, min agents 20" in text
    assert "50 % is due at" in text and "canary       hold: 0 attempt(s) ended, 1 needed" in text

    wave = agents_in_wave(2, 10)
    site.rolled_back(*wave)
    done = cli("progress", "--reports", site.reports, *site.signing)
    assert done.exit_code == 5, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"progress {VERSION}: HALTED NOW at 0 % (serial 2) (exit 5)"
    assert (
        "2 of 2 ended attempts at 0.1.44 failed or rolled back (100.0 %, above the plan's 5.0 %)" in lines[1]
    )
    assert f"    {wave[0]}: rolled_back" in lines


def test_progress_refuses_without_a_key_or_a_reports_store(site: Site) -> None:
    site.release("--plan", "10,100")
    done = cli("progress", "--reports", site.reports, "--store", site.store)
    assert done.exit_code == 2 and "--key" in done.stderr
    done = cli("progress", *site.signing)
    assert done.exit_code == 2 and "--reports" in done.stderr
    done = cli("progress", "--reports", "sqlite:///nowhere/reports.db", *site.signing)
    assert done.exit_code == 2 and "no reports database" in done.stderr


def test_progress_refuses_a_live_manifest_signed_by_a_key_it_does_not_trust(
    site: Site, tmp_path: Path
) -> None:
    site.release("--plan", "10,100")
    stranger = new_key_file(tmp_path, "stranger.pem")
    before = snapshot(Path(site.store))
    done = cli("progress", "--reports", site.reports, "--key", str(stranger.path), "--store", site.store)
    assert done.exit_code == 3 and "does not verify" in done.stderr
    assert snapshot(Path(site.store)) == before


# ---------------------------------------------------------------- show


def test_show_prints_the_plan_the_step_and_the_next_due_time(site: Site) -> None:
    site.release("--plan", "10,50,100", "--soak", "2h")
    soak_over(site.live(), 1)  # the refresh is signed at a later second
    assert cli("refresh", *site.signing).exit_code == 0  # a refresh does not restart the step
    first = json.loads(cli("history", *site.signing, "--json").stdout)[-1]
    done = cli("show", "--store", site.store)
    assert done.exit_code == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "plan         10 → 50 → 100 %, soak 2h, max failure rate 0.05, min agents 20" in lines
    assert f"plan step    [10] → 50 → 100 % (step 1 of 3, since {first['signed_at']})" in lines
    due = (parse_time(first["signed_at"]) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert f"next step    50 % at {due} if healthy (`avika-publish progress` takes it)" in lines

    shown = json.loads(cli("show", "--store", site.store, "--json").stdout)
    assert shown["rollout_plan"]["steps"] == [10, 50, 100]
    status = shown["plan_status"]
    assert (status["percent"], status["step"], status["of"], status["next_percent"]) == (10, 1, 3, 50)
    assert (status["step_started_at"], status["next_at"], status["due"]) == (first["signed_at"], due, False)

    assert cli("halt", *site.signing).exit_code == 0
    shown = json.loads(cli("show", "--store", site.store, "--json").stdout)
    assert shown["plan_status"]["halted"] and shown["plan_status"]["next_at"] is None
    assert "halted at 0 % since" in cli("show", "--store", site.store).stdout


def test_show_without_a_plan_is_unchanged(site: Site) -> None:
    site.release()
    shown = json.loads(cli("show", "--store", site.store, "--json").stdout)
    assert "plan_status" not in shown and shown["rollout_plan"] is None
    assert "plan         -" in cli("show", "--store", site.store).stdout.splitlines()


def test_the_console_reads_the_plan_status_of_the_verified_live_release(site: Site) -> None:
    from publisher.progress import release_plan_status
    from publisher.stores import DirStore

    store = DirStore(Path(site.store))
    assert release_plan_status(store, [site.key.public]) is None  # nothing published
    site.release("--plan", "10,50,100", "--soak", "1h")
    live, before = site.live(), site.state()
    status = release_plan_status(store, [site.key.public])
    assert status is not None and (status["percent"], status["next_percent"]) == (10, 50)
    assert status["next_at"] == (live.signed_at + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "verdict" not in status
    site.rolled_back(*agents_in_wave(2, 10))
    judged = release_plan_status(store, [site.key.public], site.report_store)
    assert judged is not None and (judged["verdict"], judged["action"]) == ("fail", "halted_now")
    assert release_plan_status(store, [new_key_file(site.tmp, "other.pem").public]) is None  # not trusted
    assert site.state() == before  # only read: a "fail" verdict here signs nothing


def test_show_over_http_finds_when_the_step_began_from_the_archive(site: Site) -> None:
    import threading

    from publisher.serve import make_server

    site.release("--plan", "10,50,100", "--soak", "1h")
    first = site.live()
    soak_over(first, 1)  # the refreshes are signed at a later second than the release
    for _ in range(2):
        assert cli("refresh", *site.signing).exit_code == 0  # serials 2 and 3: the same step
    assert site.live().signed_at > first.signed_at
    server = make_server(Path(site.store), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        shown = json.loads(cli("show", "--url", server.url, "--json").stdout)
    finally:
        server.shutdown()
        server.server_close()
    assert shown["serial"] == 3
    assert shown["plan_status"]["step_started_at"] == first.signed_at.strftime("%Y-%m-%dT%H:%M:%SZ")
