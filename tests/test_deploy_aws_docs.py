"""docs/deploy-aws.md: the parts a release engineer copies keep working as the guide says.

- `out NAME` (section 4) prints a stack output, and fails naming it when the output is missing,
  whether the AWS CLI prints nothing or the word `None` (what `--output text` prints for an empty
  query): a `--store "$(out StoreUrl)"` must never become a store called `None`.
- No command block converts the KMS public key with `tail -c 32` (it prints 32 bytes of any key
  type); the guide's conversion checks the key type.
- Every command the guide says takes `--endpoint-url` does (`show` and `verify` included).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from publisher.cli import main

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "deploy-aws.md"
FENCE = re.compile(r"```sh\n(.*?)```", re.S)


def code_blocks() -> list[str]:
    return FENCE.findall(GUIDE.read_text())


def out_function() -> str:
    (block,) = [b for b in code_blocks() if "out() {" in b]
    start = block.index("out() {")
    end = block.index("\n}\n", start) + 3
    return block[start:end]


def fake_aws(tmp_path: Path, stdout: str, rc: int = 0) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    aws = bin_dir / "aws"
    aws.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{tmp_path}/aws.log"\nprintf "%s" "{stdout}"\nexit {rc}\n'
    )
    aws.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin"}


def run_out(tmp_path: Path, stdout: str, rc: int = 0) -> subprocess.CompletedProcess[str]:
    env = fake_aws(tmp_path, stdout, rc)
    script = out_function() + "\nout StoreUrl\n"
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("printed", ["None\n", "", "\n"], ids=["None", "nothing", "blank"])
def test_out_fails_naming_a_missing_output(printed: str, tmp_path: Path) -> None:
    result = run_out(tmp_path, printed)
    assert result.returncode != 0
    assert result.stdout == ""
    assert "no output StoreUrl" in result.stderr
    (call,) = (tmp_path / "aws.log").read_text().splitlines()
    assert "describe-stacks --stack-name avika-updates" in call
    assert "OutputKey=='StoreUrl'" in call


def test_out_prints_a_present_output(tmp_path: Path) -> None:
    result = run_out(tmp_path, "s3://acme-updates/avika\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "s3://acme-updates/avika\n"


def test_out_fails_when_the_cli_fails(tmp_path: Path) -> None:
    result = run_out(tmp_path, "", rc=255)
    assert result.returncode != 0
    assert result.stdout == ""


def test_no_command_takes_the_last_32_bytes_of_a_key() -> None:
    offenders = [b for b in code_blocks() if "tail -c 32" in b]
    assert offenders == []
    (conversion,) = [b for b in code_blocks() if "get-public-key" in b and "AVIKA_PUBLIC_KEYS=" in b]
    assert "Ed25519PublicKey" in conversion and "sys.exit" in conversion


@pytest.mark.parametrize("command", ["show", "verify", "release", "rollout", "halt", "refresh"])
def test_store_commands_take_an_endpoint_url(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--endpoint-url" in result.output
