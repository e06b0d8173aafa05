#!/usr/bin/env python3
"""Build the agent as one self-contained executable (DESIGN section 7).

    make agent-binary VERSION=V OUT=FILE [PUBLIC_KEYS=k1,k2]
    .venv/bin/python packaging/build_agent.py --version V --out FILE [--public-keys k1,k2]

The result is a shiv zipapp (shebang ``/usr/bin/env python3``) holding the ``agent`` and
``infra`` packages and the agent's run-time dependencies, copied from this interpreter's
site-packages (cryptography's native code included; never boto3): nothing comes from the
network. ``agent/_embedded.py`` (VERSION, PUBLIC_KEYS) is written into the staging copy only,
never into the source tree.

- Native extensions are this interpreter's: the binary runs on the same platform (linux-amd64 or
  linux-arm64) with a ``python3`` of the same minor version (cffi's backend is version-specific).
  Build each platform's file on that platform.
- The dependency staging dir is cached under ``build/agent-deps/`` keyed by the interpreter and
  the exact package versions, so a rebuild only re-stages the agent's own code.
- shiv extracts the zipapp to ``$SHIV_ROOT`` (default ``~/.shiv``) in ``<file name>_<build id>``;
  the build id here is ``<version>-<hash of every staged file>``, so two builds (two versions, or
  the same version with other keys) never share an extraction dir -- the running old version
  keeps its own while the new file replaces it.
- The zip is reproducible for identical inputs (fixed timestamps, sorted entries).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: import the agent's own version and key parsing

from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402

from agent.manifest import normalize_version, parse_public_keys  # noqa: E402

# What the agent imports at run time (pyproject's dependencies minus boto3); the build takes
# their closure of requirements, so a new transitive dependency is picked up by itself.
RUNTIME_ROOTS = ("cryptography", "click", "requests", "packaging")
FORBIDDEN = frozenset({"boto3", "botocore", "s3transfer"})  # the agent runs in 64 MiB: never these
APP_PACKAGES = ("agent", "infra")
ENTRY_POINT = "agent.cli:main"
SHEBANG = "/usr/bin/env python3"
EMBEDDED = "_embedded.py"


class BuildError(Exception):
    pass


def runtime_distributions(roots: tuple[str, ...] = RUNTIME_ROOTS) -> list[metadata.Distribution]:
    """``roots`` and everything they require here (markers evaluated, no extras), sorted by name."""
    found: dict[str, metadata.Distribution] = {}
    pending = [canonicalize_name(r) for r in roots]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        if name in FORBIDDEN:
            raise BuildError(f"{name} must never be part of the agent")
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise BuildError(f"{name} is not installed in {sys.prefix}; run `make venv`") from None
        found[name] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(canonicalize_name(requirement.name))
    return [found[name] for name in sorted(found)]


def deps_key(dists: list[metadata.Distribution]) -> str:
    """Interpreter + platform + exact versions: what makes a staged dependency dir reusable."""
    parts = [sys.implementation.cache_tag, sysconfig.get_platform()]
    parts += sorted(f"{canonicalize_name(d.metadata['Name'])}=={d.version}" for d in dists)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _wanted(relative: Path) -> bool:
    return ".." not in relative.parts and "__pycache__" not in relative.parts and relative.suffix != ".pyc"


def stage_dependencies(dists: list[metadata.Distribution], cache_root: Path) -> Path:
    """Copy each distribution's installed files (its RECORD) into a cached site-packages dir."""
    dest = cache_root / f"deps-{deps_key(dists)}"
    if (dest / "complete").exists():
        return dest / "site-packages"
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".deps-", dir=cache_root))
    try:
        tmp.chmod(0o755)
        for dist in dists:
            for relative in dist.files or []:
                rel = Path(relative)
                if not _wanted(rel):  # scripts in ../../bin, byte code
                    continue
                source = Path(dist.locate_file(relative))
                if not source.is_file():
                    raise BuildError(f"{dist.metadata['Name']}: {source} is listed but missing")
                target = tmp / "site-packages" / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        (tmp / "complete").write_text("\n".join(f"{d.metadata['Name']}=={d.version}" for d in dists) + "\n")
        try:
            tmp.rename(dest)
        except OSError:  # a concurrent build staged it first
            if not (dest / "complete").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest / "site-packages"


def _copy_package(name: str, dest: Path) -> None:
    def ignore(directory: str, names: list[str]) -> set[str]:
        keep = {"py.typed"}
        return {
            n
            for n in names
            if n == "__pycache__"
            or (Path(directory) == ROOT / "agent" and n == EMBEDDED)  # a stale dev copy
            or (not n.endswith(".py") and n not in keep and not (Path(directory) / n).is_dir())
        }

    shutil.copytree(ROOT / name, dest / name, ignore=ignore)


def stage_app(dest: Path, version: str, public_keys: str) -> None:
    """The agent's own packages, with ``agent/_embedded.py`` written into this copy only."""
    for name in APP_PACKAGES:
        _copy_package(name, dest)
    (dest / "agent" / EMBEDDED).write_text(
        '"""Written by packaging/build_agent.py: what this build embeds (see agent/buildinfo.py)."""\n\n'
        f"VERSION = {version!r}\nPUBLIC_KEYS = {public_keys!r}\n",
        encoding="utf-8",
    )


def tree_hash(*roots: Path) -> str:
    """SHA-256 over every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


def build(
    version: str,
    out: Path,
    public_keys: str = "",
    *,
    cache_root: Path = ROOT / "build" / "agent-deps",
    python: str = SHEBANG,
    verify: bool = True,
) -> dict[str, object]:
    """Build ``out``; returns what was built (version, build id, size, seconds)."""
    started = time.monotonic()
    version = normalize_version(version)
    keys = ",".join(k.b64 for k in parse_public_keys(public_keys))
    deps = stage_dependencies(runtime_distributions(), cache_root)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="avika-agent-build-") as work:
        app = Path(work) / "app"
        app.mkdir()
        stage_app(app, version, keys)
        build_id = f"{version}-{tree_hash(deps, app)[:16]}"
        partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
        command = [
            sys.executable,
            "-m",
            "shiv",
            "--site-packages",
            str(deps),
            "--site-packages",
            str(app),
            "--entry-point",
            ENTRY_POINT,
            "--output-file",
            str(partial),
            "--python",
            python,
            "--build-id",
            build_id,
            "--reproducible",
            "--compressed",
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise BuildError(f"shiv failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        try:
            if verify:
                _verify(partial, version, Path(work) / "shiv-root")
            partial.chmod(0o755)
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
    return {
        "version": version,
        "out": str(out),
        "build_id": build_id,
        "size": out.stat().st_size,
        "seconds": round(time.monotonic() - started, 2),
    }


def _verify(binary: Path, version: str, shiv_root: Path) -> None:
    """``FILE version`` must print the version: the same smoke test an agent runs before a swap."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHIV_", "PYTHON"))}
    env["SHIV_ROOT"] = str(shiv_root)
    done = subprocess.run(
        [sys.executable, str(binary), "version"], env=env, capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0 or done.stdout.strip() != version:
        raise BuildError(
            f"the built binary does not run: `version` exited {done.returncode}, "
            f"printed {done.stdout.strip()!r}, stderr:\n{done.stderr}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", required=True, help="agent version (a leading v is dropped)")
    parser.add_argument("--out", required=True, type=Path, help="the executable to write")
    parser.add_argument("--public-keys", default="", help="comma-separated base64 Ed25519 keys to embed")
    parser.add_argument("--no-verify", action="store_true", help="do not run `FILE version` after building")
    args = parser.parse_args(argv)
    try:
        result = build(args.version, args.out, args.public_keys, verify=not args.no_verify)
    except (BuildError, ValueError) as exc:
        print(f"build_agent: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    print(
        f"built {result['out']}: version {result['version']}, {result['size']} bytes, "
        f"build id {result['build_id']}, {result['seconds']}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
