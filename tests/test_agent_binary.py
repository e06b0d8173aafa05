"""The agent as one file per platform for CPython 3.9 - 3.13 (DESIGN section 7): `make agent-binary`.

The files are built as the Makefile builds them (packaging/build_agent.py; tests/agent_files.py
shares them across modules) and run as a host runs them: through the ``#!/usr/bin/env python3``
shebang with a chosen interpreter first on PATH, or as ``pythonX.Y FILE``, with the code cache
(``AVIKA_AGENT_CACHE``) in a temp dir and outside the source tree. Also here: the contract the
file relies on, that agent code imports nothing lazily (the file is replaced while it runs).
"""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent import cache, config
from agent.manifest import LocalSigner, generate_private_key, rollout_bucket
from tests.agent_files import OLD_PYTHONS, PYTHONS, ROOT, agent_files, build, interpreter, python3_env
from tests.agent_fixtures import LocalServer, Release, publish

VERSION = "9.8.7"
FORBIDDEN = ("boto3", "botocore", "s3transfer")
ELF = {"linux-amd64": 62, "linux-arm64": 183}  # e_machine: x86-64, AArch64
SUPPORTED = "CPython 3.9, 3.10, 3.11, 3.12 or 3.13"

pytestmark = pytest.mark.slow


@dataclass
class Built:
    path: Path
    signer: LocalSigner
    work: Path

    @property
    def cache(self) -> Path:
        return self.work / "cache"

    def env(self, python: str = "3.11", **extra: str) -> dict[str, str]:
        clean = {
            k: v
            for k, v in os.environ.items()
            if k not in config.KEYS and not k.startswith(("PYTHON", "AVIKA_", "XDG_"))
        }
        return {**clean, **python3_env(self.work / "bin", python), cache.ENV_VAR: str(self.cache), **extra}

    def run(
        self, *args: str, python: str = "3.11", file: Path | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """``FILE args`` through its shebang, ``python3`` being CPython ``python``."""
        return subprocess.run(
            [str(file or self.path), *args],
            env=self.env(python, **env),
            cwd=self.work,  # not the source tree: only the file's code may be used
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    signer = LocalSigner(generate_private_key())
    path = agent_files(tmp_path_factory).get("v" + VERSION, signer.public_key.b64, verify=True)
    return Built(path, signer, tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="session")
def arm64(tmp_path_factory: pytest.TempPathFactory, built: Built) -> Path:
    return agent_files(tmp_path_factory).get(VERSION, built.signer.public_key.b64, "linux-arm64")


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer() as srv:
        yield srv


def members(path: Path) -> dict[str, bytes]:
    """Every file in an agent file, the ones inside each ``cpXY/site.zip`` as ``cpXY/site.zip/NAME``
    and inside each dependencies' zip as ``deps/<blob>/NAME``."""
    out = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            out[name] = archive.read(name)
            if name.endswith("/" + cache.SITE) or name.startswith(cache.DEPS_BLOBS + "/"):
                with zipfile.ZipFile(io.BytesIO(out[name])) as inner:
                    out.update((f"{name}/{n}", inner.read(n)) for n in inner.namelist())
    return out


def boot_build(path: Path) -> dict[str, Any]:
    """The ``BUILD`` dict written into the file's ``__main__.py`` (what its boot reads)."""
    with zipfile.ZipFile(path) as archive:
        main = archive.read("__main__.py").decode()
    for node in ast.parse(main).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "BUILD":
            return ast.literal_eval(node.value)
    raise AssertionError("no BUILD in __main__.py")


# ---------------------------------------------------------------- runs on every supported Python


@pytest.mark.parametrize("python", PYTHONS)
def test_version_under_each_supported_python(built: Built, python: str) -> None:
    for done in (built.run("version", python=python), built.run("--version", python=python)):
        assert (done.returncode, done.stdout, done.stderr) == (0, VERSION + "\n", "")
    exe = interpreter(python)
    done = subprocess.run([exe, str(built.path), "version"], env=built.env(), capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, VERSION + "\n"), done.stderr
    assert built.path.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert os.access(built.path, os.X_OK)


@pytest.mark.parametrize("python", OLD_PYTHONS)
@pytest.mark.parametrize(
    "command", [["version"], ["--version"], ["run"], ["check", "--config", "/nonexistent"]]
)
def test_an_unsupported_python_gets_one_line_and_exit_2(
    built: Built, tmp_path: Path, python: str, command: list[str]
) -> None:
    if interpreter(python) is None:
        pytest.skip(f"no CPython {python} here")
    done = built.run(*command, python=python, **{cache.ENV_VAR: str(tmp_path / "cache")})
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert SUPPORTED in lines[0] and f" {python}." in lines[0] and f"avika-agent {VERSION}" in lines[0]
    assert not (tmp_path / "cache").exists()  # nothing was unpacked


def test_an_arm64_file_refuses_this_amd64_host_in_one_line(built: Built, arm64: Path) -> None:
    done = built.run("version", file=arm64)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines() == [
        f"avika-agent {VERSION} (linux-arm64) is for linux-arm64 hosts; this one is linux x86_64"
    ]


def test_detect_json(built: Built) -> None:
    done = built.run("detect", "--json", DEPLOYMENT_MODE="vm")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert list(out) == ["mode", "signals", "override"]
    assert (out["mode"], out["override"]) == ("vm", "vm")


@pytest.mark.parametrize("python", PYTHONS)
def test_check_trusts_the_embedded_key(
    built: Built, server: LocalServer, tmp_path: Path, python: str
) -> None:
    env = {
        "UPDATE_SERVER": server.url("/updates"),
        "UPDATE_STATE_DIR": str(tmp_path / "state"),
        "BUFFER_DIR": str(tmp_path / "data"),
        "AGENT_ID": "host-42",
        "DEPLOYMENT_MODE": "vm",
    }  # no UPDATE_PUBLIC_KEYS, no UPDATE_TARGET: the embedded key, the running file
    release = Release([built.signer])
    publish(server, release.envelope(serial=3, version="9.9.0"))
    done = built.run("check", python=python, **env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
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
    done = built.run("check", python=python, **env)
    assert done.returncode == 3
    assert json.loads(done.stdout)["error"] == "signature_invalid"


# ---------------------------------------------------------------- what the file holds


def test_the_file_carries_its_build_metadata(built: Built) -> None:
    info = cache.read_build_info(built.path)  # read, not run
    assert info == {
        "schema": 1,
        "name": "avika-agent",
        "version": VERSION,
        "platform": "linux-amd64",
        "pythons": list(PYTHONS),
        "glibc": "2.17",
        "key_ids": [built.signer.public_key.keyid],
        "build_id": info["build_id"],
        "dependencies": info["dependencies"],
        "unpacked_bytes": info["unpacked_bytes"],
        "lock_sha256": info["lock_sha256"],
    }
    assert re.fullmatch(rf"{re.escape(VERSION)}-[0-9a-f]{{16}}", info["build_id"])
    assert {"cryptography", "cffi", "click", "packaging"} <= set(info["dependencies"])
    assert sorted(info["unpacked_bytes"]) == sorted(f"cp{p.replace('.', '')}" for p in PYTHONS)
    assert "agent-binary" in (ROOT / "Makefile").read_text() and built.path.stat().st_size < 40 << 20


def test_the_file_holds_bytecode_for_every_python_and_no_boto3(built: Built) -> None:
    files = members(built.path)
    assert not [n for n in files if any(bad in n.lower() for bad in FORBIDDEN)]
    assert not [n for n in files if "__pycache__" in n]
    parts = boot_build(built.path)["tags"]
    for python in PYTHONS:
        tag = f"cp{python.replace('.', '')}"
        site = f"{tag}/{cache.SITE}"
        names = {n[len(site) + 1 :] for n in files if n.startswith(site + "/")}
        deps = parts[tag]["deps"]
        dep_names = {n[len(deps) + 1 :] for n in files if n.startswith(deps + "/")}
        assert not names & dep_names and not [n for n in dep_names if n.split("/")[0] in ("agent", "infra")]
        magic = (
            importlib.util.MAGIC_NUMBER if python == f"{sys.version_info[0]}.{sys.version_info[1]}" else None
        )
        assert magic is None or files[f"{deps}/click/core.pyc"][:4] == magic  # this Python's bytecode
        names |= dep_names
        assert f"cp{python.replace('.', '')}/{cache.BOOT_MODULE}.pyc" in files
        # The agent's own code with its sources (tracebacks), every module compiled.
        for module in ("agent/cli", "agent/cache", "agent/manifest", "infra/reports/validation"):
            assert {f"{module}.py", f"{module}.pyc"} <= names, (python, module)
        assert "agent/_embedded.pyc" in names
        # Dependencies as bytecode only.
        assert "click/core.pyc" in names and "click/core.py" not in names
        assert any(n.startswith("cryptography/") and n.endswith(".pyc") for n in names)
        assert not [n for n in names if n.endswith(".py") and n.split("/")[0] not in ("agent", "infra")]
        embedded = files[f"{site}/agent/_embedded.py"].decode()
        assert f"VERSION = '{VERSION}'" in embedded and built.signer.public_key.b64 in embedded
    assert not (ROOT / "agent" / "_embedded.py").exists()  # written into the build's copy only


@pytest.mark.parametrize("platform", ["linux-amd64", "linux-arm64"])
def test_native_code_is_all_for_the_platform(built: Built, arm64: Path, platform: str) -> None:
    path = built.path if platform == "linux-amd64" else arm64
    elf = {name: data for name, data in members(path).items() if data[:4] == b"\x7fELF"}
    machines = {name: int.from_bytes(data[18:20], "little") for name, data in elf.items()}
    assert machines and set(machines.values()) == {ELF[platform]}, machines
    assert all(name.startswith("native/") for name in elf)  # none inside site.zip
    boot = cache.read_build_info(path)
    assert boot["platform"] == platform


# ---------------------------------------------------------------- the code cache


def test_code_is_unpacked_once_per_build_into_the_cache(built: Built, tmp_path: Path) -> None:
    env = {cache.ENV_VAR: str(tmp_path / "cache")}
    assert built.run("version", **env).returncode == 0
    build_id = cache.read_build_info(built.path)["build_id"]
    home = tmp_path / "cache" / build_id / "cp311"
    site = home / cache.SITE
    first = site.stat()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [build_id]
    assert (tmp_path / "cache" / build_id / cache.BUILD_INFO).read_bytes() == zipfile.ZipFile(
        built.path
    ).read(cache.BUILD_INFO)
    assert (home / "native" / "cryptography" / "hazmat" / "bindings" / "_rust.abi3.so").is_file()
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700
    assert built.run("version", python="3.11", **env).returncode == 0
    assert (site.stat().st_ino, site.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not again
    assert built.run("version", python="3.13", **env).returncode == 0
    assert sorted(p.name for p in (tmp_path / "cache" / build_id).iterdir()) == [
        cache.BUILD_INFO,
        "cp311",
        "cp313",
    ]
    assert not [p for p in (tmp_path / "cache").rglob(".tmp-*")]


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the file as another user")
def test_a_user_who_cannot_write_var_cache_unpacks_under_home(built: Built) -> None:
    shared = Path(tempfile.mkdtemp(prefix="avika-nobody-"))
    try:
        shared.chmod(0o755)
        file = shared / "avika-agent"
        shutil.copy2(built.path, file)
        home = shared / "home"
        home.mkdir()
        os.chown(home, 65534, 65534)
        env = {k: v for k, v in built.env().items() if k != cache.ENV_VAR}
        done = subprocess.run(
            [str(file), "version"],
            env={**env, "HOME": str(home)},
            cwd=home,
            user=65534,
            group=65534,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (done.returncode, done.stdout) == (0, VERSION + "\n"), done.stderr
        unpacked = home / ".cache" / "avika-agent" / cache.read_build_info(file)["build_id"] / "cp311"
        assert (unpacked / cache.SITE).stat().st_uid == 65534
    finally:
        shutil.rmtree(shared)


def test_a_cache_others_can_write_is_refused(built: Built, tmp_path: Path) -> None:
    # The cache holds code the agent (root) runs: a directory anyone may write to is an exploit.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    done = built.run("version", **{cache.ENV_VAR: str(shared)})
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.splitlines() == [
        f"avika-agent: no usable directory for the agent's code ({shared}: writable by others (mode 777)); "
        f"set {cache.ENV_VAR} to a directory this user owns"
    ]
    assert list(shared.iterdir()) == []


# ---------------------------------------------------------------- building


def test_rebuild_is_reproducible(built: Built, tmp_path: Path) -> None:
    again = tmp_path / "again"
    done = build(again, "v" + VERSION, built.signer.public_key.b64, "--no-verify")
    assert done.returncode == 0, done.stderr
    assert again.read_bytes() == built.path.read_bytes()


@pytest.mark.parametrize(
    ("version", "keys", "culprit"),
    [
        ("not a version", "none", "not a version"),
        ("1.0", "bm90IGEga2V5", "bm90IGEga2V5"),
        ("1.0", "", "PUBLIC_KEYS is required"),
        ("1.0", None, "--public-keys are required"),
    ],
    ids=["bad-version", "bad-key", "empty-keys", "no-keys"],
)
def test_build_refuses_bad_input(tmp_path: Path, version: str, keys: str | None, culprit: str) -> None:
    done = build(tmp_path / "out", version, keys)
    assert done.returncode == 2
    assert culprit in done.stderr  # the message names what is wrong
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("keys", [None, ""], ids=["missing", "empty"])
def test_make_agent_binary_requires_public_keys(tmp_path: Path, keys: str | None) -> None:
    args = [
        "make",
        "-s",
        "-o",
        ".venv/.installed-stamp",
        "agent-binary",
        "VERSION=1.0",
        f"OUT={tmp_path / 'f'}",
    ]
    done = subprocess.run(
        args + ([] if keys is None else [f"PUBLIC_KEYS={keys}"]), cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "PUBLIC_KEYS is required" in done.stderr and "PUBLIC_KEYS=none" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_keyless_file_is_built_only_on_purpose(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "keyless"
    args = ["make", "-s", "-o", ".venv/.installed-stamp", "agent-binary", "VERSION=9.8.9", f"OUT={out}"]
    done = subprocess.run([*args, "PUBLIC_KEYS=none"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert cache.read_build_info(out)["key_ids"] == []
    assert "key ids none (keyless)" in done.stdout
    # Such a file trusts only UPDATE_PUBLIC_KEYS: without it, the agent refuses to run.
    refused = built.run("check", file=out, UPDATE_SERVER="http://127.0.0.1:9/updates")
    assert refused.returncode == 2 and "UPDATE_PUBLIC_KEYS" in refused.stderr


# ---------------------------------------------------------------- the rule the file relies on


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
