"""Real agent files for the tests, built as ``make agent-binary`` builds them, once per session.

``packaging/build_agent.py`` takes several seconds per file (five interpreters compile the
agent's code; the dependencies come compiled from build/agent-deps): :func:`agent_files` shares
one :class:`AgentFiles` across test modules, which builds each (version, keys, platform) once.
:func:`python3_env` puts a chosen interpreter first on PATH as ``python3``, which is what the
file's ``#!/usr/bin/env python3`` runs.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "packaging" / "build_agent.py"
PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
OLD_PYTHONS = ("3.8", "3.7", "3.6", "2.7")  # hosts' python3 the agent refuses (RHEL 8's is 3.6)


def interpreter(version: str) -> str | None:
    """``pythonX.Y`` from pyenv's versions (real binaries, not shims), else PATH."""
    pyenv = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = sorted(glob.glob(os.path.join(pyenv, "versions", f"{version}.*", "bin", f"python{version}")))
    return found[-1] if found else shutil.which(f"python{version}")


def require_interpreter(version: str) -> str:
    found = interpreter(version)
    if found is None:
        pytest.skip(f"no CPython {version} on this machine")
    return found


def python3_env(bin_dir: Path, version: str) -> dict[str, str]:
    """PATH with ``bin_dir/python3`` -> CPython ``version`` first (created once)."""
    link = bin_dir / f"py{version}" / "python3"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(require_interpreter(version))
    return {"PATH": f"{link.parent}{os.pathsep}/usr/bin:/bin"}


def build(out: Path, version: str, keys: str | None, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, str(BUILD), "--version", version, "--out", str(out)]
    if keys is not None:
        args += ["--public-keys", keys]
    return subprocess.run([*args, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


class AgentFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[tuple[str, str, str, bool], Path] = {}
        self.outputs: dict[Path, str] = {}

    def get(self, version: str, keys: str, platform: str = "linux-amd64", *, verify: bool = False) -> Path:
        """The file for (version, keys, platform); built on first use (``verify``: run under
        every interpreter as the build does by default)."""
        key = (version, keys, platform, verify)
        if key not in self.built:
            out = self.root / f"{len(self.built)}" / f"avika-agent-{platform}"
            out.parent.mkdir(parents=True)
            extra = ["--platform", platform, *([] if verify else ["--no-verify"])]
            done = build(out, version, keys, *extra)
            assert done.returncode == 0, done.stderr
            self.built[key] = out
            self.outputs[out] = done.stdout
        return self.built[key]


_shared: AgentFiles | None = None


def agent_files(factory: pytest.TempPathFactory) -> AgentFiles:
    global _shared
    if _shared is None:
        _shared = AgentFiles(factory.mktemp("agent-files"))
    return _shared
