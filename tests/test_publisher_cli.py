"""``avika-publish`` (publisher/cli.py): commands, output and exit codes (DESIGN section 6).

Exit codes: 0 ok, 1 operational failure, 2 usage or refused input, 3 verification failed; errors
are one line on stderr, never a traceback. Driven through click's CliRunner and, for the
process-level contract (console script, concurrent publishers), as real processes.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.manifest import Manifest, parse_manifest, read_envelope_unverified, verify_manifest
from infra.reports.auth import make_token
from publisher import release as publishing
from publisher.signing import load_key_file
from publisher.stores import DirStore
from tests.publisher_fixtures import (
    NOW,
    REPO,
    cli,
    make_binary,
    new_key_file,
    proc_env,
    run_publish,
    snapshot,
)

SECRET = "a-fleet-secret-of-enough-length"


@pytest.fixture
def env(tmp_path: Path) -> dict:
    """A key, two builds and a store path."""
    key = new_key_file(tmp_path)
    make_binary(tmp_path / "dist" / "amd64", 4096, "amd64")
    make_binary(tmp_path / "dist" / "arm64", 2048, "arm64")
    return {
        "key": key,
        "store": tmp_path / "store",
        "binaries": [
            "--binary", f"linux-amd64={tmp_path / 'dist' / 'amd64'}",
            "--binary", f"linux-arm64={tmp_path / 'dist' / 'arm64'}",
        ],
    }  # fmt: skip


def release_args(env: dict, version: str = "0.1.44", *extra: str) -> list[str]:
    """A release that may start the store (``--init``; on a store with releases it changes nothing)."""
    return [
        "release",
        version,
        *env["binaries"],
        "--key",
        str(env["key"].path),
        "--store",
        str(env["store"]),
        "--init",
        "--no-inspect",  # stand-in bytes, not agent builds (publisher/inspect.py has its own tests)
        *extra,
    ]


def live(env: dict) -> Manifest:
    return verify_manifest(
        (env["store"] / "manifest.json").read_bytes(), trusted=[env["key"].public], now=datetime.now(UTC)
    )


# ---------------------------------------------------------------- keygen


def test_keygen_writes_a_0600_key_and_prints_its_public_key(tmp_path: Path) -> None:
    result = cli("keygen", "--out", str(tmp_path / "k.pem"))
    assert result.exit_code == 0, result.stderr
    public = load_key_file(tmp_path / "k.pem").public_key
    assert result.stdout.splitlines() == [f"public key: {public.b64}", f"key id:     {public.keyid}"]
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600

    as_json = json.loads(cli("keygen", "--out", str(tmp_path / "k2.pem"), "--json").stdout)
    assert as_json["key_id"] == load_key_file(tmp_path / "k2.pem").public_key.keyid


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "k.pem").write_text("precious")
    result = cli("keygen", "--out", str(tmp_path / "k.pem"))
    assert result.exit_code == 2 and "refusing to overwrite" in result.stderr
    assert (tmp_path / "k.pem").read_text() == "precious"


# ---------------------------------------------------------------- release and re-sign


def test_release_show_and_verify(env: dict) -> None:
    result = cli(*release_args(env, "v0.1.44", "--image", "hellodk/avika-agent:0.1.44", "--json"))
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["status"], out["serial"], out["version"]) == ("published", 1, "0.1.44")
    assert out["written"] == ["manifests/1.json", "helm-values.yaml", "manifest.json"]

    shown = cli("show", "--store", str(env["store"]), "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout) == live(env).to_dict()
    text = cli("show", "--store", str(env["store"]))
    assert "unverified" in text.stdout and "0.1.44" in text.stdout

    verified = cli("verify", "--public-key", env["key"].public.b64, "--store", str(env["store"]), "--json")
    assert verified.exit_code == 0, verified.stderr
    assert json.loads(verified.stdout)["ok"] is True


def test_rollout_halt_and_refresh_each_sign_a_new_serial(env: dict) -> None:
    assert cli(*release_args(env, "0.1.44", "--rollout", "10")).exit_code == 0
    signing = ["--key", str(env["key"].path), "--store", str(env["store"])]
    assert cli("rollout", "50", *signing).exit_code == 0
    assert (live(env).serial, live(env).rollout.percent, live(env).rollout.salt) == (2, 50, "0.1.44")
    assert cli("halt", *signing).exit_code == 0
    assert (live(env).serial, live(env).rollout.percent) == (3, 0)
    assert cli("refresh", "--expires-in", "2d", *signing).exit_code == 0
    assert (live(env).serial, live(env).rollout.percent) == (4, 0)
    assert live(env).expires - datetime.now(UTC) <= timedelta(days=2)


def test_an_identical_rerelease_says_already_published_and_changes_nothing(env: dict) -> None:
    assert cli(*release_args(env)).exit_code == 0
    before = snapshot(env["store"])
    result = cli(*release_args(env))
    assert result.exit_code == 0 and "already published" in result.stdout
    assert snapshot(env["store"]) == before


def test_a_dry_run_prints_the_plan_and_writes_nothing(env: dict) -> None:
    result = cli(*release_args(env, "0.1.44", "--dry-run", "--json"))
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["status"] == "dry_run" and len(plan["uploaded"]) == 2
    assert plan["envelope"]["signatures"][0]["keyid"] == env["key"].public.keyid
    assert not env["store"].exists()


def test_a_file_store_ignores_cloudfront_with_a_note(env: dict) -> None:
    result = cli(*release_args(env, "0.1.44", "--cloudfront-distribution", "E123"))
    assert result.exit_code == 0 and "ignored for a file store" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--min-version", "0.1.45"], "above the release's own version"),
        (["--rollout", "101"], "--rollout"),
        (["--expires-in", "10x"], "not a duration"),
        (["--binary", "no-equals-sign"], "PLATFORM=PATH"),
        (["--binary", "linux-amd64=/nonexistent"], "platform 'linux-amd64' given twice"),
        (["--store", "s3:///prefix"], "no bucket"),
        (["--changelog", "a", "--changelog-file", __file__], "not both"),
    ],
    ids=["min-version", "rollout", "expires", "binary-spec", "binary-twice", "s3", "changelog"],
)
def test_invalid_release_input_exits_2(env: dict, args: list[str], message: str) -> None:
    result = cli(*release_args(env), *args)
    assert result.exit_code == 2 and message in result.stderr
    assert not env["store"].exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["release", "not-a-version"], "not a version"),
        (["release", "0.1.44", "--binary", "linux-amd64=/nonexistent/file"], "No such file"),
        (["release", "0.1.44"], "at least one --binary"),
    ],
)
def test_more_invalid_input_exits_2(env: dict, argv: list[str], message: str) -> None:
    if argv[1:2] == ["not-a-version"]:
        argv = [*argv, *env["binaries"]]
    result = cli(*argv, "--key", str(env["key"].path), "--store", str(env["store"]))
    assert result.exit_code == 2 and message in result.stderr


def test_release_without_a_key_exits_2(env: dict) -> None:
    result = cli("release", "0.1.44", *env["binaries"], "--store", str(env["store"]), "--no-inspect")
    assert result.exit_code == 2 and "no signing key" in result.stderr


def test_signing_key_comes_from_the_environment(env: dict) -> None:
    result = cli("release", "0.1.44", *env["binaries"], "--init", "--no-inspect", env={
        "AVIKA_SIGNING_KEY": str(env["key"].path), "AVIKA_STORE": str(env["store"])})  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert live(env).serial == 1


def test_refused_publishes_exit_2_and_leave_the_store_untouched(env: dict, tmp_path: Path) -> None:
    assert cli(*release_args(env, "0.1.44")).exit_code == 0
    before = snapshot(env["store"])
    make_binary(tmp_path / "dist" / "amd64", 4096, "rebuilt with other bytes")
    different = cli(*release_args(env, "0.1.44"))
    older = cli(*release_args(env, "0.1.43"))
    assert (different.exit_code, older.exit_code) == (2, 2)
    assert "already published with other bytes" in different.stderr and "--downgrade" in older.stderr
    assert snapshot(env["store"]) == before
    assert cli(*release_args(env, "0.1.44", "--force")).exit_code == 0
    assert live(env).serial == 2


def test_show_of_an_empty_store_exits_1(tmp_path: Path) -> None:
    result = cli("show", "--store", str(tmp_path / "empty"))
    assert result.exit_code == 1 and "no manifest.json" in result.stderr


# ---------------------------------------------------------------- verify exits 3


def _flip(data: bytes, index: int) -> bytes:
    """Change one byte: a base64 character becomes another one, anything else flips a bit."""
    old = data[index : index + 1]
    new = (b"B" if old == b"A" else b"A") if old.isalnum() or old in b"+/" else bytes([old[0] ^ 0x01])
    return data[:index] + new + data[index + 1 :]


def _positions(envelope: bytes) -> dict[str, int]:
    payload = envelope.index(b'"payload":"') + len(b'"payload":"')
    sig = envelope.index(b'"sig":"') + len(b'"sig":"')
    ptype = envelope.index(b'"payloadType":"') + len(b'"payloadType":"')
    return {
        "payload-start": payload, "payload-middle": payload + 200, "payload-near-end": payload + 400,
        "signature-start": sig, "signature-middle": sig + 40, "payload-type": ptype + 5,
        "opening-brace": 0, "signatures-key": envelope.index(b'"signatures"') + 3,
    }  # fmt: skip


@pytest.mark.parametrize(
    "where, code",
    [
        ("payload-start", "signature_invalid"), ("payload-middle", "signature_invalid"),
        ("payload-near-end", "signature_invalid"),
        ("signature-start", "signature_invalid"), ("signature-middle", "signature_invalid"),
        ("payload-type", "wrong_payload_type"), ("opening-brace", "malformed_envelope"),
        ("signatures-key", "malformed_envelope"),
    ],
)  # fmt: skip
def test_changing_a_byte_of_manifest_json_makes_verify_exit_3(env: dict, where: str, code: str) -> None:
    assert cli(*release_args(env)).exit_code == 0
    path = env["store"] / "manifest.json"
    path.write_bytes(_flip(path.read_bytes(), _positions(path.read_bytes())[where]))

    result = cli("verify", "--public-key", env["key"].public.b64, "--store", str(env["store"]), "--json")

    assert result.exit_code == 3
    assert json.loads(result.stdout)["error"] == code and code in result.stderr


def test_a_tampered_binary_makes_verify_exit_3_naming_the_checksum(env: dict) -> None:
    assert cli(*release_args(env)).exit_code == 0
    entry = live(env).binaries["linux-amd64"]
    binary = env["store"] / entry.url
    binary.write_bytes(_flip(binary.read_bytes(), 1000))

    result = cli("verify", "--public-key", env["key"].public.b64, "--store", str(env["store"]))

    assert result.exit_code == 3
    assert "checksum_mismatch" in result.stderr and "linux-amd64" in result.stderr
    assert "linux-arm64    ok" in result.stdout


def test_an_expired_manifest_makes_verify_exit_3(env: dict) -> None:
    signer = load_key_file(env["key"].path)
    spec = publishing.ReleaseSpec(
        "0.1.44", {"linux-amd64": Path(env["binaries"][1].split("=", 1)[1])}, init=True
    )
    publishing.release(DirStore(env["store"]), [signer], spec, now=NOW - timedelta(days=400))
    result = cli("verify", "--public-key", env["key"].public.b64, "--store", str(env["store"]))
    assert result.exit_code == 3 and "expired" in result.stderr


def test_verify_takes_several_keys_and_a_threshold(env: dict, tmp_path: Path) -> None:
    other = new_key_file(tmp_path, "other.pem")
    assert cli(*release_args(env)).exit_code == 0
    keys = f"{other.public.b64},{env['key'].public.b64}"
    store = ["--store", str(env["store"])]
    assert cli("verify", "--public-key", keys, *store).exit_code == 0
    result = cli("verify", "--public-key", keys, "--threshold", "2", *store)
    assert result.exit_code == 3 and "threshold_not_met" in result.stderr
    assert cli("verify", "--public-key", keys, "--threshold", "3", *store).exit_code == 2
    assert cli("verify", "--public-key", "not-base64!", *store).exit_code == 2


# ---------------------------------------------------------------- enroll


def test_enroll_prints_the_agents_report_token() -> None:
    result = cli(
        "enroll", "host-01.example.com", env={"AVIKA_FLEET_SECRET": f"{SECRET},previous-secret-0123456"}
    )
    assert result.exit_code == 0
    assert result.stdout.strip() == make_token(SECRET, "host-01.example.com")  # the current secret


@pytest.mark.parametrize(
    "agent_id, secret, message",
    [
        ("has space", SECRET, "AGENT_ID"),
        ("x" * 129, SECRET, "AGENT_ID"),
        ("host-01", None, "AVIKA_FLEET_SECRET"),
        ("host-01", "short", "AVIKA_FLEET_SECRET"),
    ],
)
def test_enroll_refuses_bad_ids_and_missing_secrets(agent_id: str, secret: str | None, message: str) -> None:
    result = cli("enroll", agent_id, env={"AVIKA_FLEET_SECRET": secret})  # type: ignore[dict-item]
    assert result.exit_code == 2 and message in result.stderr and result.stdout == ""


# ---------------------------------------------------------------- real processes


def test_the_console_script_runs_a_release_end_to_end(env: dict) -> None:
    script = Path(sys.executable).parent / "avika-publish"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(script), *args], capture_output=True, text=True, env=proc_env(), cwd=REPO)

    published = run(*release_args(env, "v0.1.44", "--json"))
    assert published.returncode == 0, published.stderr
    assert json.loads(published.stdout)["serial"] == 1

    refused = run(*release_args(env, "0.1.43"))
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr

    verified = run("verify", "--public-key", env["key"].public.b64, "--store", str(env["store"]))
    assert verified.returncode == 0, verified.stderr


def test_concurrent_publishers_never_share_a_serial_and_the_highest_stays_live(env: dict) -> None:
    command = [sys.executable, "-m", "publisher.cli"]
    publishers = [
        subprocess.Popen(
            [*command, *release_args(env, "0.1.44", "--rollout", str(10 * i), "--json")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=proc_env(), cwd=REPO,
        )
        for i in range(1, 6)
    ]  # fmt: skip
    results = [(p.wait(timeout=60), *p.communicate()) for p in publishers]

    won = [json.loads(out)["serial"] for rc, out, _ in results if rc == 0]
    lost = [err for rc, _, err in results if rc != 0]
    assert won and len(won) == len(set(won))
    for err in lost:  # a loser fails clearly (exit 1), it never overwrites
        assert "concurrent publish" in err
    assert [rc for rc, _, _ in results if rc != 0] == [1] * len(lost)
    archive = sorted(int(p.stem) for p in (env["store"] / "manifests").glob("*.json"))
    assert len(archive) == len(set(archive)) and set(won) <= set(archive)
    assert live(env).serial == max(won)
    assert (env["store"] / "manifest.json").read_bytes() == (
        env["store"] / f"manifests/{max(won)}.json"
    ).read_bytes()


def test_show_reads_what_another_process_published(env: dict) -> None:
    assert run_publish(*release_args(env)).returncode == 0
    shown = run_publish("show", "--json", AVIKA_STORE=str(env["store"]))
    assert shown.returncode == 0
    envelope = (env["store"] / "manifest.json").read_bytes()
    assert json.loads(shown.stdout) == parse_manifest(read_envelope_unverified(envelope)).to_dict()


def test_output_piped_into_a_reader_that_leaves_early_is_not_an_error(env: dict) -> None:
    """`avika-publish show --json | true`: a pipe closed before the write ends the command quietly with 0."""
    assert cli(*release_args(env)).exit_code == 0
    reader_gone = subprocess.run(
        f"'{sys.executable}' -m publisher.cli show --store '{env['store']}' --json | true;"
        " echo ${PIPESTATUS[0]}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert reader_gone.stdout.strip() == "0", reader_gone.stderr
    assert "Broken pipe" not in reader_gone.stderr
