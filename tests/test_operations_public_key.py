"""The runbook's public-key helpers print the key agents trust, or fail (docs/operations.md, issue 10).

``openssl pkey -pubout -outform DER | tail -c 32 | base64`` printed 32 bytes of any key with exit 0:
a wrong "public key" for an RSA or EC key. The runbook's ``public_key FILE`` (a PEM key file,
private or public) and ``kms_public_key KEY_ID`` (``aws kms get-public-key``'s DER) are taken from
the page as written and run in bash: an Ed25519 key prints its base64 raw 32 bytes; any other key
exits non-zero with a message and prints nothing, so ``X=$(public_key f)`` fails under ``set -e``.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from publisher.signing import write_new_key

OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
BIN = Path(sys.executable).parent


def function(name: str) -> str:
    """The shell function ``name() {`` ... ``}`` as the page defines it (exactly once)."""
    found = re.findall(rf"^{name}\(\) \{{.*?^\}}$", OPERATIONS.read_text(encoding="utf-8"), re.M | re.S)
    assert len(found) == 1, f"docs/operations.md defines {name}() {len(found)} times"
    return found[0]


def run(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir(exist_ok=True)
    aws = fake_bin / "aws"  # prints what `aws kms get-public-key --query PublicKey --output text` would
    aws.write_text('#!/bin/sh\ncat "$FAKE_KMS_DER_B64"\n')
    aws.chmod(0o755)
    path = f"{fake_bin}:{BIN}:/usr/bin:/bin"
    return subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        capture_output=True, text=True, timeout=60, env={"PATH": path, "HOME": str(tmp_path), **env},
    )  # fmt: skip


def pem(key: object, private: bool) -> bytes:
    if private:
        return key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    return key.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


OTHER_KEYS = {
    "ec-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "rsa-2048": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
}


def test_public_key_prints_an_ed25519_keys_trusted_form(tmp_path: Path) -> None:
    key_file = tmp_path / "signing.pem"
    public = write_new_key(key_file)
    done = run(function("public_key") + f'\nKEY=$(public_key "{key_file}")\necho "$KEY"', tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == public.b64

    public_pem = tmp_path / "public.pem"
    key = ed25519.Ed25519PrivateKey.generate()
    public_pem.write_bytes(pem(key, private=False))
    done = run(function("public_key") + f'\npublic_key "{public_pem}"', tmp_path)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert done.returncode == 0 and done.stdout.strip() == base64.b64encode(raw).decode()


@pytest.mark.parametrize("kind", sorted(OTHER_KEYS))
@pytest.mark.parametrize("private", [True, False], ids=["private", "public"])
def test_public_key_refuses_any_other_key(tmp_path: Path, kind: str, private: bool) -> None:
    key_file = tmp_path / "other.pem"
    key_file.write_bytes(pem(OTHER_KEYS[kind](), private))
    done = run(function("public_key") + f'\nKEY=$(public_key "{key_file}")\necho "got $KEY"', tmp_path)
    assert done.returncode != 0 and "got" not in done.stdout
    assert "not an Ed25519 key" in done.stderr


def test_public_key_refuses_what_is_no_key(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    done = run(function("public_key") + f'\npublic_key "{junk}"', tmp_path)
    assert done.returncode != 0 and done.stdout == "" and "not an unencrypted PEM key" in done.stderr


@pytest.mark.parametrize("kind", ["ed25519", *sorted(OTHER_KEYS)])
def test_kms_public_key_checks_the_der_kms_returns(tmp_path: Path, kind: str) -> None:
    key = ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else OTHER_KEYS[kind]()
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    answer = tmp_path / "kms-answer.txt"
    answer.write_text(base64.b64encode(der).decode() + "\n")
    done = run(
        function("kms_public_key") + '\nKEY=$(kms_public_key alias/avika)\necho "got $KEY"',
        tmp_path,
        FAKE_KMS_DER_B64=str(answer),
    )
    if kind == "ed25519":
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"got {base64.b64encode(raw).decode()}"
    else:
        assert done.returncode != 0 and "got" not in done.stdout
        assert "not an Ed25519 key" in done.stderr


def test_no_runbook_command_takes_the_last_32_bytes_of_a_key() -> None:
    blocks = re.findall(r"^```sh\n(.*?)^```$", OPERATIONS.read_text(encoding="utf-8"), re.M | re.S)
    assert len(blocks) > 20
    assert [b for b in blocks if "tail -c 32" in b] == []
