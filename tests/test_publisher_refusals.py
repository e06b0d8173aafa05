"""What ``release`` and the re-signs refuse, and the maintenance-path mistakes they name (issue 10).

Through the real CLI, each refusal exits 2 with one line on stderr and leaves the store untouched:
- a store that holds no release yet, unless ``--init`` (a typo in ``--store``, or ``--store
  "None"`` from a CloudFormation output that was missing, must not start a new, empty fleet);
- platform names other than ``linux-amd64`` / ``linux-arm64``;
- a release that drops a platform the current release has, unless ``--drop-platform``;
- a ``--reports-url`` that is not absolute https (plain http only to loopback: 127.0.0.0/8, ::1,
  ``localhost``);
- ``--image-digest`` without ``--image`` or not ``sha256:<64 hex>``;
- ``--kms-key-id ""`` (an unset ``AVIKA_KMS_KEY_ID`` in CI) names the option and the variable.
``halt`` and ``rollout N`` at the live percent sign nothing (exit 0, they say so). A mistyped
DynamoDB reports table is named. The store is seeded by hand (signed envelopes), so these tests
also ran against the publisher before the rules: they failed there first.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from moto import mock_aws

from agent.manifest import RolloutPlan, sign_envelope, verify_manifest
from publisher.cli import main
from publisher.signing import load_key_file
from publisher.stores import DirStore
from tests.publisher_fixtures import cli, make_binary, new_key_file
from tests.test_publisher_s3 import aws_env
from tests.test_publisher_store_trust import REPORTS, first_release, now

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def seeded(tmp_path: Path) -> dict[str, Any]:
    """A directory store holding 0.1.44 (linux-amd64, 10 %, serial 1), its key and a 0.1.45 build."""
    key = new_key_file(tmp_path)
    store = DirStore(tmp_path / "store")
    first_release(store, load_key_file(key.path), tmp_path)
    builds = {}
    for platform in ("linux-amd64", "linux-arm64"):
        builds[platform] = tmp_path / "dist" / f"avika-agent-{platform}"
        make_binary(builds[platform], 3000, f"0.1.45-{platform}")
    return {"key": key, "store": store, "root": tmp_path / "store", "builds": builds, "tmp": tmp_path}


def signing(seeded: dict[str, Any], *extra: str) -> list[str]:
    return ["--key", str(seeded["key"].path), "--store", str(seeded["root"]), *extra]


def release(seeded: dict[str, Any], *extra: str, platforms: tuple[str, ...] = ("linux-amd64",)) -> Any:
    binaries = [f"--binary={p}={seeded['builds'][p]}" for p in platforms]
    return cli("release", "0.1.45", *binaries, "--no-inspect", *signing(seeded), *extra)


def contents(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def live(seeded: dict[str, Any]) -> Any:
    data = (seeded["root"] / "manifest.json").read_bytes()
    return verify_manifest(data, trusted=[seeded["key"].public], now=now())


def refused(result: Any, *words: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("avika-publish: error: "), (
        result.stderr
    )
    for word in words:
        assert word in result.stderr, result.stderr


# ---------------------------------------------------------------- a new store


def test_a_store_url_that_came_out_as_none_starts_no_new_fleet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--store "$(out StoreUrl)"`` with the output missing published to ./None with exit 0."""
    key = new_key_file(tmp_path)
    build = tmp_path / "avika-agent"
    make_binary(build, 3000, "0.1.44")
    args = ["release", "0.1.44", f"--binary=linux-amd64={build}", "--no-inspect", "--key", str(key.path)]
    runner = CliRunner()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a relative --store lands here
    env = {name: None for name in os.environ if name.startswith("AVIKA_")}
    result = runner.invoke(main, [*args, "--store", "None"], env=env)
    refused(result, "holds no release yet", "--init")
    assert not (cwd / "None").exists()
    typo = runner.invoke(main, [*args, "--store", str(tmp_path / "updtaes")], env=env)
    refused(typo, "--init")
    assert not (tmp_path / "updtaes").exists()
    # Starting a store is a deliberate act.
    started = runner.invoke(main, [*args, "--store", str(tmp_path / "updates"), "--init"], env=env)
    assert started.exit_code == 0, started.stderr
    assert (tmp_path / "updates" / "manifests" / "1.json").is_file()


def test_init_is_harmless_on_a_store_that_exists(seeded: dict[str, Any]) -> None:
    assert release(seeded, "--init").exit_code == 0
    assert live(seeded).serial == 2


# ---------------------------------------------------------------- platforms


@pytest.mark.parametrize("platform", ["linux-riscv64", "darwin-arm64", "linux-x86_64", "windows-amd64"])
def test_platform_names_other_than_linux_amd64_and_arm64_are_refused(seeded: dict, platform: str) -> None:
    before = contents(seeded["root"])
    result = cli(
        "release",
        "0.1.45",
        f"--binary={platform}={seeded['builds']['linux-amd64']}",
        "--no-inspect",
        *signing(seeded),
    )
    refused(result, repr(platform), "linux-amd64, linux-arm64")
    assert contents(seeded["root"]) == before


def test_dropping_a_platform_the_current_release_has_needs_drop_platform(seeded: dict) -> None:
    before = contents(seeded["root"])
    refused(release(seeded, platforms=("linux-arm64",)), "has linux-amd64", "--drop-platform linux-amd64")
    assert contents(seeded["root"]) == before

    assert release(seeded, "--drop-platform", "linux-amd64", platforms=("linux-arm64",)).exit_code == 0
    assert sorted(live(seeded).binaries) == ["linux-arm64"]
    refused(release(seeded, "--drop-platform", "linux-arm64", platforms=("linux-arm64",)), "contradict")


def test_adding_a_platform_needs_nothing(seeded: dict) -> None:
    assert release(seeded, platforms=("linux-amd64", "linux-arm64")).exit_code == 0
    assert sorted(live(seeded).binaries) == ["linux-amd64", "linux-arm64"]


# ---------------------------------------------------------------- reports URL


@pytest.mark.parametrize(
    "url",
    [
        "http://reports.example.com/v1/reports",  # plain http off loopback: the token in clear
        "http://10.0.0.7/v1/reports",
        "http://127.0.0.1.attacker.example/v1/reports",
        "ftp://reports.example.com/v1/reports",
        "reports.example.com/v1/reports",
        "/v1/reports",
        "https://",
        "https://user:secret@reports.example.com/v1/reports",
        "https://reports.example.com:99999/v1/reports",
        "https://reports.example.com/v1/reports#frag",
        "https://reports.example.com/v1/re ports",
    ],
)
def test_a_reports_url_that_is_not_https_or_loopback_is_refused(seeded: dict, url: str) -> None:
    before = contents(seeded["root"])
    refused(release(seeded, "--reports-url", url), "--reports-url")
    assert contents(seeded["root"]) == before


@pytest.mark.parametrize(
    "url, expected",
    [
        ("https://reports.example.com/v1/reports", "https://reports.example.com/v1/reports"),
        ("http://127.0.0.1:8080/v1/reports", "http://127.0.0.1:8080/v1/reports"),
        ("http://127.9.9.9/v1/reports", "http://127.9.9.9/v1/reports"),
        ("http://[::1]:8080/v1/reports", "http://[::1]:8080/v1/reports"),
        ("http://localhost:8080/v1/reports", "http://localhost:8080/v1/reports"),
        ("", None),
    ],
)
def test_https_and_loopback_http_reports_urls_are_published(seeded: dict, url: str, expected: Any) -> None:
    assert release(seeded, "--reports-url", url).exit_code == 0
    assert live(seeded).reports_url == expected


def test_without_reports_url_the_verified_one_is_kept(seeded: dict) -> None:
    assert release(seeded).exit_code == 0
    assert live(seeded).reports_url == REPORTS


# ---------------------------------------------------------------- image digest, signed_at, kept fields


def test_image_digest_needs_an_image_and_the_manifests_form(seeded: dict) -> None:
    before = contents(seeded["root"])
    refused(release(seeded, "--image-digest", DIGEST), "--image-digest needs --image")
    refused(
        release(seeded, "--image", "hellodk/avika-agent:0.1.45", "--image-digest", "sha256:AB"), "sha256:"
    )
    assert contents(seeded["root"]) == before

    done = release(seeded, "--image", "hellodk/avika-agent:0.1.45", "--image-digest", DIGEST, "--json")
    assert done.exit_code == 0, done.stderr
    m = live(seeded)
    assert (m.container_image, m.container_digest) == ("hellodk/avika-agent:0.1.45", DIGEST)
    assert f'digest: "{DIGEST}"' in (seeded["root"] / "helm-values.yaml").read_text()
    assert json.loads(done.stdout)["manifest"]["signed_at"] is not None


def test_a_re_sign_keeps_every_known_field_and_records_signed_at(seeded: dict) -> None:
    """Fields the publisher cannot set yet (``rollout_plan``) must survive a refresh."""
    store: DirStore = seeded["store"]
    signer = load_key_file(seeded["key"].path)
    before = live(seeded)
    planned = replace(
        before,
        serial=2,
        container_digest=DIGEST,
        rollout_plan=RolloutPlan(steps=(1, 10, 50, 100), soak="2h", max_failure_rate="0.05", min_agents=20),
        changelog="Fixed WAL directory creation",
        raw=b"",
    )
    envelope = sign_envelope(planned.to_payload(), [signer])
    store.put_immutable("manifests/2.json", envelope)
    store.put_mutable("manifest.json", envelope)

    assert cli("rollout", "50", *signing(seeded)).exit_code == 0

    after = live(seeded)
    assert after.serial == 3 and after.rollout.percent == 50 and after.signed_at is not None
    assert after.signed_at >= before.released_at
    kept = ("container_digest", "rollout_plan", "changelog", "container_image", "reports_url", "binaries")
    assert {f: getattr(after, f) for f in kept} == {f: getattr(planned, f) for f in kept}


# ---------------------------------------------------------------- idempotent halt and rollout


def test_halt_and_rollout_at_the_live_percent_sign_nothing(seeded: dict) -> None:
    before = contents(seeded["root"])  # the seeded release is at 10 %

    same = cli("rollout", "10", *signing(seeded))
    assert same.exit_code == 0, same.stderr
    assert "already at rollout 10%" in same.stdout and "nothing signed" in same.stdout
    as_json = json.loads(cli("rollout", "10", *signing(seeded), "--json").stdout)
    assert (as_json["status"], as_json["serial"], as_json["percent"]) == ("unchanged", 1, 10)
    assert contents(seeded["root"]) == before

    assert cli("halt", *signing(seeded)).exit_code == 0
    assert (live(seeded).serial, live(seeded).rollout.percent) == (2, 0)
    halted = contents(seeded["root"])
    again = cli("halt", *signing(seeded))
    assert again.exit_code == 0 and "already at rollout 0%" in again.stdout
    assert contents(seeded["root"]) == halted


# ---------------------------------------------------------------- the maintenance path


@pytest.mark.parametrize("command", [["refresh"], ["halt"], ["rollout", "50"]])
def test_an_empty_kms_key_id_names_the_option_and_the_variable(seeded: dict, command: list[str]) -> None:
    """An unset ``AVIKA_KMS_KEY_ID`` passed as ``--kms-key-id "$AVIKA_KMS_KEY_ID"``."""
    before = contents(seeded["root"])
    result = cli(*command, "--kms-key-id", "", "--store", str(seeded["root"]))
    refused(result, "--kms-key-id is empty", "AVIKA_KMS_KEY_ID")
    assert contents(seeded["root"]) == before


def test_an_empty_key_file_option_names_the_option_and_the_variable(seeded: dict) -> None:
    refused(
        cli("refresh", "--key", "", "--store", str(seeded["root"])), "--key is empty", "AVIKA_SIGNING_KEY"
    )


def test_a_mistyped_dynamodb_reports_table_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    aws_env(monkeypatch)
    with mock_aws():
        fleet = cli("fleet", "--reports", "dynamodb://avika-reprots")
        canary = cli(
            "canary", "0.1.44", "--reports", "dynamodb://avika-reprots", "--max-failure-rate", "0.05",
            "--min-agents", "1",
        )  # fmt: skip
    for result in (fleet, canary):
        refused(result, "'avika-reprots' not found", "dynamodb://avika-reprots")
