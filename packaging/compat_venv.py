#!/usr/bin/env python3
"""Set-up: a virtualenv per extra Python for the agent's unit tests (``make venv``; network).

    .venv/bin/python packaging/compat_venv.py 3.9 3.13 [--python 3.9=PATH ...]

``.venv-py39`` (etc.) gets the interpreter found as packaging/build_agent.py finds it, exactly the
wheels an agent file ships for that Python (from the lock, out of pex's cache: the tests run
against what hosts run), and the test tools (pytest, pytest-timeout, hypothesis) from the index.
This machine's pip configuration (extra indexes, find-links) is ignored, as on any other machine.
A venv whose stamp is newer than the lock and this script is left alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from build_agent import LOCK, ROOT, BuildError, _wheels, find_interpreters, tag_of

from agent.environment import platform_key

# urllib3: test_manifest_properties checks URLs against a second parser (urllib3's).
TEST_TOOLS = ("pytest>=8.0", "pytest-timeout>=2.3", "hypothesis>=6.100", "urllib3>=1.26")
STAMP = ".installed-stamp"


def venv_dir(version: str) -> Path:
    return ROOT / f".venv-py{version.replace('.', '')}"


def _pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CERT"}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def make(version: str, python: str) -> Path:
    venv = venv_dir(version)
    stamp = venv / STAMP
    inputs = max(LOCK.stat().st_mtime, Path(__file__).stat().st_mtime)
    if stamp.exists() and stamp.stat().st_mtime >= inputs:
        return venv
    subprocess.run([python, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    with tempfile.TemporaryDirectory(prefix="avika-compat-") as tmp:
        wheels = _wheels(platform_key(), version, Path(tmp))
        subprocess.run([*pip, "--no-index", "--no-deps", *map(str, wheels)], env=_pip_env(), check=True)
    subprocess.run([*pip, *TEST_TOOLS], env=_pip_env(), check=True)
    stamp.touch()
    return venv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="*", metavar="X.Y")
    parser.add_argument("--python", action="append", default=[], metavar="X.Y=PATH")
    args = parser.parse_args(argv)
    try:
        found = find_interpreters(args.versions, dict(p.split("=", 1) for p in args.python))
        for version, python in found.items():
            venv = make(version, python).relative_to(ROOT)
            print(f"{venv}: CPython {version} ({python}) with the {tag_of(version)} wheels of an agent file")
    except (BuildError, subprocess.CalledProcessError) as exc:
        print(f"compat_venv: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
