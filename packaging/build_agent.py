#!/usr/bin/env python3
"""Build the agent as one file per platform that runs on CPython 3.9 - 3.13 (DESIGN section 7).

    make agent-binary VERSION=V OUT=FILE PUBLIC_KEYS=k1,k2|none [PLATFORM=linux-arm64]
    .venv/bin/python packaging/build_agent.py --version V --out FILE --public-keys k1,k2|none
        [--platform linux-amd64|linux-arm64] [--python 3.9=PATH ...] [--no-verify]
    .venv/bin/python packaging/build_agent.py --fetch   # set-up (`make venv`): download the locked wheels
    .venv/bin/python packaging/build_agent.py --lock    # re-resolve packaging/agent-lock.json (network)

How (nothing comes from the network: the wheels were fetched once by ``make venv``):

- Dependencies: ``packaging/agent-lock.json`` pins the agent's run-time dependencies
  (``packaging/agent-requirements.txt``: pyproject's minus boto3) with the hash of every wheel,
  one version per project for all five Pythons. pex (``pex3 download --lock``) picks each
  interpreter's wheels for the target platform from ``packaging/platforms/<platform>-cpXY.json``
  (complete platforms limited to manylinux2014, so glibc >= 2.17; the arm64 ones are the amd64
  ones with the machine rewritten, which is how an amd64 host builds an arm64 file). Wheels come
  from pex's cache in ``.venv/pex-root``; a proxy on a closed port stops any network access.
- Bytecode: every module is compiled by each of the five interpreters (hash-based pycs, a fixed
  hash seed: reproducible); dependencies ship as bytecode only, the agent's own code (``agent/``
  and the ``infra/`` modules it imports) with its sources for readable tracebacks.
- The file: ``#!/usr/bin/env python3`` + a zip archive (so ``python3 FILE`` runs it too) holding
  ``__main__.py`` (packaging/agent_main.py: refuses an unsupported interpreter or host with one
  line, exit 2), ``avika-build.json`` (version, platform, Pythons, embedded key ids, build id:
  what ``avika-publish`` checks), and per Python ``cpXY/site.zip`` (the agent's own code),
  ``cpXY/_avika_cache.pyc`` (agent/cache.py, which unpacks and imports), the dependencies'
  pure-Python code as ``deps/<sha256>`` (a zip per Python) and their native libraries under
  ``native/<sha256>`` (stored once when several Pythons share one). Named by content, both are
  hard-linked on a host from a build that already unpacked them: a release that changes only the
  agent unpacks about 1 MB, not 4 MB plus native code.
- The build id is ``<version>-<hash of everything in the file>``; the same inputs give the same
  bytes. ``FILE version`` is run under each local interpreter before the file is put in place
  (the arm64 file cannot run here: its native code is checked to be all AArch64 instead).
"""

from __future__ import annotations

import argparse
import ast
import glob
import hashlib
import io
import json
import os
import pprint
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the agent's own version rules and key parsing

from agent import cache  # noqa: E402
from agent.buildinfo import GLIBC, PLATFORMS, PYTHONS  # noqa: E402
from agent.environment import platform_key  # noqa: E402
from agent.manifest import normalize_version, parse_public_keys  # noqa: E402

PACKAGING = ROOT / "packaging"
REQUIREMENTS = PACKAGING / "agent-requirements.txt"
LOCK = PACKAGING / "agent-lock.json"
PLATFORM_DIR = PACKAGING / "platforms"
MAIN_TEMPLATE = PACKAGING / "agent_main.py"
PEX_ROOT = ROOT / ".venv" / "pex-root"  # set-up downloads live with the venv: `make clean` keeps them
DEPS_CACHE = ROOT / "build" / "agent-deps"
PEX3 = Path(sys.executable).with_name("pex3")
# One version per project that every supported Python accepts (cryptography excludes 3.9.0/3.9.1).
LOCK_INTERPRETERS = "CPython>=3.9.2,<3.14"
APP_PACKAGES = ("agent", "infra")
FORBIDDEN = frozenset({"boto3", "botocore", "s3transfer"})  # the agent runs in 64 MiB: never these
SHEBANG = b"#!/usr/bin/env python3\n"
NAME = "avika-agent"
KEYLESS = "none"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
ELF_MACHINES = {"x86_64": 62, "aarch64": 183}  # e_machine: EM_X86_64, EM_AARCH64
_EXTENSION = re.compile(r"\.(?:cpython-\d+[a-z]*-[a-z0-9_]+-linux-gnu\.|abi3\.)?so$")
_PYPI_ENV = ("PIP_", "PEX_", "PYTHON")

# Run by each target interpreter: compile every .py under SRC to a legacy-layout pyc under DEST
# (zipimport reads `mod.pyc` beside where `mod.py` would be). Prints the files it could not compile.
_COMPILE = """
import os, py_compile, sys
src, dest = sys.argv[1], sys.argv[2]
for top, dirs, files in os.walk(src):
    dirs.sort()
    for name in sorted(files):
        if not name.endswith(".py"):
            continue
        path = os.path.join(top, name)
        rel = os.path.relpath(path, src)
        try:
            py_compile.compile(path, cfile=os.path.join(dest, rel + "c"), dfile=rel, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        except py_compile.PyCompileError as exc:
            print(rel + "\\t" + str(exc.exc_value).replace("\\n", " "))
"""


class BuildError(Exception):
    pass


# ---------------------------------------------------------------- interpreters and platforms


def _probe(python: str) -> str | None:
    """``X.Y`` if ``python`` runs and is CPython, else None."""
    try:
        done = subprocess.run(
            [
                python,
                "-I",
                "-c",
                "import sys; print(sys.implementation.name, '%d.%d' % sys.version_info[:2])",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = done.stdout.split()
    return words[1] if done.returncode == 0 and words[:1] == ["cpython"] else None


def find_interpreters(versions: Iterable[str], given: Mapping[str, str] | None = None) -> dict[str, str]:
    """A working interpreter for each ``X.Y``: as given, else ``pythonX.Y`` on PATH, else pyenv's."""
    given = dict(given or {})
    # pyenv's root: as configured, else in $HOME, else in this user's home (HOME may be redirected).
    roots = [os.environ.get("PYENV_ROOT"), os.path.expanduser("~/.pyenv")]
    roots.append(os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".pyenv"))
    found, missing = {}, []
    for version in versions:
        if version in given:
            candidates = [given[version]]
        else:
            candidates = [shutil.which(f"python{version}")]
            for root in dict.fromkeys(r for r in roots if r):
                pattern = os.path.join(root, "versions", f"{version}.*", "bin", f"python{version}")
                candidates += sorted(glob.glob(pattern), reverse=True)
        for candidate in candidates:
            if candidate and _probe(candidate) == version:
                found[version] = candidate
                break
        else:
            missing.append(version)
    if missing:
        raise BuildError(
            f"no working CPython {', '.join(missing)} found (its bytecode is compiled at build time): "
            "install it (pyenv, deadsnakes, actions/setup-python) or pass --python X.Y=PATH"
        )
    return found


def tag_of(version: str) -> str:
    return "cp" + version.replace(".", "")


def platform_file(platform: str, version: str) -> Path:
    return PLATFORM_DIR / f"{platform}-{tag_of(version)}.json"


def _clean_env(offline: bool) -> dict[str, str]:
    """pex's own settings only: never this machine's pip config; offline: any connection fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_PYPI_ENV)}
    env["PEX_ROOT"] = str(PEX_ROOT)
    env["PIP_CONFIG_FILE"] = os.devnull
    if offline:
        for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
            env[name] = "http://127.0.0.1:9"
        env.pop("no_proxy", None)
        env.pop("NO_PROXY", None)
    return env


def _pex3(args: list[str], *, offline: bool, what: str) -> None:
    if not PEX3.exists():
        raise BuildError(f"{PEX3} is missing: run `make venv`")
    done = subprocess.run(
        [str(PEX3), *args], env=_clean_env(offline), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        hint = " (the locked wheels are not all in .venv/pex-root: run `make venv`)" if offline else ""
        raise BuildError(f"{what} failed{hint}:\n" + "\n".join(detail[-15:]))


def _lock_digest() -> str:
    return hashlib.sha256(LOCK.read_bytes()).hexdigest()


def fetch() -> None:
    """Set-up (network): put every locked wheel for every platform and Python in pex's cache."""
    with tempfile.TemporaryDirectory(prefix="avika-fetch-") as dest:
        args = ["download", "--lock", str(LOCK), "-d", dest]
        for platform in PLATFORMS:
            for version in PYTHONS:
                args += ["--complete-platform", str(platform_file(platform, version))]
        _pex3(args, offline=False, what="downloading the locked wheels")


def relock() -> None:
    """Re-resolve agent-requirements.txt into agent-lock.json (network): one version per project."""
    args = ["lock", "create", "--style", "universal", "--target-system", "linux"]
    args += ["--interpreter-constraint", LOCK_INTERPRETERS, "--elide-unused-requires-dist"]
    args += ["--indent", "1", "-r", str(REQUIREMENTS), "-o", str(LOCK)]
    _pex3(args, offline=False, what="locking the agent's dependencies")


# ---------------------------------------------------------------- dependencies


def _wheels(platform: str, version: str, dest: Path) -> list[Path]:
    """The locked wheels pex picks for this platform and Python (offline)."""
    args = ["download", "--lock", str(LOCK), "-d", str(dest), "--retries", "0"]
    args += ["--complete-platform", str(platform_file(platform, version))]
    _pex3(args, offline=True, what=f"resolving {platform} {tag_of(version)}")
    wheels = sorted(dest.glob("*.whl"))
    names = {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
    if names & FORBIDDEN:
        raise BuildError(f"{', '.join(sorted(names & FORBIDDEN))} must never be part of the agent")
    return wheels


def _unpack_wheel(wheel: Path, site: Path) -> None:
    """Install a wheel's files (``*.data/purelib|platlib`` included) into ``site``."""
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts, headers, data: nothing the agent runs
                parts = parts[2:]
            if ".." in parts or not parts[-1]:
                raise BuildError(f"{wheel.name}: unsafe path {info.filename!r}")
            dest = site.joinpath(*parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(archive.read(info))


def _compile(python: str, src: Path, dest: Path) -> dict[str, str]:
    """Legacy pycs of every .py under ``src``, by ``python``; returns {file: error} it could not compile."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0"}
    done = subprocess.run(
        [python, "-s", "-c", _COMPILE, str(src), str(dest)],  # not -I: it would ignore PYTHONHASHSEED
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BuildError(f"{python} could not compile {src}:\n{done.stderr.strip()[-2000:]}")
    return dict(line.split("\t", 1) for line in done.stdout.splitlines() if "\t" in line)


def deps_for(platform: str, version: str, python: str) -> Path:
    """``<dir>/site`` (the unpacked wheels) and ``<dir>/pyc`` (their bytecode), cached in
    build/agent-deps by lock, platform and interpreter: a rebuild only compiles the agent's code."""
    key = hashlib.sha256(
        "\n".join([_lock_digest(), platform_file(platform, version).read_text(), python, _COMPILE]).encode()
    ).hexdigest()[:16]
    done = DEPS_CACHE / f"{platform}-{tag_of(version)}-{key}"
    if (done / "complete").exists():
        return done
    DEPS_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".deps-", dir=DEPS_CACHE))
    try:
        wheels = _wheels(platform, version, tmp / "wheels")
        for wheel in wheels:
            _unpack_wheel(wheel, tmp / "site")
        broken = _compile(python, tmp / "site", tmp / "pyc")
        (tmp / "uncompiled.json").write_text(json.dumps(broken, indent=1, sort_keys=True))
        (tmp / "complete").write_text("\n".join(w.name for w in wheels) + "\n")
        shutil.rmtree(tmp / "wheels")
        try:
            tmp.rename(done)
        except OSError:  # a concurrent build got there first
            if not (done / "complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return done


def dependency_versions(deps: Path) -> dict[str, str]:
    names = (deps / "complete").read_text().split()
    return {n.split("-")[0].lower().replace("_", "-"): n.split("-")[1] for n in names}


# ---------------------------------------------------------------- the agent's own code


def _module_level(tree: ast.Module) -> Iterator[ast.stmt]:
    """The statements a module runs on import (``if TYPE_CHECKING:`` and function bodies left out)."""
    pending = list(tree.body)
    while pending:
        node = pending.pop(0)
        yield node
        if isinstance(node, ast.If) and not (
            isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        ):
            pending += [*node.body, *node.orelse]
        elif isinstance(node, ast.Try):
            pending += [
                *node.body,
                *node.orelse,
                *node.finalbody,
                *(s for h in node.handlers for s in h.body),
            ]


def _imported_modules(path: Path, package: str) -> set[str]:
    """Modules ``path`` (in ``package``) imports when imported: absolute names, relative ones resolved."""
    found = set()
    for node in _module_level(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def app_files() -> list[Path]:
    """``agent/`` and the ``infra/`` modules it imports, transitively (relative to ROOT)."""
    files = {p.relative_to(ROOT) for p in (ROOT / "agent").rglob("*.py") if "__pycache__" not in p.parts}
    files.discard(Path("agent") / "_embedded.py")  # a stale development copy
    pending = sorted(files)
    while pending:
        path = pending.pop()
        package = ".".join(path.with_suffix("").parts[:-1])
        if path.name == "__init__.py":
            package = ".".join(path.parts[:-1])
        for name in _imported_modules(ROOT / path, package):
            if name.split(".")[0] not in APP_PACKAGES or name.startswith("agent."):
                continue
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):
                for candidate in (
                    Path(*parts[:depth], "__init__.py"),
                    Path(*parts[:depth]).with_suffix(".py"),
                ):
                    if (ROOT / candidate).is_file() and candidate not in files:
                        files.add(candidate)
                        pending.append(candidate)
    return sorted(files)


def stage_app(dest: Path, version: str, public_keys: str) -> None:
    """The agent's code, with ``agent/_embedded.py`` written into this copy only."""
    for relative in app_files():
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / relative, dest / relative)
    (dest / "agent" / "py.typed").touch()
    (dest / "agent" / "_embedded.py").write_text(
        '"""Written by packaging/build_agent.py: what this build embeds (see agent/buildinfo.py)."""\n\n'
        f"VERSION = {version!r}\nPUBLIC_KEYS = {public_keys!r}\n",
        encoding="utf-8",
    )


# ---------------------------------------------------------------- assembling


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def elf_machine(data: bytes) -> int:
    """``e_machine`` of a little-endian ELF file."""
    return int.from_bytes(data[18:20], "little")


def _entry(name: str, compress: bool, mode: int = 0o644) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    info.create_system = 3
    info.external_attr = (0o100000 | mode) << 16
    return info


def _files(top: Path) -> dict[str, Path]:
    return {p.relative_to(top).as_posix(): p for p in sorted(top.rglob("*")) if p.is_file()}


def _zip(members: Mapping[str, bytes]) -> bytes:
    """A zip of ``members``, stored (zipimport reads it in place), same bytes for the same input."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name in sorted(members):
            archive.writestr(_entry(name, compress=False), members[name])
    return out.getvalue()


def _blob_name(folder: str, data: bytes) -> str:
    """``folder/<sha256>``: a member named by content, stored once and linked between builds on a host."""
    return f"{folder}/{hashlib.sha256(data).hexdigest()[:32]}"


def site_zip(deps: Path, app: Path, app_pyc: Path) -> tuple[bytes, bytes, dict[str, bytes]]:
    """(``site.zip``: the agent's code, the dependencies' zip, {relative path: bytes} of the
    native files left out of both). Two zips: a release that changes only the agent changes only
    the first; the second is the same bytes as the last build's (by lock, platform, Python)."""
    members: dict[str, bytes] = {}
    natives: dict[str, bytes] = {}
    uncompiled = json.loads((deps / "uncompiled.json").read_text())
    for rel, path in _files(deps / "site").items():
        data = path.read_bytes()
        if is_elf(data):
            natives[rel] = data
        elif not rel.endswith(".py") or rel in uncompiled:
            members[rel] = data
    members.update((rel, path.read_bytes()) for rel, path in _files(deps / "pyc").items())
    clash = sorted(n for n in members if n.split("/")[0] in APP_PACKAGES)
    if clash:
        raise BuildError(f"a dependency ships files of the agent's own packages: {clash[:3]}")
    own = {rel: path.read_bytes() for top in (app, app_pyc) for rel, path in _files(top).items()}
    return _zip(own), _zip(members), natives


def module_name(relative: str) -> str | None:
    """The import name of an extension module at ``relative``; None for another shared library."""
    stem = _EXTENSION.sub("", relative)
    if stem == relative:
        return None
    parts = stem.split("/")
    return ".".join(parts) if all(p.isidentifier() for p in parts) else None


def check_natives(platform: str, natives: Mapping[str, bytes]) -> None:
    machine = PLATFORMS[platform]
    wrong = sorted(rel for rel, data in natives.items() if elf_machine(data) != ELF_MACHINES[machine])
    if wrong:
        raise BuildError(f"native code that is not {machine} in the {platform} build: {', '.join(wrong)}")


def render_main(build: Mapping[str, object]) -> bytes:
    template = MAIN_TEMPLATE.read_text(encoding="utf-8")
    line = "BUILD = {}  # filled in by packaging/build_agent.py\n"
    if template.count(line) != 1:
        raise BuildError(f"{MAIN_TEMPLATE} lost its `{line.strip()}` line")
    return template.replace(
        line, f"BUILD = {pprint.pformat(dict(build), width=100, sort_dicts=True)}\n"
    ).encode()


def build(
    version: str,
    out: Path,
    public_keys: str,
    *,
    platform: str = "linux-amd64",
    pythons: Mapping[str, str] | None = None,
    verify: bool = True,
) -> dict[str, object]:
    """Build ``out``; returns what was built (version, platform, build id, size, seconds)."""
    started = time.monotonic()
    version = normalize_version(version)
    if not public_keys.strip():
        raise ValueError(
            "PUBLIC_KEYS is required: the base64 Ed25519 keys agents running this file trust "
            f"(comma-separated), or `{KEYLESS}` for a file that trusts only UPDATE_PUBLIC_KEYS"
        )
    keys = [] if public_keys.strip() == KEYLESS else parse_public_keys(public_keys)
    if platform not in PLATFORMS:
        raise ValueError(f"platform {platform!r} is not one of {', '.join(PLATFORMS)}")
    interpreters = find_interpreters(PYTHONS, pythons)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="avika-agent-build-") as work_dir:
        work = Path(work_dir)
        stage_app(work / "app", version, ",".join(k.b64 for k in keys))
        (work / "boot").mkdir()
        shutil.copyfile(ROOT / "agent" / "cache.py", work / "boot" / f"{cache.BOOT_MODULE}.py")
        members: dict[str, bytes] = {}
        blobs: dict[str, bytes] = {}
        tags: dict[str, dict[str, object]] = {}
        dependencies: dict[str, str] = {}
        for python_version, python in interpreters.items():
            tag = tag_of(python_version)
            deps = deps_for(platform, python_version, python)
            failed = _compile(python, work / "app", work / "pyc" / tag)
            failed.update(_compile(python, work / "boot", work / "boot-pyc" / tag))
            if failed:
                raise BuildError(f"the agent's code does not compile under Python {python_version}: {failed}")
            data, dep_zip, natives = site_zip(deps, work / "app", work / "pyc" / tag)
            check_natives(platform, natives)
            members[f"{tag}/{cache.SITE}"] = data
            deps_name = _blob_name(cache.DEPS_BLOBS, dep_zip)
            blobs[deps_name] = dep_zip
            members[f"{tag}/{cache.BOOT_MODULE}.pyc"] = (
                work / "boot-pyc" / tag / f"{cache.BOOT_MODULE}.pyc"
            ).read_bytes()
            placed = {}
            for rel, blob in natives.items():
                name = _blob_name(cache.NATIVE, blob)
                blobs[name] = blob
                placed[rel] = name
            tags[tag] = {
                "deps": deps_name,
                "natives": placed,
                "modules": {m: rel for rel in sorted(natives) if (m := module_name(rel))},
                "bytes": len(data) + len(dep_zip) + sum(len(b) for b in natives.values()),
            }
            for name, dist_version in dependency_versions(deps).items():
                previous = dependencies.setdefault(name, dist_version)
                if previous != dist_version:
                    dependencies[name] = f"{previous}, {dist_version}"
        members.update(blobs)
        digest = hashlib.sha256()
        for name in sorted(members):
            digest.update(name.encode() + b"\0" + hashlib.sha256(members[name]).digest())
        digest.update(MAIN_TEMPLATE.read_bytes())
        build_id = f"{version}-{digest.hexdigest()[:16]}"
        machines = sorted(m for m in ("x86_64", "amd64", "aarch64", "arm64") if platform_key(m) == platform)
        boot = {
            "name": NAME,
            "version": version,
            "platform": platform,
            "build_id": build_id,
            "pythons": list(PYTHONS),
            "glibc": list(GLIBC),
            "machines": machines,
            "tags": tags,
        }
        info = {
            "schema": 1,
            "name": NAME,
            "version": version,
            "platform": platform,
            "pythons": list(PYTHONS),
            "glibc": ".".join(map(str, GLIBC)),
            "key_ids": [k.keyid for k in keys],
            "build_id": build_id,
            "dependencies": dict(sorted(dependencies.items())),
            "unpacked_bytes": {tag: part["bytes"] for tag, part in tags.items()},
            "lock_sha256": _lock_digest(),
        }
        members["__main__.py"] = render_main(boot)
        members[cache.BUILD_INFO] = (json.dumps(info, indent=2) + "\n").encode()
        partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as fh:
                fh.write(SHEBANG)
                with zipfile.ZipFile(fh, "w") as archive:
                    for name in sorted(members):
                        archive.writestr(_entry(name, compress=True), members[name])
            partial.chmod(0o755)
            if verify and platform_key() == platform:
                for python_version, python in interpreters.items():
                    _verify(partial, version, python, python_version, work / "verify-cache")
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
    return {
        "version": version,
        "platform": platform,
        "out": str(out),
        "build_id": build_id,
        "key_ids": info["key_ids"],
        "size": out.stat().st_size,
        "seconds": round(time.monotonic() - started, 1),
    }


def _verify(binary: Path, version: str, python: str, python_version: str, cache_dir: Path) -> None:
    """``python FILE version`` must print the version: the smoke test an agent runs before a swap."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", cache.ENV_VAR))}
    env[cache.ENV_VAR] = str(cache_dir)
    done = subprocess.run(
        [python, str(binary), "version"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0 or done.stdout.strip() != version:
        raise BuildError(
            f"the built file does not run under Python {python_version}: `version` exited {done.returncode}, "
            f"printed {done.stdout.strip()!r}, stderr:\n{done.stderr.strip()[-2000:]}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", help="agent version (a leading v is dropped)")
    parser.add_argument("--out", type=Path, help="the file to write")
    parser.add_argument(
        "--public-keys", help=f"comma-separated base64 Ed25519 keys to embed, or `{KEYLESS}` (required)"
    )
    parser.add_argument("--platform", default="linux-amd64", choices=sorted(PLATFORMS))
    parser.add_argument(
        "--python", action="append", default=[], metavar="X.Y=PATH", help="interpreter for X.Y"
    )
    parser.add_argument("--no-verify", action="store_true", help="do not run `FILE version` after building")
    parser.add_argument("--fetch", action="store_true", help="set-up: download the locked wheels (network)")
    parser.add_argument("--lock", action="store_true", help="re-resolve packaging/agent-lock.json (network)")
    args = parser.parse_args(argv)
    try:
        if args.lock or args.fetch:
            if args.lock:
                relock()
            fetch()
            print(f"the locked wheels are in {PEX_ROOT.relative_to(ROOT)}")
            return 0
        if not args.version or not args.out or args.public_keys is None:
            parser.error("--version, --out and --public-keys are required")
        given = dict(p.split("=", 1) for p in args.python if "=" in p)
        result = build(
            args.version,
            args.out,
            args.public_keys,
            platform=args.platform,
            pythons=given,
            verify=not args.no_verify,
        )
    except (BuildError, ValueError) as exc:
        print(f"build_agent: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    keys = ", ".join(k[:16] for k in result["key_ids"]) or "none (keyless)"  # type: ignore[attr-defined]
    print(
        f"built {result['out']}: {NAME} {result['version']} for {result['platform']}, CPython "
        f"{', '.join(PYTHONS)}, {result['size']} bytes, key ids {keys}, build id {result['build_id']}, "
        f"{result['seconds']}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
