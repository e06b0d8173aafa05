"""Changing any byte of a published ``manifest.json`` is caught (issue 2, "done when").

Every byte position of a real published envelope is changed in turn:
- ``avika-publish verify`` (the audit) exits 3 for every position;
- the agent's verifier refuses every position except the ``keyid`` hint, which DESIGN section 2
  declares a hint only (a signature counts for whichever trusted key verifies it), and the
  field's name (renamed, it is an unknown field, so the hint is simply absent); the signed
  payload is then provably the same one.
A few positions also go through the real CLIs as subprocesses.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.manifest import LocalSigner, ManifestError, generate_private_key, verify_manifest
from publisher.release import ReleaseSpec, release, verify
from publisher.serve import make_server
from publisher.stores import DirStore

NOW = datetime.now(UTC)
BIN = Path(sys.executable).parent


SWAP = {ord("+"): ord("/"), ord("/"): ord("+")}


def change(data: bytes, index: int) -> bytes:
    """A different byte at ``index``: base64 and hex characters stay in their alphabet (``+`` and
    ``/`` swap), so a changed signature still decodes and must fail as a signature."""
    old = data[index]
    new = ord("B") if old == ord("A") else ord("A") if chr(old).isalnum() else SWAP.get(old, old ^ 0x01)
    return data[:index] + bytes([new]) + data[index + 1 :]


def test_change_keeps_every_base64_character_in_the_alphabet() -> None:
    # A random signing key makes any base64 character land at a given position; one that left
    # the alphabet would fail as a malformed envelope, not as a bad signature.
    alphabet = string.ascii_letters + string.digits + "+/"
    for char in alphabet:
        changed = change(char.encode(), 0).decode()
        assert changed != char and changed in alphabet, char


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LocalSigner]:
    root = tmp_path_factory.mktemp("tamper")
    binary = root / "agent-bin"
    binary.write_bytes(b"#!/bin/sh\necho 0.1.44\n")
    signer = LocalSigner(generate_private_key())
    store = root / "updates"
    spec = ReleaseSpec(
        "0.1.44", {"linux-amd64": binary}, image="hellodk/avika-agent:0.1.44", rollout_percent=50, init=True
    )
    release(DirStore(store), [signer], spec, now=NOW)
    return store, signer


def keyid_span(data: bytes) -> list[int]:
    """The hint's name and value: renaming the field drops the hint, which is just as harmless."""
    name = data.index(b'"keyid":"') + 1
    value = name + len(b'keyid":"')
    return [*range(name, name + len("keyid")), *range(value, data.index(b'"', value))]


def test_every_changed_byte_fails_the_audit_and_all_but_the_keyid_hint_fail_the_agent(
    published: tuple[Path, LocalSigner],
) -> None:
    store_dir, signer = published
    path = store_dir / "manifest.json"
    original = path.read_bytes()
    trusted = [signer.public_key]
    hint = keyid_span(original)
    store = DirStore(store_dir)
    agent_accepted: list[int] = []
    try:
        for index in range(len(original)):
            tampered = change(original, index)
            path.write_bytes(tampered)
            report = verify(store, trusted, now=NOW)
            assert report.exit_code == 3, f"audit accepted a change at byte {index}"
            try:
                verify_manifest(tampered, trusted=trusted, now=NOW, platform="linux-amd64")
            except ManifestError:
                continue
            agent_accepted.append(index)
    finally:
        path.write_bytes(original)
    assert agent_accepted == hint
    assert verify(store, trusted, now=NOW).exit_code == 0


@pytest.mark.slow
@pytest.mark.parametrize("where", ["payload", "sig", "payloadType"])
def test_the_real_clis_exit_3_on_a_changed_byte(
    published: tuple[Path, LocalSigner], tmp_path: Path, where: str
) -> None:
    store_dir, signer = published
    original = (store_dir / "manifest.json").read_bytes()
    copy = tmp_path / "store"
    subprocess.run(["cp", "-a", str(store_dir), str(copy)], check=True)
    index = original.index(f'"{where}":"'.encode()) + len(where) + 10
    (copy / "manifest.json").write_bytes(change(original, index))
    key = signer.public_key.b64

    audit = subprocess.run(
        [BIN / "avika-publish", "verify", "--public-key", key, "--store", str(copy), "--json"],
        capture_output=True,
        text=True,
    )
    assert audit.returncode == 3, audit.stderr
    code = json.loads(audit.stdout)["error"]
    assert code in {"signature_invalid", "wrong_payload_type"}

    server = make_server(copy, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {
            "PATH": os.environ["PATH"],
            "UPDATE_SERVER": server.url,
            "UPDATE_PUBLIC_KEYS": key,
            "UPDATE_STATE_DIR": str(tmp_path / "state"),
            "AGENT_ID": "tamper-test",
            "DEPLOYMENT_MODE": "vm",
            "UPDATE_TARGET": str(tmp_path / "no-such-target"),
        }
        empty = tmp_path / "empty.conf"
        empty.write_text("")
        check = subprocess.run(
            [BIN / "avika-agent", "check", "--config", str(empty)], capture_output=True, text=True, env=env
        )
    finally:
        server.shutdown()
        server.server_close()
    assert check.returncode == 3, check.stdout + check.stderr
    assert json.loads(check.stdout)["error"] == code
