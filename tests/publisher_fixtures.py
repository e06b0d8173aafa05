"""Shared helpers for the publisher tests: keys, small binaries, store snapshots, CLI runners.

Everything is real: keys are generated, stores are directories, the CLI runs through click's
``CliRunner`` or as a real process (``python -m publisher.cli``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from click.testing import CliRunner, Result

from agent.manifest import LocalSigner, PublicKey, generate_private_key
from publisher.cli import main
from publisher.signing import write_new_key

REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 2, 15, 20, 0, 0, tzinfo=UTC)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_binary(path: Path, size: int, seed: str) -> bytes:
    """Deterministic, distinct bytes (a stand-in for an agent build)."""
    data = bytearray()
    counter = 0
    while len(data) < size:
        data += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data[:size]))
    return bytes(data[:size])


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root`` (hidden ones too): content hash and mode, to prove nothing changed."""
    out: dict[str, tuple[str, int]] = {}
    if not root.exists():
        return out
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[path.relative_to(root).as_posix()] = (sha256(path.read_bytes()), path.stat().st_mode)
    return out


def new_signer() -> LocalSigner:
    return LocalSigner(generate_private_key())


@dataclass(frozen=True)
class KeyFile:
    path: Path
    public: PublicKey


def new_key_file(directory: Path, name: str = "signing.pem") -> KeyFile:
    path = directory / name
    return KeyFile(path, write_new_key(path))


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run ``avika-publish`` in-process; stderr is kept apart from stdout."""
    base: dict[str, str | None] = {
        name: None
        for name in (
            "AVIKA_STORE",
            "AVIKA_SIGNING_KEY",
            "AVIKA_KMS_KEY_ID",
            "AVIKA_REPORTS",
            "AVIKA_PUBLIC_KEYS",
        )
    }
    return CliRunner().invoke(main, list(args), env={**base, **(env or {})}, catch_exceptions=False)


def proc_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVIKA_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def run_publish(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the real program: ``python -m publisher.cli ARGS``."""
    return subprocess.run(
        [sys.executable, "-m", "publisher.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=proc_env(**env),
        cwd=REPO,
    )
