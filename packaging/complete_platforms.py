#!/usr/bin/env python3
"""Write ``packaging/platforms/linux-{amd64,arm64}-cpXY.json``: the targets the agent file is built for.

    .venv/bin/python packaging/complete_platforms.py [--python 3.9=/path/to/python3.9 ...]

pex resolves wheels for a "complete platform": an interpreter's marker environment and the
wheel tags it accepts, as ``pex3 interpreter inspect --markers --tags`` prints them. This script
asks each local CPython 3.9 - 3.13 (agent.buildinfo.PYTHONS) once and derives both platforms:

- tags newer than manylinux2014 (``manylinux_2_18`` and up) and plain ``linux_*`` tags (wheels
  built on one machine for itself) are dropped, so only wheels that run on glibc >= 2.17 resolve;
- the arm64 file is the amd64 one with ``x86_64`` rewritten to ``aarch64`` (markers and tags), so
  one amd64 host resolves arm64 wheels;
- the host-specific markers (``platform_release``, ``platform_version``) are blanked.

The output is committed; rerun this only to add a Python version or change the glibc floor.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from build_agent import find_interpreters  # noqa: E402

from agent.buildinfo import GLIBC, PLATFORMS, PYTHONS  # noqa: E402

OUT = ROOT / "packaging" / "platforms"
PEX3 = Path(sys.executable).with_name("pex3")
_MANYLINUX = re.compile(r"manylinux_(\d+)_(\d+)_")


def portable(tag: str) -> bool:
    """A wheel tag whose wheels run on every glibc >= GLIBC host."""
    found = _MANYLINUX.search(tag)
    if found and (int(found[1]), int(found[2])) > GLIBC:
        return False
    return not re.search(r"-linux_[a-z0-9_]+$", tag)


def derive(inspected: dict, machine: str) -> dict:
    env = dict(inspected["marker_environment"], platform_release="", platform_version="")
    env["platform_machine"] = machine
    tags = [t.replace("x86_64", machine) for t in inspected["compatible_tags"] if portable(t)]
    return {"marker_environment": env, "compatible_tags": tags}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", default=[], metavar="X.Y=PATH")
    args = parser.parse_args(argv)
    pythons = find_interpreters(PYTHONS, dict(p.split("=", 1) for p in args.python))
    OUT.mkdir(exist_ok=True)
    for version, python in pythons.items():
        done = subprocess.run(
            [str(PEX3), "interpreter", "inspect", "--markers", "--tags", "--python", python],
            capture_output=True,
            text=True,
            check=True,
        )
        inspected = json.loads(done.stdout)
        if inspected["marker_environment"]["platform_machine"] != "x86_64":
            raise SystemExit(f"{python}: run this on an x86_64 host (arm64 is derived from amd64)")
        for platform, machine in PLATFORMS.items():
            path = OUT / f"{platform}-cp{version.replace('.', '')}.json"
            path.write_text(json.dumps(derive(inspected, machine), indent=1) + "\n")
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
