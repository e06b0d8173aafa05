"""`avika-agent version | detect | check` (DESIGN sections 2, 3, 7) against a real local HTTP server.

The manifests are signed in the test with the publisher's own code (LocalSigner + sign_envelope).
The agent's current version comes from a sidecar target (`UPDATE_TARGET`, a script printing its
version), which is also how the tests pick it. Every refusal must exit 3 with its code and leave
the trust state (highest serial, digest, cached envelope) exactly as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent import buildinfo, check, config, environment, lifecycle
from agent.cli import main
from agent.manifest import LocalSigner, ManifestError, generate_private_key, rollout_bucket, sign_envelope
from agent.state import CACHED_ENVELOPE, CACHED_ETAG, STATE_FILE, STATE_LOCK_FILE, AgentState, save_state
from tests.agent_fixtures import LocalServer, Release, publish, sha256

ROOT = Path(__file__).resolve().parent.parent
AGENT_BIN = ROOT / ".venv" / "bin" / "avika-agent"
AGENT_ID = "host-01.example.com"
CHECK_KEYS = [
    "current_version",
    "manifest_version",
    "serial",
    "mode",
    "agent_id",
    "bucket",
    "in_wave",
    "forced",
    "action",
    "reason",
]
PLATFORM = environment.platform_key()
OTHER_PLATFORM = "linux-riscv64"


def cli_runner() -> CliRunner:
    """stderr apart from stdout: click 8.2+ always, click 8.1 (what an agent file ships for 3.9) if asked."""
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


class Agent:
    """One agent's environment: state dir, sidecar target, settings; runs `check` via CliRunner."""

    def __init__(self, tmp_path: Path, server: LocalServer, release: Release) -> None:
        self.server, self.release = server, release
        self.state_dir = tmp_path / "state"
        self.target = tmp_path / "avika-agent-sidecar"
        self.env = {
            "UPDATE_SERVER": server.url("/updates"),
            "UPDATE_PUBLIC_KEYS": release.public_keys,
            "UPDATE_STATE_DIR": str(self.state_dir),
            "BUFFER_DIR": str(tmp_path / "data"),
            "AGENT_ID": AGENT_ID,
            "DEPLOYMENT_MODE": "vm",
            "UPDATE_TARGET": str(self.target),
        }
        self.set_version("0.1.40")

    def set_version(self, version: str) -> None:
        self.target.write_text(f'#!/bin/sh\necho "avika-agent version {version} (go1.22)"\n')
        self.target.chmod(0o755)

    def publish(self, **kw: Any) -> bytes:
        envelope = self.release.envelope(**kw)
        publish(self.server, envelope)
        return envelope

    def run(self, *args: str, **env: str) -> tuple[int, Any, str]:
        result = cli_runner().invoke(main, list(args), env={**self.env, **env}, catch_exceptions=False)
        out = result.stdout.strip()
        return result.exit_code, json.loads(out) if out.startswith("{") else out, result.stderr

    def check(self, **env: str) -> tuple[int, dict[str, Any]]:
        code, out, _ = self.run("check", **env)
        return code, out

    def config(self) -> config.AgentConfig:
        return config.load(None, self.env)

    def state(self) -> dict[str, Any]:
        return json.loads((self.state_dir / STATE_FILE).read_text())

    def trust_files(self) -> tuple[Any, Any, bytes, str]:
        state = self.state()
        envelope = (self.state_dir / CACHED_ENVELOPE).read_bytes()
        etag = (self.state_dir / CACHED_ETAG).read_text()
        return state["highest_serial"], state["highest_digest"], envelope, etag


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer() as srv:
        yield srv


@pytest.fixture
def agent(tmp_path: Path, server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> Agent:
    for key in config.KEYS:  # the developer's own settings must not leak in
        monkeypatch.delenv(key, raising=False)
    return Agent(tmp_path, server, Release())


# ---------------------------------------------------------------- version, detect


def test_version_prints_the_version_and_nothing_else() -> None:
    result = cli_runner().invoke(main, ["version"])
    assert (result.exit_code, result.stdout) == (0, buildinfo.VERSION + "\n")


def test_version_needs_no_config(agent: Agent) -> None:
    code, out, _ = agent.run("version", UPDATE_ROLLOUT_PERCENT="oops")
    assert (code, out) == (0, buildinfo.VERSION)


@pytest.mark.parametrize("mode", ["vm", "container"])
def test_detect_json_reports_the_override(agent: Agent, mode: str) -> None:
    code, out, _ = agent.run("detect", "--json", DEPLOYMENT_MODE=mode)
    assert code == 0
    assert list(out) == ["mode", "signals", "override"]
    assert (out["mode"], out["override"]) == (mode, mode)
    assert set(out["signals"]) <= {"KUBERNETES_SERVICE_HOST", *environment.FILE_SIGNALS}


def test_detect_without_override_matches_the_detector(agent: Agent) -> None:
    code, out, _ = agent.run("detect", "--json", DEPLOYMENT_MODE="")
    assert code == 0
    assert out == environment.detect(None).to_dict()


def test_detect_works_without_an_update_server(agent: Agent) -> None:
    code, out, _ = agent.run("detect", UPDATE_SERVER="", DEPLOYMENT_MODE="container")
    assert code == 0
    assert "mode: container" in out


def test_detect_refuses_a_bad_deployment_mode(agent: Agent) -> None:
    code, _, err = agent.run("detect", DEPLOYMENT_MODE="bare-metal")
    assert code == 2
    assert "DEPLOYMENT_MODE" in err and "bare-metal" in err


# ---------------------------------------------------------------- check: decisions


DECISIONS = [
    # id, current version, manifest fields, env, expected (action, reason, forced, in_wave)
    ("newer-version", "0.1.40", {}, {}, ("update", "newer_version", False, True)),
    ("up-to-date", "0.1.44", {}, {}, ("none", "up_to_date", False, True)),
    # AGENT_ID's bucket under salt 0.1.44 is 69: percent 69 leaves it just outside the wave.
    ("not-in-wave", "0.1.40", {"percent": 69}, {}, ("none", "not_in_wave", False, False)),
    ("halted", "0.1.40", {"percent": 0}, {}, ("none", "halted", False, False)),
    ("local-cap", "0.1.40", {}, {"UPDATE_ROLLOUT_PERCENT": "0"}, ("none", "not_in_wave", False, False)),
    (
        "container-reports",
        "0.1.40",
        {},
        {"DEPLOYMENT_MODE": "container"},
        ("report", "container", False, True),
    ),
    (
        "container-reports-outside-wave",
        "0.1.40",
        {"percent": 69},
        {"DEPLOYMENT_MODE": "container"},
        ("report", "container", False, False),
    ),
    (
        "container-quiet-when-halted",
        "0.1.40",
        {"percent": 0},
        {"DEPLOYMENT_MODE": "container"},
        ("none", "halted", False, False),
    ),
    (
        "forced-min-version-skips-a-halt",
        "0.1.40",
        {"percent": 0, "min_version": "0.1.42"},
        {},
        ("update", "below_min_version", True, False),
    ),
    ("signal-only", "0.1.40", {}, {"UPDATE_MODE": "signal-only"}, ("report", "signal_only", False, True)),
    (
        "vm-only-in-container",
        "0.1.40",
        {},
        {"UPDATE_MODE": "vm-only", "DEPLOYMENT_MODE": "container"},
        ("none", "vm_only_in_container", False, True),
    ),
    (
        "forced-min-version-skips-the-wave",
        "0.1.40",
        {"percent": 0, "min_version": "0.1.42"},
        {"UPDATE_ROLLOUT_PERCENT": "0"},
        ("update", "below_min_version", True, False),
    ),
    ("older-ignored", "0.1.40", {"version": "0.1.38"}, {}, ("none", "older_than_running", False, True)),
    (
        "signed-downgrade",
        "0.1.40",
        {"version": "0.1.38", "downgrade": True},
        {},
        ("update", "downgrade", False, True),
    ),
]


@pytest.mark.parametrize(
    ("current", "fields", "env", "expected"), [d[1:] for d in DECISIONS], ids=[d[0] for d in DECISIONS]
)
def test_check_decides(
    agent: Agent, current: str, fields: dict[str, Any], env: dict[str, str], expected: tuple[Any, ...]
) -> None:
    agent.set_version(current)
    agent.publish(serial=7, salt="0.1.44", **fields)
    code, out = agent.check(**env)
    assert code == 0, out
    assert list(out) == CHECK_KEYS
    assert (out["action"], out["reason"], out["forced"], out["in_wave"]) == expected
    assert out["current_version"] == current
    assert out["manifest_version"] == fields.get("version", "0.1.44")
    assert out["serial"] == 7
    assert out["mode"] == env.get("DEPLOYMENT_MODE", "vm")
    assert out["agent_id"] == AGENT_ID
    assert out["bucket"] == rollout_bucket(AGENT_ID, "0.1.44")


def test_check_without_agent_id_generates_and_keeps_one(agent: Agent) -> None:
    del agent.env["AGENT_ID"]
    agent.publish()
    _, first = agent.check()
    _, second = agent.check()
    assert first["agent_id"] and first["agent_id"] == second["agent_id"]


def test_check_reads_the_config_file(agent: Agent, tmp_path: Path) -> None:
    conf = tmp_path / "avika-agent.conf"
    conf.write_text("".join(f'{key}="{value}"\n' for key, value in agent.env.items()))
    agent.env = {}
    agent.publish(serial=3)
    code, out, _ = agent.run("check", "--config", str(conf))
    assert (code, out["serial"], out["action"]) == (0, 3, "update")


def test_check_records_state(agent: Agent) -> None:
    envelope = agent.publish(serial=5)
    assert agent.check()[0] == 0
    state = agent.state()
    assert state["highest_serial"] == 5
    assert len(state["highest_digest"]) == 64
    assert state["last_result"] == "update"
    assert state["last_error"] is None
    assert datetime.fromisoformat(state["last_check"].replace("Z", "+00:00")) <= datetime.now(timezone.utc)
    assert (agent.state_dir / CACHED_ENVELOPE).read_bytes() == envelope
    # atomic writes leave no temp file behind (the state lock's file stays: it is never replaced)
    names = {p.name for p in agent.state_dir.iterdir()}
    assert names == {CACHED_ENVELOPE, CACHED_ETAG, STATE_FILE, STATE_LOCK_FILE}


# ---------------------------------------------------------------- check: bad versions

# DESIGN section 4: a crash blocks (version, sha256) for good; a missed commit deadline only
# until its back-off (interval * 2**failures) ends. (id, reason, seconds since the rollback, expected)
BAD_VERSIONS = [
    ("crash-long-ago", "too_many_boots", 86400, ("none", "bad_version")),
    ("died-long-ago", "died_before_commit", 86400, ("none", "bad_version")),
    ("deadline-backing-off", "commit_deadline_passed", 10, ("none", "bad_version")),
    ("deadline-backoff-over", "commit_deadline_passed", 3600, ("update", "newer_version")),
]


def remember_rollback(agent: Agent, reason: str, seconds_ago: int, binary: bytes = b"new agent\n") -> None:
    """state.json as a rollback of 0.1.44 (the Release default) ``seconds_ago`` leaves it."""
    when = datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)
    state = AgentState(bad_versions=lifecycle.remember_bad([], "0.1.44", sha256(binary), reason, now=when))
    if reason not in lifecycle.PERMANENT_REASONS:  # as lifecycle.rollback records it: 120 s back-off
        state.attempts = lifecycle.record_failure({}, "0.1.44", sha256(binary), reason, now=when, interval=60)
    save_state(agent.state_dir, state)


@pytest.mark.parametrize(
    ("reason", "seconds_ago", "expected"), [b[1:] for b in BAD_VERSIONS], ids=[b[0] for b in BAD_VERSIONS]
)
def test_check_says_bad_version_only_while_the_version_is_blocked(
    agent: Agent, reason: str, seconds_ago: int, expected: tuple[str, str]
) -> None:
    remember_rollback(agent, reason, seconds_ago)
    agent.publish(serial=3)
    code, out = agent.check()
    assert code == 0, out
    assert (out["action"], out["reason"]) == expected
    assert agent.state()["last_result"] == expected[0]
    code, out, _ = agent.run("update", "--log-format", "json")  # the same rule decides `update`
    if expected[0] == "none":
        assert (code, out["action"], out["reason"]) == (0, *expected)


def test_other_bytes_of_a_crashed_version_are_not_blocked(agent: Agent) -> None:
    remember_rollback(agent, "too_many_boots", 10, binary=b"the build that crashed\n")
    agent.publish(serial=3)
    assert agent.check()[1]["reason"] == "newer_version"


def test_update_force_retries_a_missed_deadline_during_its_backoff_but_never_a_crash(agent: Agent) -> None:
    digest = sha256(b"new agent\n")
    binary_path = f"/updates/binaries/0.1.44/{digest}/avika-agent-{PLATFORM}"
    agent.publish(serial=3)
    remember_rollback(agent, "too_many_boots", 10)
    code, out, _ = agent.run("update", "--force")
    assert (code, out["action"], out["reason"]) == (0, "none", "bad_version")
    assert agent.server.count(binary_path) == 0
    remember_rollback(agent, "commit_deadline_passed", 10)
    assert agent.check()[1]["reason"] == "bad_version"  # backing off
    agent.run("update", "--force")  # tries the download (which 404s here: the attempt is what counts)
    assert agent.server.count(binary_path) == 1


# ---------------------------------------------------------------- check: refusals


def _bad_payload(release: Release, **fields: Any) -> bytes:
    obj = release.manifest(serial=6).to_dict()
    obj.update(fields)
    return json.dumps(obj).encode()


def _rejections() -> list[tuple[str, Any, dict[str, str]]]:
    other = LocalSigner(generate_private_key())
    return [
        ("too_large", lambda r: b"{" + b" " * (1 << 20) + b"}", {}),
        ("malformed_envelope", lambda r: b"<html>Service Unavailable</html>", {}),
        (
            "wrong_payload_type",
            lambda r: sign_envelope(
                r.manifest(serial=6).to_payload(), r.signers, payload_type="application/json"
            ),
            {},
        ),
        ("signature_invalid", lambda r: r.envelope(serial=6, signers=[other]), {}),
        (
            "threshold_not_met",
            lambda r: r.envelope(serial=6),
            {"UPDATE_SIGNATURE_THRESHOLD": "2", "EXTRA_KEY": other.public_key.b64},
        ),
        ("malformed_manifest", lambda r: r.envelope(payload=_bad_payload(r, serial=6.0)), {}),
        ("expired", lambda r: r.envelope(serial=6, expires_in=timedelta(hours=-1)), {}),
        ("serial_rollback", lambda r: r.envelope(serial=4), {}),
        (
            "bad_url",
            lambda r: r.envelope(payload=_bad_payload(r, binaries=_binaries(r, url="file:///etc/passwd"))),
            {},
        ),
        ("no_binary_for_platform", lambda r: r.envelope(serial=6, platforms=(OTHER_PLATFORM,)), {}),
    ]


def _binaries(release: Release, url: str) -> dict[str, Any]:
    entry = release.manifest().to_dict()["binaries"][PLATFORM]
    return {PLATFORM: {**entry, "url": url}}


REJECTIONS = _rejections()


@pytest.mark.parametrize(("code", "make", "env"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_refused_manifest_exits_3_and_keeps_trust_state(
    agent: Agent, code: str, make: Any, env: dict[str, str]
) -> None:
    agent.publish(serial=5)
    assert agent.check()[0] == 0
    before = agent.trust_files()

    env = dict(env)
    extra_key = env.pop("EXTRA_KEY", None)
    if extra_key:
        agent.env["UPDATE_PUBLIC_KEYS"] += "," + extra_key
    publish(agent.server, make(agent.release))
    exit_code, out = agent.check(**env)

    assert exit_code == 3, out
    assert out["error"] == code
    assert out["message"]
    assert agent.trust_files() == before
    assert agent.state()["last_error"]["code"] == code
    assert agent.state()["last_error"]["state"] == "checking"
    assert agent.state()["last_result"] == "error"


def test_replayed_older_manifest_is_serial_rollback(agent: Agent) -> None:
    old = agent.publish(serial=8)
    agent.publish(serial=9)
    assert agent.check()[1]["serial"] == 9
    publish(agent.server, old)  # an attacker (or a stale CDN node) serves the old, validly signed one
    code, out = agent.check()
    assert (code, out["error"]) == (3, "serial_rollback")
    assert agent.state()["highest_serial"] == 9


def test_same_serial_with_other_content_is_serial_rollback(agent: Agent) -> None:
    agent.publish(serial=9, percent=10)
    assert agent.check()[0] == 0
    agent.publish(serial=9, percent=100)
    code, out = agent.check()
    assert (code, out["error"]) == (3, "serial_rollback")


def test_same_envelope_again_is_accepted(agent: Agent) -> None:
    envelope = agent.publish(serial=9)
    assert agent.check()[0] == 0
    agent.server.serve("/updates/manifest.json", envelope)  # no ETag: a full 200 of the same bytes
    assert agent.check()[0] == 0


def test_higher_serial_after_a_refusal_is_accepted(agent: Agent) -> None:
    agent.publish(serial=5)
    agent.check()
    agent.publish(serial=6, expires_in=timedelta(hours=-1))
    assert agent.check()[0] == 3
    agent.publish(serial=7)
    code, out = agent.check()
    assert (code, out["serial"]) == (0, 7)
    assert agent.state()["last_error"] is None


# ---------------------------------------------------------------- check: ETag / 304


def test_304_reverifies_the_cached_envelope(agent: Agent) -> None:
    agent.publish(serial=5)
    first = agent.check()
    second = agent.check()
    assert first == second
    assert (
        agent.server.requests[1].headers["if-none-match"]
        == agent.server.routes["/updates/manifest.json"].etag
    )


def test_304_with_an_expired_cached_envelope_is_expired(agent: Agent) -> None:
    agent.publish(serial=5, expires_in=timedelta(hours=1))
    cfg = agent.config()
    assert check.check(cfg).status == 200
    with pytest.raises(ManifestError) as err:
        check.check(cfg, now=datetime.now(timezone.utc) + timedelta(hours=2))
    assert err.value.code == "expired"
    assert agent.server.count() == 2
    assert agent.server.requests[1].headers["if-none-match"]  # the server said 304: not modified
    assert agent.state()["last_error"]["code"] == "expired"


def test_304_without_a_cached_envelope_is_fetch_failed(agent: Agent) -> None:
    agent.server.serve("/updates/manifest.json", b"", status=304)
    code, out = agent.check()
    assert (code, out["error"]) == (1, "fetch_failed")


def test_etag_without_a_cached_envelope_is_not_sent(agent: Agent) -> None:
    agent.publish(serial=5)
    agent.check()
    (agent.state_dir / CACHED_ENVELOPE).unlink()
    assert agent.check()[0] == 0
    assert "if-none-match" not in agent.server.requests[1].headers


# ---------------------------------------------------------------- check: disabled, config, network


@pytest.mark.parametrize(
    "env", [{"UPDATE_MODE": "disabled"}, {"UPDATE_SERVER": "disabled"}], ids=["mode", "server"]
)
def test_disabled_fetches_nothing(agent: Agent, env: dict[str, str]) -> None:
    agent.publish()
    code, out = agent.check(**env)
    assert code == 0
    assert (out["action"], out["reason"], out["serial"]) == ("none", "disabled", None)
    assert agent.server.count() == 0
    assert not agent.state_dir.exists()


def test_invalid_config_exits_2_naming_key_and_value(agent: Agent) -> None:
    code, out, err = agent.run("check", UPDATE_ROLLOUT_PERCENT="150")
    assert code == 2
    assert out["error"] == "invalid_config"
    assert "UPDATE_ROLLOUT_PERCENT" in err and "150" in err
    assert agent.server.count() == 0


def test_threshold_above_key_count_is_invalid_config(agent: Agent) -> None:
    code, out, err = agent.run("check", UPDATE_SIGNATURE_THRESHOLD="2")
    assert (code, out["error"]) == (2, "invalid_config")
    assert "UPDATE_SIGNATURE_THRESHOLD" in err


@pytest.mark.parametrize("command", ["check", "detect"])
def test_missing_explicit_config_file_exits_2(agent: Agent, tmp_path: Path, command: str) -> None:
    code, out, err = agent.run(command, "--config", str(tmp_path / "nope.conf"))
    assert code == 2
    assert "nope.conf" in err
    if command == "check":
        assert out["error"] == "invalid_config"


def test_server_down_exits_1_fetch_failed(agent: Agent) -> None:
    agent.env["UPDATE_SERVER"] = "http://127.0.0.1:9/updates"  # discard port: refused
    code, out = agent.check()
    assert (code, out["error"]) == (1, "fetch_failed")
    assert agent.state()["last_error"]["code"] == "fetch_failed"


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_exits_1_naming_the_status(agent: Agent, status: int) -> None:
    agent.server.serve("/updates/manifest.json", b"oops", status=status)
    code, out = agent.check()
    assert (code, out["error"]) == (1, "fetch_failed")
    assert str(status) in out["message"]


def test_redirected_manifest_is_followed(agent: Agent) -> None:
    envelope = agent.release.envelope(serial=4)
    agent.server.serve("/updates/manifest.json", status=302, location="/cdn/manifest.json")
    agent.server.serve("/cdn/manifest.json", envelope)
    code, out = agent.check()
    assert (code, out["serial"]) == (0, 4)


# ---------------------------------------------------------------- current version


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("avika-agent version 0.1.44\n", "0.1.44"),
        ("avika-agent v0.1.44 (commit abc123, go1.22.1)", "0.1.44"),
        ("0.2.0rc1", "0.2.0rc1"),
        ("agent (1.2.3)", "1.2.3"),
        ("built with go1.22 version 2.0\n", "2.0"),
        ("no version here", None),
        ("", None),
    ],
)
def test_parse_version_output(text: str, expected: str | None) -> None:
    assert check.parse_version_output(text) == expected


def test_sidecar_that_fails_has_no_version(tmp_path: Path) -> None:
    target = tmp_path / "broken"
    target.write_text("#!/bin/sh\necho 'avika-agent 0.1.40'\nexit 1\n")
    target.chmod(0o755)
    assert check.target_version(target) is None
    assert check.target_version(tmp_path / "missing") is None


def test_running_executable_reports_the_build_version(agent: Agent) -> None:
    del agent.env["UPDATE_TARGET"]  # default: the running executable
    assert check.current_version(agent.config()) == buildinfo.VERSION


# ---------------------------------------------------------------- real processes


def _run_agent(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in config.KEYS}
    return subprocess.run(
        [str(AGENT_BIN), *args], env={**clean, **env}, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.slow
def test_installed_console_script(agent: Agent) -> None:
    done = _run_agent("version", env={})
    assert (done.returncode, done.stdout) == (0, buildinfo.VERSION + "\n")

    done = _run_agent("detect", "--json", env={"DEPLOYMENT_MODE": "container"})
    assert json.loads(done.stdout)["mode"] == "container"

    agent.publish(serial=12)
    done = _run_agent("check", env=agent.env)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["action"], out["serial"], out["current_version"]) == ("update", 12, "0.1.40")

    publish(agent.server, agent.release.envelope(serial=11))
    done = _run_agent("check", env=agent.env)
    assert done.returncode == 3
    assert json.loads(done.stdout)["error"] == "serial_rollback"
    assert "serial_rollback" in done.stderr  # logged too


def test_agent_commands_can_be_imported_before_agent_cli() -> None:
    # agent.commands once took its options from agent.cli, which imports agent.commands: a cycle
    # that broke whoever imported agent.commands first. The shared options live in agent.options.
    code = "import agent.commands\nfrom agent.cli import main\nprint(' '.join(sorted(main.commands)))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["check", "detect", "rollback", "run", "status", "update", "version"]


def test_every_agent_module_can_be_imported_first() -> None:
    code = (
        "import importlib, json, pkgutil, sys, agent\n"
        "failed = []\n"
        "for m in pkgutil.iter_modules(agent.__path__):\n"
        "    for name in [n for n in sys.modules if n == 'agent' or n.startswith('agent.')]:\n"
        "        del sys.modules[name]\n"
        "    try:\n"
        "        importlib.import_module('agent.' + m.name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{m.name}: {exc!r}')\n"
        "print(json.dumps(failed))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


@pytest.mark.slow
def test_agent_never_imports_boto3() -> None:
    code = (
        "import sys, pkgutil, importlib, agent\n"
        "for m in pkgutil.iter_modules(agent.__path__):\n"
        "    importlib.import_module('agent.' + m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('boto3', 'botocore', 's3transfer'))\n"
        "print(bad)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------- trust state survives a broken file
# DESIGN section 4: state.json is type-checked; a corrupt or mistyped one is set aside and the trust
# state is rebuilt from the cached verified envelope, never lowered. No file in the state dir can
# produce a traceback.


def _aside(agent: Agent) -> list[Path]:
    return sorted(agent.state_dir.glob(f"{STATE_FILE}.corrupt.*"))


def test_a_truncated_state_file_does_not_reopen_replay(agent: Agent) -> None:
    old = agent.publish(serial=8)
    assert agent.check()[0] == 0
    agent.publish(serial=9)
    assert agent.check()[1]["serial"] == 9
    state_bytes = (agent.state_dir / STATE_FILE).read_bytes()
    (agent.state_dir / STATE_FILE).write_bytes(state_bytes[: len(state_bytes) // 2])  # a torn write
    publish(agent.server, old)  # an attacker (or a stale CDN node) serves the older signed manifest

    code, out, err = agent.run("check")

    assert (code, out["error"]) == (3, "serial_rollback")
    assert agent.state()["highest_serial"] == 9
    assert [p.read_bytes() for p in _aside(agent)] == [state_bytes[: len(state_bytes) // 2]]
    assert "set aside" in err and "rebuilt from the cached manifest" in err


def test_a_mistyped_serial_is_set_aside_and_rebuilt_instead_of_crashing_every_check(agent: Agent) -> None:
    agent.publish(serial=9)
    assert agent.check()[0] == 0
    (agent.state_dir / STATE_FILE).write_text('{"highest_serial": "5"}')  # a TypeError before issue 10

    code, out, err = agent.run("check")

    assert (code, out["serial"], out["action"]) == (0, 9, "update")
    state = agent.state()
    assert (state["highest_serial"], state["highest_digest"]) == (9, agent.trust_files()[1])
    assert state["corrupt"] == str(_aside(agent)[0])
    assert "highest_serial '5'" in err


def test_a_valid_but_lowered_state_file_is_floored_by_the_cached_envelope(agent: Agent) -> None:
    old = agent.publish(serial=8)
    agent.publish(serial=9)
    assert agent.check()[1]["serial"] == 9
    save_state(agent.state_dir, AgentState(highest_serial=1))  # well-formed, and wrong
    publish(agent.server, old)
    code, out = agent.check()
    assert (code, out["error"]) == (3, "serial_rollback")
    assert agent.state()["highest_serial"] == 9


def test_a_cached_envelope_that_does_not_verify_never_raises_the_trust_state(agent: Agent) -> None:
    agent.publish(serial=9)
    assert agent.check()[0] == 0
    forged = agent.release.envelope(serial=500, signers=[LocalSigner(generate_private_key())])
    (agent.state_dir / CACHED_ENVELOPE).write_bytes(forged)
    (agent.state_dir / STATE_FILE).write_bytes(b"{")
    code, out = agent.check()  # nothing trusted is left: the served serial 9 is accepted again
    assert (code, out["serial"]) == (0, 9)
    assert agent.state()["highest_serial"] == 9
    assert (agent.state_dir / CACHED_ENVELOPE).read_bytes() != forged  # replaced by what verified


def test_an_expired_cached_envelope_still_rebuilds_the_serial(agent: Agent) -> None:
    agent.publish(serial=9, expires_in=timedelta(hours=1))
    cfg = agent.config()
    assert check.check(cfg).status == 200
    (agent.state_dir / STATE_FILE).write_bytes(b"")
    older = agent.release.envelope(serial=8)
    publish(agent.server, older)
    with pytest.raises(ManifestError) as err:
        check.check(cfg, now=datetime.now(timezone.utc) + timedelta(hours=3))  # the cache has expired by then
    assert err.value.code == "serial_rollback"


def test_a_corrupt_cached_envelope_is_fetched_whole_not_trusted_on_304(agent: Agent) -> None:
    agent.publish(serial=5)
    assert agent.check()[0] == 0
    (agent.state_dir / CACHED_ENVELOPE).write_bytes(b"\x00garbage")
    code, out = agent.check()
    assert (code, out["serial"]) == (0, 5)
    assert "if-none-match" not in agent.server.requests[-1].headers  # else a 304 every time, forever
    assert agent.state()["last_error"] is None
    assert agent.check()[0] == 0 and agent.server.requests[-1].headers["if-none-match"]  # healed


@pytest.mark.parametrize(
    "etag",
    [b'"abc"\r\nX-Injected: 1', b"\xff\xfe", b"x" * 5000, b"", b"\n\n"],
    ids=["header-injection", "not-ascii", "huge", "empty", "blank"],
)
def test_an_etag_file_that_is_no_header_value_is_not_sent(agent: Agent, etag: bytes) -> None:
    agent.publish(serial=5)
    assert agent.check()[0] == 0
    (agent.state_dir / CACHED_ETAG).write_bytes(etag)
    code, out = agent.check()
    assert (code, out["serial"]) == (0, 5)
    assert "if-none-match" not in agent.server.requests[-1].headers


# A few representative runs of the real console script, as a host runs it: whatever one of the
# files this agent owns in its state dir holds, `check` and `status` answer without a traceback.
STATE_DIR_FILES = [STATE_FILE, CACHED_ENVELOPE, CACHED_ETAG]
hostile_bytes = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b'{"highest_serial": "5"}', b'{"bad_versions": {"x": 1}}', b"[" * 50_000, b"{}"]),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(["highest_serial", "payload", "signatures", "attempts"]), inner, max_size=3
            )
        ),
        max_leaves=6,
    ).map(lambda v: json.dumps(v).encode()),
)


@pytest.mark.slow
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    name=st.sampled_from(STATE_DIR_FILES), data=hostile_bytes, command=st.sampled_from(["check", "status"])
)
@example(name=STATE_FILE, data=b'{"highest_serial": "5"}', command="check")  # a TypeError before
@example(name=STATE_FILE, data=b'{"highest_serial": ""}', command="status")  # printed as a serial before
@example(name=CACHED_ETAG, data=b'"a"\r\nX-Injected: 1', command="check")  # an invalid header before
def test_no_file_in_the_state_dir_makes_the_real_agent_print_a_traceback(
    agent: Agent, name: str, data: bytes, command: str
) -> None:
    shutil.rmtree(agent.state_dir, ignore_errors=True)
    agent.publish(serial=5)
    assert agent.check()[0] == 0  # a state dir as a running agent leaves it
    (agent.state_dir / name).write_bytes(data)

    done = _run_agent(command, *(["--json"] if command == "status" else []), env=agent.env)

    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0 if command == "status" else done.returncode in (0, 3), done.stderr
    out = json.loads(done.stdout)
    if command == "status":
        assert out["highest_serial"] in (None, 5)
    elif done.returncode == 0:
        assert out["serial"] == 5 and agent.state()["highest_serial"] == 5


# ---------------------------------------------------------------- config mistakes are named


def _conf(tmp_path: Path, agent: Agent, extra: str, mode: int = 0o600) -> Path:
    path = tmp_path / "avika-agent.conf"
    path.write_text("".join(f'{key}="{value}"\n' for key, value in agent.env.items()) + extra)
    path.chmod(mode)
    agent.env = {}
    return path


@pytest.fixture
def no_update_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.upper().startswith("UPDATE_")]:
        monkeypatch.delenv(key)


def test_unknown_update_keys_are_named_with_the_nearest_known_key(
    agent: Agent, tmp_path: Path, no_update_env: None
) -> None:
    conf = _conf(tmp_path, agent, "UPDATE_INTERVL=5m\nLOG_LEVEL=debug\n")
    agent.publish(serial=3)
    env = {"UPDATE_PUBLIC_KEY": "x"}

    code, out, err = agent.run("status", "--json", "--config", str(conf), **env)

    assert code == 0
    assert out["warnings"] == [
        f"unknown key UPDATE_INTERVL in config file {conf} is ignored; did you mean UPDATE_INTERVAL?",
        "unknown key UPDATE_PUBLIC_KEY in the environment is ignored; did you mean UPDATE_PUBLIC_KEYS?",
    ]
    assert "LOG_LEVEL" not in err  # the file is shared with the rest of the agent: other keys are fine
    code, out, err = agent.run("check", "--config", str(conf), **env)
    assert (code, out["serial"]) == (0, 3)
    assert "did you mean UPDATE_INTERVAL?" in err and "did you mean UPDATE_PUBLIC_KEYS?" in err
    code, out, _ = agent.run("status", "--config", str(conf), **env)
    assert "warning:        unknown key UPDATE_INTERVL" in out


TOKEN = "ab" * 32


@pytest.mark.parametrize(
    ("mode", "group", "expected"),
    [
        (0o600, "own", []),
        (0o640, "own", []),
        (0o400, "own", []),
        (0o644, "own", ["readable by others"]),
        (0o640, "other", ["readable by group"]),
        (0o666, "own", ["readable by others", "writable by group or others"]),
        (0o620, "own", ["writable by group or others"]),
    ],
    ids=["0600", "0640-agent-group", "0400", "0644", "0640-other-group", "0666", "0620"],
)
def test_a_token_file_readable_by_others_is_named_in_log_and_status(
    agent: Agent, tmp_path: Path, no_update_env: None, mode: int, group: str, expected: list[str]
) -> None:
    conf = _conf(tmp_path, agent, f"UPDATE_REPORT_TOKEN={TOKEN}\n", mode)
    if group == "other":
        if os.geteuid() != 0:
            pytest.skip("chgrp to a group this user is not in needs root")
        os.chown(conf, -1, os.getegid() + 1)

    code, out, err = agent.run("status", "--json", "--config", str(conf))

    assert code == 0
    assert [w for w in out["warnings"] if not any(e in w for e in expected)] == []
    assert all(any(e in w for w in out["warnings"]) for e in expected)
    assert len(out["warnings"]) == len(expected)
    for warning in out["warnings"]:
        assert str(conf) in warning and f"{mode:04o}" in warning and warning in err
        assert TOKEN not in warning


def test_the_real_agent_warns_about_an_exposed_token_file(agent: Agent, tmp_path: Path) -> None:
    conf = _conf(tmp_path, agent, f"UPDATE_REPORT_TOKEN={TOKEN}\nUPDATE_INTERVL=5m\n", 0o644)
    done = _run_agent("status", "--config", str(conf), env={})
    assert done.returncode == 0, done.stderr
    assert "holds UPDATE_REPORT_TOKEN and is readable by others (mode 0644)" in done.stdout
    assert "chmod 600" in done.stdout and "did you mean UPDATE_INTERVAL?" in done.stdout
    assert "readable by others" in done.stderr  # and logged
    conf.chmod(0o600)
    done = _run_agent("status", "--json", "--config", str(conf), env={})
    assert [w for w in json.loads(done.stdout)["warnings"] if "UPDATE_REPORT_TOKEN" in w] == []
