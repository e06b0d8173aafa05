"""The agent as one self-contained executable (DESIGN section 7): `make agent-binary`.

One binary is built per session (packaging/build_agent.py, as the Makefile calls it) with a key
embedded via PUBLIC_KEYS; the tests run it as a host would (through its `/usr/bin/env python3`
shebang, SHIV_ROOT in a temp dir), check that the embedded key is the trusted one when
UPDATE_PUBLIC_KEYS is unset, and that nothing boto3 is inside. Also here: the contract the
binary relies on, that agent code imports nothing lazily (its file is replaced while it runs).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import config
from agent.manifest import LocalSigner, generate_private_key, rollout_bucket
from tests.agent_fixtures import LocalServer, Release, publish

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "packaging" / "build_agent.py"
VERSION = "9.8.7"
RUNTIME = {"agent", "infra", "cryptography", "cffi", "requests", "urllib3", "idna", "charset_normalizer"}
RUNTIME |= {"certifi", "packaging", "click"}
FORBIDDEN = ("boto3", "botocore", "s3transfer")

pytestmark = pytest.mark.slow


@dataclass
class Built:
    path: Path
    signer: LocalSigner
    shiv_root: Path
    build_output: str

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if k not in config.KEYS and not k.startswith("SHIV_")}
        clean.pop("PYTHONPATH", None)
        clean["SHIV_ROOT"] = str(self.shiv_root)
        return subprocess.run(
            [str(self.path), *args],
            env={**clean, **(env or {})},
            cwd=self.shiv_root.parent,  # not the source tree: only the zipapp's code may be used
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def build(out: Path, version: str, keys: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BUILD), "--version", version, "--out", str(out), "--public-keys", keys, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    work = tmp_path_factory.mktemp("agent-binary")
    signer = LocalSigner(generate_private_key())
    out = work / "avika-agent-linux-amd64"
    done = build(out, "v" + VERSION, signer.public_key.b64)
    assert done.returncode == 0, done.stderr
    return Built(out, signer, work / "shiv", done.stdout)


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer() as srv:
        yield srv


def test_version_prints_the_built_version(built: Built) -> None:
    done = built.run("version")
    assert (done.returncode, done.stdout, done.stderr) == (0, VERSION + "\n", "")
    assert built.path.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert os.access(built.path, os.X_OK)


def test_detect_json(built: Built) -> None:
    done = built.run("detect", "--json", env={"DEPLOYMENT_MODE": "vm"})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert list(out) == ["mode", "signals", "override"]
    assert (out["mode"], out["override"]) == ("vm", "vm")


def test_check_trusts_the_embedded_key(built: Built, server: LocalServer, tmp_path: Path) -> None:
    env = {
        "UPDATE_SERVER": server.url("/updates"),
        "UPDATE_STATE_DIR": str(tmp_path / "state"),
        "BUFFER_DIR": str(tmp_path / "data"),
        "AGENT_ID": "host-42",
        "DEPLOYMENT_MODE": "vm",
    }  # no UPDATE_PUBLIC_KEYS, no UPDATE_TARGET: the embedded key, the running binary
    release = Release([built.signer])
    publish(server, release.envelope(serial=3, version="9.9.0"))
    done = built.run("check", env=env)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out == {
        "current_version": VERSION,
        "manifest_version": "9.9.0",
        "serial": 3,
        "mode": "vm",
        "agent_id": "host-42",
        "bucket": rollout_bucket("host-42"),
        "in_wave": True,
        "forced": False,
        "action": "update",
        "reason": "newer_version",
    }

    # Signed by anyone else: refused, so the embedded key really is the one trusted.
    publish(server, Release().envelope(serial=4, version="9.9.0"))
    done = built.run("check", env=env)
    assert done.returncode == 3
    assert json.loads(done.stdout)["error"] == "signature_invalid"


def test_zipapp_holds_the_runtime_and_no_boto3(built: Built) -> None:
    with zipfile.ZipFile(built.path) as archive:
        names = archive.namelist()
        embedded = archive.read("site-packages/agent/_embedded.py").decode()
        env = json.loads(archive.read("environment.json"))
    top = {n.split("/")[1] for n in names if n.startswith("site-packages/")}
    assert top >= RUNTIME
    assert not [n for n in names if any(bad in n.lower() for bad in FORBIDDEN)]
    assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n]
    assert f"VERSION = '{VERSION}'" in embedded
    assert built.signer.public_key.b64 in embedded
    assert env["entry_point"] == "agent.cli:main"
    assert env["build_id"].startswith(VERSION + "-")
    assert not (ROOT / "agent" / "_embedded.py").exists()  # written into the staging copy only


def test_each_build_extracts_to_its_own_dir(built: Built, tmp_path: Path) -> None:
    # The running old version keeps its extracted code while a new file takes its path.
    other = tmp_path / built.path.name
    done = build(other, "9.8.8", built.signer.public_key.b64, "--no-verify")
    assert done.returncode == 0, done.stderr
    assert built.run("version").stdout == VERSION + "\n"
    proc = Built(other, built.signer, built.shiv_root, done.stdout).run("version")
    assert proc.stdout == "9.8.8\n"
    dirs = sorted(p.name for p in built.shiv_root.iterdir() if p.is_dir())
    assert len([d for d in dirs if d.startswith(built.path.name + "_")]) == 2, dirs


def test_rebuild_is_reproducible(built: Built, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        done = build(out, "v" + VERSION, built.signer.public_key.b64, "--no-verify")
        assert done.returncode == 0, done.stderr
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize(
    ("version", "keys", "culprit"),
    [("not a version", "", "not a version"), ("1.0", "bm90IGEga2V5", "bm90IGEga2V5")],
    ids=["bad-version", "bad-key"],
)
def test_build_refuses_bad_input(tmp_path: Path, version: str, keys: str, culprit: str) -> None:
    done = build(tmp_path / "out", version, keys)
    assert done.returncode == 2
    assert culprit in done.stderr  # the message names what is wrong
    assert not (tmp_path / "out").exists()


def _lazy_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                is_call = isinstance(inner, ast.Call) and ast.unparse(inner.func) in (
                    "__import__",
                    "importlib.import_module",
                )
                if isinstance(inner, ast.Import | ast.ImportFrom) or is_call:
                    found.append(f"{path.name}:{inner.lineno} in {node.name}()")
    return found


def test_agent_code_imports_nothing_lazily() -> None:
    # DESIGN section 4: the agent's file is replaced while it runs; import at start-up only.
    lazy = [hit for path in sorted((ROOT / "agent").glob("*.py")) for hit in _lazy_imports(path)]
    assert lazy == []
