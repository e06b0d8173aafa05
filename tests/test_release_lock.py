"""requirements/release.lock pins, by hash, everything the jobs that can sign install (issue 10).

The release and maintenance workflows install the publisher with `pip install --require-hashes
--only-binary :all: -r requirements/release.lock`, then the checkout itself with `--no-deps
--no-build-isolation --no-index`. So the lock must hold, offline-checkably:

- every run-time dependency of pyproject.toml ([project].dependencies) and every build requirement
  ([build-system].requires), at a version that satisfies the declared bounds;
- only exact `==` pins, each with at least one sha256 hash, and no option that could add an index, a
  local path or an unpinned URL;
- the dependencies of what it pins: wherever this environment has the same version of a locked
  distribution installed, its requirements (for the runner: Linux x86_64, CPython 3.11) are in the
  lock too and satisfied by the locked versions. A hole would make pip refuse the install in CI
  ("hashes are required ... missing from some requirements"); this finds it before a tag does.

Regenerate (needs PyPI; pip-tools is not a test dependency) as docs/deploy-aws.md section 11 says.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "release.lock"
PYPROJECT = ROOT / "pyproject.toml"
# The runner that installs the lock: ubuntu-24.04 (x86_64) with setup-python 3.11.
RUNNER_ENVIRONMENT = {
    **default_environment(),
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "platform_machine": "x86_64",
    "platform_system": "Linux",
    "sys_platform": "linux",
    "os_name": "posix",
    "python_version": "3.11",
    "python_full_version": "3.11.13",
    "extra": "",
}
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)\s*(?:\\)?$")
HASH = re.compile(r"^--hash=sha256:[0-9a-f]{64}\s*(?:\\)?$")


@dataclass
class Pinned:
    version: Version
    hashes: list[str] = field(default_factory=list)


def parse_lock(text: str) -> dict[str, Pinned]:
    """The lock's pins; any line that is not a pin, a hash or a comment is an error."""
    pins: dict[str, Pinned] = {}
    current: Pinned | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if match := PIN.match(line):
            name = canonicalize_name(match["name"])
            assert name not in pins, f"line {number}: {name} pinned twice"
            current = pins[name] = Pinned(Version(match["version"]))
        elif HASH.match(line):
            assert current is not None, f"line {number}: a hash before any pin"
            current.hashes.append(line.split(":", 1)[1].rstrip(" \\"))
        else:
            pytest.fail(
                f"{LOCK.name} line {number} is neither an == pin, a sha256 hash nor a comment: {raw!r}"
            )
    return pins


@pytest.fixture(scope="module")
def pins() -> dict[str, Pinned]:
    return parse_lock(LOCK.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def test_every_pin_is_exact_and_hashed(pins: dict[str, Pinned]) -> None:
    assert pins, "the lock pins nothing"
    unhashed = [name for name, pin in pins.items() if not pin.hashes]
    assert unhashed == []


@pytest.mark.parametrize("section", ["runtime", "build"])
def test_the_lock_satisfies_pyproject(section: str, pins: dict[str, Pinned], pyproject: dict) -> None:
    declared = (
        pyproject["project"]["dependencies"]
        if section == "runtime"
        else pyproject["build-system"]["requires"]
    )
    assert declared
    for text in declared:
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate(RUNNER_ENVIRONMENT):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in {LOCK.name}"
        assert requirement.specifier.contains(pins[name].version, prereleases=True), (
            f"{LOCK.name} pins {name}=={pins[name].version}, which does not satisfy {requirement}"
        )


def installed_version(name: str) -> Version | None:
    try:
        return Version(importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        return None


def test_what_the_lock_pins_has_its_dependencies_pinned(pins: dict[str, Pinned]) -> None:
    checked = []
    for name, pin in pins.items():
        if installed_version(name) != pin.version:
            continue  # this environment has another version: its metadata would not be the locked one's
        checked.append(name)
        for text in importlib.metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate(RUNNER_ENVIRONMENT):
                continue
            dependency = canonicalize_name(requirement.name)
            assert dependency in pins, f"{name}=={pin.version} needs {requirement}, which the lock lacks"
            assert requirement.specifier.contains(pins[dependency].version, prereleases=True), (
                f"{name}=={pin.version} needs {requirement}; the lock pins {pins[dependency].version}"
            )
    # Which of them this run could check, for whoever reads the log with -rA.
    print(f"dependencies checked for {len(checked)} of {len(pins)} pins: {', '.join(sorted(checked))}")


def test_the_parser_refuses_what_pip_would_not_hash_check() -> None:
    good = "click==8.1.7 \\\n    --hash=sha256:" + "a" * 64 + "\n"
    assert parse_lock(good)["click"].version == Version("8.1.7")
    for bad in (
        "click>=8.1\n",
        "--extra-index-url https://example.com/simple\n",
        "-e .\n",
        "click @ https://example.com/click.whl\n",
        "--find-links /opt/wheels\n",
    ):
        with pytest.raises(pytest.fail.Exception):
            parse_lock(bad)
    assert parse_lock("click==8.1.7\n")["click"].hashes == []
