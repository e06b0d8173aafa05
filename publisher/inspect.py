"""What ``release`` checks in each binary before shipping it (DESIGN section 6): read, never run.

An agent file (``make agent-binary``) is a zip archive carrying ``avika-build.json``: version,
platform, supported Pythons, the key ids it trusts, build id. :func:`inspect` reads and checks that
metadata, and that every native library inside is built for the platform it names, without
executing anything (the release host may be another platform, and a binary is untrusted input).
:func:`check_release` refuses (exit 2, before anything is uploaded) a binary:

- whose version is not the release's: every agent would fail its smoke test and back off for hours;
- whose platform is not the one it is given for;
- that embeds none of the keys signing this release: agents running it could not verify the next;
- that is not an agent build at all (``README.md``, a truncated file, another program).

A foreign build (e.g. a Go agent) goes through with ``--no-inspect``, and a warning.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion

from agent.buildinfo import PLATFORMS
from agent.cache import BUILD_INFO, read_build_info
from agent.manifest import Signer, normalize_version, parse_version
from publisher.errors import Refused

NAME = "avika-agent"
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}  # e_machine: EM_X86_64, EM_AARCH64
_KEY_ID = re.compile(r"^[0-9a-f]{64}$")
_FOREIGN = "pass --no-inspect to publish a foreign build (e.g. a Go agent)"


class NotAnAgentBuild(Refused):
    code = "not_an_agent_build"


@dataclass(frozen=True)
class AgentBuild:
    """The checked metadata of one agent file."""

    path: Path
    version: str
    platform: str
    pythons: tuple[str, ...]
    key_ids: tuple[str, ...]
    build_id: str
    native: dict[str, int]  # machine -> number of native libraries built for it
    info: dict[str, Any]  # avika-build.json as the file carries it

    def to_json(self) -> dict[str, Any]:
        return {**self.info, "file": str(self.path), "native": self.native}


def _field(info: Mapping[str, Any], key: str, kind: type, path: Path) -> Any:
    value = info.get(key)
    if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
        raise NotAnAgentBuild(f"{path}: {BUILD_INFO} has no valid {key!r} ({value!r}); {_FOREIGN}")
    return value


def _native_machines(path: Path) -> dict[str, int]:
    """Machine -> count of the ELF files under ``native/`` in the archive (a few bytes of each)."""
    counts: dict[str, int] = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if not name.startswith("native/"):
                continue
            with archive.open(name) as member:
                head = member.read(20)
            if head[:4] != b"\x7fELF":
                raise NotAnAgentBuild(f"{path}: {name} is not a native library")
            machine = ELF_MACHINES.get(int.from_bytes(head[18:20], "little"), "other")
            counts[machine] = counts.get(machine, 0) + 1
    return counts


def inspect(path: Path) -> AgentBuild:
    """Read ``path``'s metadata; ``NotAnAgentBuild`` (exit 2) naming what is missing or wrong."""
    try:
        info = read_build_info(path)
        native = _native_machines(path)
    except ValueError as exc:
        raise NotAnAgentBuild(f"{exc}: not an agent build; {_FOREIGN}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:  # unreadable, or a truncated member
        raise NotAnAgentBuild(f"{path}: cannot read it as an agent build ({exc}); {_FOREIGN}") from None
    if info.get("schema") != 1 or info.get("name") != NAME:
        raise NotAnAgentBuild(f"{path}: {BUILD_INFO} is not an {NAME} build's (schema 1); {_FOREIGN}")
    version = _field(info, "version", str, path)
    platform = _field(info, "platform", str, path)
    key_ids = _field(info, "key_ids", list, path)
    try:
        normalize_version(version)
    except InvalidVersion:
        raise NotAnAgentBuild(f"{path}: {BUILD_INFO} has version {version!r}, not a version") from None
    if platform not in PLATFORMS:
        known = ", ".join(sorted(PLATFORMS))
        raise NotAnAgentBuild(f"{path}: {BUILD_INFO} names platform {platform!r}, not one of {known}")
    bad_ids = [k for k in key_ids if not _KEY_ID.match(k)]
    if bad_ids:
        raise NotAnAgentBuild(f"{path}: {BUILD_INFO} has key ids that are not hex SHA-256: {bad_ids}")
    machine = PLATFORMS[platform]
    if set(native) - {machine}:
        found = ", ".join(f"{n} {m}" for m, n in sorted(native.items()))
        raise NotAnAgentBuild(f"{path} says {platform} but carries native code for another machine ({found})")
    return AgentBuild(
        path=path,
        version=version,
        platform=platform,
        pythons=tuple(_field(info, "pythons", list, path)),
        key_ids=tuple(key_ids),
        build_id=_field(info, "build_id", str, path),
        native=native,
        info=info,
    )


def problems(build: AgentBuild, version: str, platform: str, signing_key_ids: Sequence[str]) -> list[str]:
    """Why ``build`` cannot ship as ``platform`` in release ``version`` (pure: data in, reasons out)."""
    found = []
    if parse_version(build.version) != parse_version(version):
        found.append(
            f"{build.path} is {NAME} {build.version}, not {version} (build it with VERSION={version})"
        )
    if build.platform != platform:
        found.append(f"{build.path} is built for {build.platform} but given as {platform}")
    if signing_key_ids and not set(build.key_ids) & set(signing_key_ids):
        embedded = ", ".join(k[:16] for k in build.key_ids) or "no keys (PUBLIC_KEYS=none)"
        signing = ", ".join(k[:16] for k in signing_key_ids)
        found.append(
            f"{build.path} embeds {embedded} and none signs this release ({signing}): agents running it "
            "could not verify the next release; rebuild it with PUBLIC_KEYS naming a signing key"
        )
    return found


def check_release(
    binaries: Mapping[str, Path], version: str, signers: Sequence[Signer], *, inspect_files: bool = True
) -> str | None:
    """``release``'s check of every binary: ``Refused`` (exit 2) listing every problem found.

    Returns the warning to print once the release is published with ``--no-inspect``, else None.

    With no signers (a dry run without a key) the key check is left out. A version that is not one
    and platform names that are not ours are the release's own input checks (publisher/release.py),
    which follow with their own messages; the files given for known platforms are checked here.
    """
    if not inspect_files:
        return (
            f"--no-inspect: {', '.join(f'{p}={b}' for p, b in sorted(binaries.items()))} published "
            f"without checking that each is an {NAME} build of {version} for its platform that trusts "
            "this release's keys"
        )
    try:
        version = normalize_version(version)
    except InvalidVersion:
        return None
    key_ids = [s.public_key.keyid for s in signers]
    found = []
    for platform, path in sorted(binaries.items()):
        if platform in PLATFORMS:
            found += problems(inspect(path), version, platform, key_ids)
    if found:
        raise Refused("; ".join(found))
    return None


def describe(build: AgentBuild) -> list[str]:
    """``avika-publish inspect`` for a person."""
    deps = build.info.get("dependencies")
    rows = [
        ("file", str(build.path)),
        ("name", NAME),
        ("version", build.version),
        ("platform", build.platform),
        ("pythons", "CPython " + ", ".join(build.pythons)),
        ("glibc", f">= {build.info.get('glibc', '?')}"),
        ("native code", ", ".join(f"{n} {m}" for m, n in sorted(build.native.items())) or "none"),
        ("key ids", ", ".join(build.key_ids) or "none (a keyless build: agents need UPDATE_PUBLIC_KEYS)"),
        ("build id", build.build_id),
    ]
    if isinstance(deps, dict):
        rows.append(("dependencies", ", ".join(f"{k} {v}" for k, v in sorted(deps.items()))))
    return [f"{label:<13}{value}" for label, value in rows]


def to_json(build: AgentBuild) -> str:
    return json.dumps(build.to_json(), indent=2)
