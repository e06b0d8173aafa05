"""Every GitHub Actions workflow in .github/workflows/ is valid and hardened.

- It validates against the GitHub workflow schema (check-jsonschema's vendored copy, no network).
- zizmor (offline audits) finds nothing: no template injection, no persisted checkout credentials,
  no excessive permissions, no unpinned actions.
- Every `uses:` names a full 40-hex commit SHA with a `# vX` comment saying which release it is.
- No `run:` script contains `${{ }}`: values reach scripts through `env:` only, so a tag or branch
  name can never become shell code.
- What they decide (tests/workflow_sim.py evaluates step conditions with GitHub's rules; guard and
  judgement scripts run under bash with a recording stand-in for avika-publish):
  - maintenance runs hourly; progress, refresh and the break-glass rollout run whatever the canary (or
    anything else after the role was assumed) did; the canary leaves planned and halted releases alone;
  - a missing (or "None") repository variable fails the job's first step, naming the variable; the
    store must be an s3:// URL; the build refuses empty or `none` public keys;
  - the break glass accepts only 0-100; canary and progress exit codes map to hold (4 = ok) and halt (5);
  - one runner builds both agent files and checks their embedded version, platform and keys;
  - jobs that can sign install only requirements/release.lock (hash-pinned) and the checkout itself.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.workflow_sim import evaluate, run_job, run_step_script

WORKFLOW_DIR = Path(__file__).resolve().parent.parent / ".github" / "workflows"
WORKFLOWS = sorted([*WORKFLOW_DIR.glob("*.yml"), *WORKFLOW_DIR.glob("*.yaml")])
PINNED = re.compile(r"^[^@\s]+@[0-9a-f]{40}$")
USES_LINE = re.compile(r"^\s*(?:-\s+)?uses:\s*(?P<ref>\S+)(?P<rest>.*)$")


def venv_tool(name: str) -> str:
    """The tool installed beside this interpreter (the project venv), else on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is not installed (pip install -e '.[dev]')"
    return found


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def steps_and_jobs(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    """Every job and every step: the places `uses:` and `run:` may appear."""
    found = []
    for job in workflow["jobs"].values():
        found.append(job)
        found += job.get("steps", [])
    return found


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_there_are_workflows_to_check() -> None:
    assert WORKFLOWS, "no workflow files found under .github/workflows"


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids(WORKFLOWS))
def test_workflow_matches_the_github_schema(path: Path) -> None:
    result = subprocess.run(
        [venv_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_finds_nothing() -> None:
    result = subprocess.run(
        [venv_tool("zizmor"), "--offline", "--no-progress", "--color", "never", *map(str, WORKFLOWS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids(WORKFLOWS))
def test_every_action_is_pinned_to_a_commit(path: Path) -> None:
    uses = [item["uses"] for item in steps_and_jobs(load(path)) if "uses" in item]
    unpinned = [ref for ref in uses if not ref.startswith("./") and not PINNED.match(ref)]
    assert unpinned == [], f"{path.name}: pin these by full commit SHA: {unpinned}"
    # The comment tells a reviewer (and Dependabot) which release the SHA is.
    for line in path.read_text().splitlines():
        match = USES_LINE.match(line)
        if match and not match["ref"].startswith("./"):
            assert re.search(r"#\s*v\d", match["rest"]), f"{path.name}: no '# vX' comment on: {line.strip()}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids(WORKFLOWS))
def test_no_expression_is_expanded_inside_a_script(path: Path) -> None:
    scripts = [item["run"] for item in steps_and_jobs(load(path)) if "run" in item]
    injected = [script for script in scripts if "${{" in script]
    assert injected == [], f"{path.name}: pass values through env:, not ${{{{ }}}} in run: {injected}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids(WORKFLOWS))
def test_checkout_never_persists_credentials(path: Path) -> None:
    for item in steps_and_jobs(load(path)):
        if str(item.get("uses", "")).startswith("actions/checkout@"):
            assert item.get("with", {}).get("persist-credentials") is False, path.name


# ------------------------------------------------------------ what the workflows decide (issues 10, 11, 14)
#
# Step conditions are evaluated by tests/workflow_sim.py with GitHub's rules (the implicit `success() &&`);
# guard and judgement scripts run for real under bash with a recording stand-in for avika-publish.

MAINTENANCE = WORKFLOW_DIR / "maintenance.yml"
RELEASE = WORKFLOW_DIR / "release.yml"
LOCK = WORKFLOW_DIR.parent.parent / "requirements" / "release.lock"
ED25519_KEY = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="


def job_of(path: Path, name: str) -> dict[str, Any]:
    return load(path)["jobs"][name]


def step_named(job: dict[str, Any], name: str) -> dict[str, Any]:
    (step,) = [s for s in job["steps"] if s.get("name") == name or s.get("id") == name]
    return step


def test_simulator_reproduces_the_implicit_success_of_a_bare_condition() -> None:
    # The old break-glass step: `if: ${{ inputs.rollout != '' }}` was skipped after a failed canary.
    job = {
        "steps": [
            {"id": "canary", "run": "exit 5"},
            {"id": "rollout", "if": "${{ inputs.rollout != '' }}", "run": "true"},
            {"id": "fixed", "if": "${{ !cancelled() && inputs.rollout != '' }}", "run": "true"},
        ]
    }
    run = run_job(job, {"canary": "failure"}, inputs={"rollout": "0"}, event_name="workflow_dispatch")
    assert run.skipped == ["rollout"]
    assert run.ran == ["canary", "fixed"]
    assert evaluate("inputs.rollout != ''", {"inputs": {}}) is False  # null == '' on a schedule
    assert evaluate("steps.a.outcome == 'SUCCESS'", {"steps": {"a": {"outcome": "success"}}}) is True


MAINTENANCE_SCENARIOS = [
    # (id, event, inputs, outcomes, cancel_after, expected to run among the judgement steps)
    ("hourly-healthy", "schedule", {}, {}, None, ["canary", "progress", "refresh"]),
    ("hourly-canary-halted", "schedule", {}, {"canary": "failure"}, None, ["canary", "progress", "refresh"]),
    (
        "hourly-progress-failed",
        "schedule",
        {},
        {"progress": "failure"},
        None,
        ["canary", "progress", "refresh"],
    ),
    (
        "halt-by-hand-after-canary-failed",
        "workflow_dispatch",
        {"rollout": "0", "force-refresh": False},
        {"canary": "failure"},
        None,
        ["canary", "progress", "refresh", "rollout"],
    ),
    (
        "resume-by-hand-after-everything-failed",
        "workflow_dispatch",
        {"rollout": "50", "force-refresh": False},
        {"canary": "failure", "progress": "failure", "refresh": "failure"},
        None,
        ["canary", "progress", "refresh", "rollout"],
    ),
    (
        "no-role-no-judgement",
        "workflow_dispatch",
        {"rollout": "50", "force-refresh": False},
        {"credentials": "failure"},
        None,
        [],
    ),
    (
        "bad-configuration-stops-everything",
        "workflow_dispatch",
        {"rollout": "50", "force-refresh": False},
        {"Check configuration": "failure"},
        None,
        [],
    ),
    ("cancelled", "workflow_dispatch", {"rollout": "50"}, {}, "canary", ["canary"]),
]


@pytest.mark.parametrize(
    ("event", "inputs", "outcomes", "cancel_after", "expected"),
    [s[1:] for s in MAINTENANCE_SCENARIOS],
    ids=[s[0] for s in MAINTENANCE_SCENARIOS],
)
def test_maintenance_steps_run_whatever_happened_before_them(
    event: str,
    inputs: dict[str, Any],
    outcomes: dict[str, str],
    cancel_after: str | None,
    expected: list[str],
) -> None:
    run = run_job(
        job_of(MAINTENANCE, "maintain"), outcomes, inputs=inputs, event_name=event, cancel_after=cancel_after
    )
    judgements = ["canary", "progress", "refresh", "rollout"]
    assert [key for key in run.ran if key in judgements] == expected


def test_maintenance_runs_at_least_hourly_with_progress() -> None:
    workflow = load(MAINTENANCE)
    # PyYAML reads the `on:` key as True.
    crons = [entry["cron"] for entry in workflow[True]["schedule"]]
    assert crons, "maintenance has no schedule"
    minute, hour, *rest = crons[0].split()
    assert minute.isdigit() and hour == "*" and rest == ["*", "*", "*"], crons[0]
    progress = step_named(job_of(MAINTENANCE, "maintain"), "progress")
    assert "avika-publish progress" in progress["run"]
    assert '--reports "dynamodb://$AVIKA_REPORTS_TABLE"' in progress["run"]
    assert "!cancelled()" in progress["if"]


def fake_publisher(root: Path) -> Path:
    """A recording avika-publish at .venv/bin: logs its arguments, answers from FAKE_* files and codes."""
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    tool = bin_dir / "avika-publish"
    tool.write_text(
        "#!/bin/bash\n"
        'printf "%s\\n" "$*" >> "$FAKE_LOG"\n'
        'case "$1" in\n'
        '  show) if [[ " $* " == *" --json "* ]]; then cat "$FAKE_SHOW_JSON"; else echo live; fi ;;\n'
        '  canary) exit "${FAKE_CANARY_RC:-0}" ;;\n'
        '  progress) echo \'{"action": "waiting"}\'; exit "${FAKE_PROGRESS_RC:-0}" ;;\n'
        '  inspect) cat "$FAKE_INSPECT_DIR/$(basename "$2").json" ;;\n'
        "esac\n"
    )
    tool.chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    return root / "calls.log"


MAINTENANCE_VARS = {
    "AVIKA_AWS_REGION": "eu-west-1",
    "AVIKA_MAINTENANCE_ROLE_ARN": "arn:aws:iam::111122223333:role/maintenance",
    "AVIKA_KMS_KEY_ID": "1234abcd-12ab-34cd-56ef-1234567890ab",
    "AVIKA_STORE": "s3://bucket/avika",
    "AVIKA_CLOUDFRONT_DISTRIBUTION_ID": "E2EXAMPLE",
    "AVIKA_REPORTS_TABLE": "avika-reports",
    "AVIKA_PUBLIC_KEYS": ED25519_KEY,
}
RELEASE_VARS = {
    "AVIKA_AWS_REGION": "eu-west-1",
    "AVIKA_RELEASE_ROLE_ARN": "arn:aws:iam::111122223333:role/release",
    "AVIKA_KMS_KEY_ID": "1234abcd-12ab-34cd-56ef-1234567890ab",
    "AVIKA_STORE": "s3://bucket/avika",
    "AVIKA_CLOUDFRONT_DISTRIBUTION_ID": "E2EXAMPLE",
    "AVIKA_PUBLIC_KEYS": ED25519_KEY,
    "AVIKA_REPORTS_URL": "https://api.example.com/v1/reports",
}
GUARDED = [
    (MAINTENANCE, "maintain", MAINTENANCE_VARS, name)
    for name in MAINTENANCE_VARS
    if name != "AVIKA_PUBLIC_KEYS"
] + [(RELEASE, "release", RELEASE_VARS, name) for name in RELEASE_VARS if name != "AVIKA_REPORTS_URL"]


@pytest.mark.parametrize("missing_as", ["", "None"], ids=["unset", "None"])
@pytest.mark.parametrize(
    ("path", "job", "vars_", "name"), GUARDED, ids=[f"{p.stem}-{n}" for p, _, _, n in GUARDED]
)
def test_a_missing_variable_fails_first_and_is_named(
    path: Path, job: str, vars_: dict[str, str], name: str, missing_as: str, tmp_path: Path
) -> None:
    job_def = job_of(path, job)
    guard = job_def["steps"][0]
    assert guard["name"] == "Check configuration", "the guard must be the job's first step"
    broken = {**vars_, name: missing_as} if missing_as else {k: v for k, v in vars_.items() if k != name}
    result = run_step_script(job_def, guard, broken, cwd=tmp_path)
    assert result.returncode != 0
    assert f"repository variable {name} is" in result.stdout
    assert run_step_script(job_def, guard, vars_, cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("store", ["/srv/avika", "None/avika", "file:///srv/avika", "updates"])
@pytest.mark.parametrize(
    ("path", "job", "vars_"),
    [(MAINTENANCE, "maintain", MAINTENANCE_VARS), (RELEASE, "release", RELEASE_VARS)],
    ids=["maintenance", "release"],
)
def test_the_store_must_be_an_s3_url(
    path: Path, job: str, vars_: dict[str, str], store: str, tmp_path: Path
) -> None:
    job_def = job_of(path, job)
    result = run_step_script(job_def, job_def["steps"][0], {**vars_, "AVIKA_STORE": store}, cwd=tmp_path)
    assert result.returncode != 0
    assert "AVIKA_STORE must be the stack's StoreUrl" in result.stdout


@pytest.mark.parametrize(("keys", "ok"), [("", False), ("None", False), ("none", False), (ED25519_KEY, True)])
def test_the_build_refuses_to_make_a_keyless_release_agent(keys: str, ok: bool, tmp_path: Path) -> None:
    build = job_of(RELEASE, "build")
    guard = build["steps"][0]
    assert guard["name"] == "Check configuration"
    vars_ = {"AVIKA_PUBLIC_KEYS": keys} if keys else {}
    result = run_step_script(build, guard, vars_, cwd=tmp_path)
    assert (result.returncode == 0) is ok, result.stdout + result.stderr
    if not ok:
        assert "AVIKA_PUBLIC_KEYS" in result.stdout


def run_maintenance_step(
    name: str, tmp_path: Path, live: dict[str, Any], inputs: dict[str, Any] | None = None, **codes: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    log = fake_publisher(tmp_path)
    show = tmp_path / "live.json.in"
    show.write_text(json.dumps(live))
    job = job_of(MAINTENANCE, "maintain")
    env = {"FAKE_LOG": str(log), "FAKE_SHOW_JSON": str(show), **codes}
    result = run_step_script(
        job, step_named(job, name), MAINTENANCE_VARS, cwd=tmp_path, inputs=inputs, extra_env=env
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return result, calls


LIVE = {"version": "0.1.44", "rollout": {"percent": 10, "salt": "0.1.44"}, "expires": "2099-01-01T00:00:00Z"}


@pytest.mark.parametrize(
    ("live", "canary_rc", "step_rc", "judged"),
    [
        (LIVE, "0", 0, True),
        (LIVE, "4", 0, True),
        (LIVE, "5", 5, True),
        (LIVE, "1", 1, True),
        ({**LIVE, "rollout": {"percent": 0, "salt": ""}}, "5", 0, False),
        ({**LIVE, "rollout_plan": {"steps": [10, 100], "soak": "2h"}}, "5", 0, False),
    ],
    ids=["healthy", "hold", "halted-now", "error", "already-halted", "planned-release"],
)
def test_canary_step_judges_only_unplanned_live_releases(
    live: dict[str, Any], canary_rc: str, step_rc: int, judged: bool, tmp_path: Path
) -> None:
    result, calls = run_maintenance_step("canary", tmp_path, live, FAKE_CANARY_RC=canary_rc)
    assert result.returncode == step_rc, result.stdout + result.stderr
    canaries = [c for c in calls if c.startswith("canary ")]
    if judged:
        (call,) = canaries
        assert call.startswith("canary 0.1.44 --max-failure-rate 0.05 --min-agents 20 --halt")
        assert "--reports dynamodb://avika-reports" in call
        assert "--kms-key-id 1234abcd-12ab-34cd-56ef-1234567890ab" in call
    else:
        assert canaries == []


@pytest.mark.parametrize(("rc", "step_rc"), [("0", 0), ("4", 0), ("5", 5), ("1", 1), ("2", 2)])
def test_progress_step_maps_exit_codes(rc: str, step_rc: int, tmp_path: Path) -> None:
    result, calls = run_maintenance_step("progress", tmp_path, LIVE, FAKE_PROGRESS_RC=rc)
    assert result.returncode == step_rc, result.stdout + result.stderr
    (call,) = calls
    assert call.startswith("progress --json --reports dynamodb://avika-reports --kms-key-id ")
    assert "--store s3://bucket/avika --cloudfront-distribution E2EXAMPLE" in call


@pytest.mark.parametrize(
    ("percent", "step_rc", "signed"),
    [
        ("0", 0, True),
        ("50", 0, True),
        ("100", 0, True),
        ("101", 2, False),
        ("abc", 2, False),
        ("-1", 2, False),
    ],
)
def test_break_glass_validates_the_percent_before_signing(
    percent: str, step_rc: int, signed: bool, tmp_path: Path
) -> None:
    result, calls = run_maintenance_step("rollout", tmp_path, LIVE, inputs={"rollout": percent})
    assert result.returncode == step_rc, result.stdout + result.stderr
    rollouts = [c for c in calls if c.startswith("rollout ")]
    assert rollouts == (
        [
            f"rollout {percent} --kms-key-id 1234abcd-12ab-34cd-56ef-1234567890ab "
            "--store s3://bucket/avika --cloudfront-distribution E2EXAMPLE"
        ]
        if signed
        else []
    )


def inspect_metadata(version: str, platform: str, key_ids: list[str]) -> dict[str, Any]:
    return {"version": version, "platform": platform, "pythons": ["3.9", "3.13"], "key_ids": key_ids}


def run_file_check(
    tmp_path: Path, amd64: dict[str, Any], arm64: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    from agent.manifest import parse_public_keys

    log = fake_publisher(tmp_path)
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "avika-agent-linux-amd64").write_text(f"print({amd64['version']!r})\n")
    (dist / "avika-agent-linux-arm64").write_bytes(b"\x7fELF-aarch64-not-runnable-here")
    inspected = tmp_path / "inspected"
    inspected.mkdir()
    (inspected / "avika-agent-linux-amd64.json").write_text(json.dumps(amd64))
    (inspected / "avika-agent-linux-arm64.json").write_text(json.dumps(arm64))
    assert [k.keyid for k in parse_public_keys(ED25519_KEY)]
    build = job_of(RELEASE, "build")
    return run_step_script(
        build,
        step_named(build, "Check the files"),
        {"AVIKA_PUBLIC_KEYS": ED25519_KEY},
        cwd=tmp_path,
        github={"ref_name": "v0.1.44"},
        extra_env={
            "FAKE_LOG": str(log),
            "FAKE_INSPECT_DIR": str(inspected),
            "PYTHONPATH": str(WORKFLOW_DIR.parent.parent),
        },
    )


def test_release_build_checks_both_files_metadata(tmp_path: Path) -> None:
    from agent.manifest import parse_public_keys

    keyids = [k.keyid for k in parse_public_keys(ED25519_KEY)]
    good = run_file_check(
        tmp_path / "good",
        inspect_metadata("0.1.44", "linux-amd64", keyids),
        inspect_metadata("0.1.44", "linux-arm64", keyids),
    )
    assert good.returncode == 0, good.stdout + good.stderr
    for name, arm64, complaint in [
        ("amd64-as-arm64", inspect_metadata("0.1.44", "linux-amd64", keyids), "platform is 'linux-amd64'"),
        ("old-version", inspect_metadata("0.1.43", "linux-arm64", keyids), "version is '0.1.43'"),
        ("keyless", inspect_metadata("0.1.44", "linux-arm64", []), "embeds keys []"),
    ]:
        bad = run_file_check(tmp_path / name, inspect_metadata("0.1.44", "linux-amd64", keyids), arm64)
        assert bad.returncode != 0, name
        assert complaint in bad.stdout, (name, bad.stdout)


def test_release_builds_both_platforms_on_one_runner() -> None:
    build = job_of(RELEASE, "build")
    assert "strategy" not in build, "one runner builds both files (DESIGN 7)"
    script = "\n".join(s.get("run", "") for s in build["steps"])
    builds = [line for line in script.splitlines() if "make agent-binary" in line]
    assert len(builds) == 2, builds
    assert "PLATFORM=linux-arm64" in script
    assert 'avika-publish inspect "dist/avika-agent-$platform" --json' in script
    release = job_of(RELEASE, "release")
    assert release["needs"] == ["test", "build"]
    publish = step_named(release, "Publish")["run"]
    for platform in ("linux-amd64", "linux-arm64"):
        assert f"--binary {platform}=dist/avika-agent-{platform}" in publish


SIGNING_JOBS = [(RELEASE, "release"), (MAINTENANCE, "maintain")]


@pytest.mark.parametrize(("path", "job"), SIGNING_JOBS, ids=[f"{p.stem}-{j}" for p, j in SIGNING_JOBS])
def test_jobs_that_can_sign_install_only_hash_pinned_code(path: Path, job: str) -> None:
    job_def = job_of(path, job)
    assert job_def["permissions"].get("id-token") == "write"
    installs = [
        line.strip()
        for step in job_def["steps"]
        for line in step.get("run", "").splitlines()
        if re.search(r"\bpip3?\b.*\binstall\b|\buv\b|\bpipx\b|\bpoetry\b", line)
    ]
    assert installs == [
        ".venv/bin/pip install --require-hashes --only-binary :all: -r requirements/release.lock",
        ".venv/bin/pip install --no-deps --no-build-isolation --no-index .",
    ]
    assert "make " not in "\n".join(s.get("run", "") for s in job_def["steps"]), "make installs .[dev]"
    assert LOCK.is_file()
