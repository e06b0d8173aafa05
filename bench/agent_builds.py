"""Agent files for the benchmarks: this tree's build and the old (shiv) build, side by side.

- ``new``: ``packaging/build_agent.py`` of this tree (what ``make agent-binary`` builds): one file for
  CPython 3.9 - 3.13, its code unpacked once per build into ``$AVIKA_AGENT_CACHE``.
- ``old``: the shiv zipapp built by ``packaging/build_agent.py`` at :data:`OLD_REF` (the last commit
  before issue 11), from ``git archive`` of that commit: one Python minor, extracted to ``$SHIV_ROOT``.

Both are built offline (the old builder copies this virtualenv's site-packages). :func:`pad` makes
a release of an exact size from a build: the file's first line (the shebang), random bytes, then
the zip archive, which Python and both bootstraps find from its end, so the padded file still runs.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD_REF = "975723d"  # the last commit that built the agent with shiv (one Python minor)
KINDS = ("new", "old")
LABELS = {"new": "agent file (this build)", "old": f"old shiv build ({OLD_REF})"}
CHUNK = 8 << 20


def cache_env(kind: str, root: Path) -> dict[str, str]:
    """Where a build of ``kind`` unpacks its code."""
    return {"AVIKA_AGENT_CACHE": str(root)} if kind == "new" else {"SHIV_ROOT": str(root)}


def _old_source(work: Path, ref: str) -> Path:
    src = work / f"old-src-{ref}"
    if not (src / "packaging" / "build_agent.py").exists():
        src.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", ref, "agent", "infra", "packaging", "pyproject.toml"],
            capture_output=True,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(src, filter="data")
    return src


def build(kind: str, version: str, keys: str, out: Path, work: Path, ref: str = OLD_REF) -> Path:
    """Build ``kind`` at ``out`` (offline); raises ``SystemExit`` with the builder's stderr."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "new":
        cmd = [sys.executable, str(ROOT / "packaging" / "build_agent.py")]
    else:
        cmd = [sys.executable, str(_old_source(work, ref) / "packaging" / "build_agent.py")]
    done = subprocess.run(
        [*cmd, "--version", version, "--out", str(out), "--public-keys", keys, "--no-verify"],
        capture_output=True,
        text=True,
        cwd=work,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"building the {kind} agent {version} failed:\n{done.stderr}")
    return out


def pad(src: Path, dest: Path, size: int) -> str:
    """``dest``: ``src`` grown to exactly ``size`` bytes (random bytes after its first line); its sha256."""
    data = src.read_bytes()
    head, rest = data[: data.index(b"\n") + 1], data[data.index(b"\n") + 1 :]
    padding = size - len(data)
    if padding < 0:
        raise SystemExit(f"{src} is {len(data)} bytes, more than the {size} asked for")
    digest = hashlib.sha256(head)
    with open(dest, "wb") as fh:
        fh.write(head)
        while padding:
            block = os.urandom(min(CHUNK, padding))
            fh.write(block)
            digest.update(block)
            padding -= len(block)
        fh.write(rest)
        digest.update(rest)
    dest.chmod(0o755)
    return digest.hexdigest()


def interpreter_note() -> str:
    """What this machine's interpreter costs before any agent code: ``python3 -c pass`` with its
    ``site`` (here a sandbox ``.pth`` loads certifi at every start) and without (``-S``)."""
    python = str(Path(getattr(sys, "_base_executable", sys.executable)).resolve())
    figures = []
    for flags in ([], ["-S"]):
        runs = []
        for _ in range(7):
            started = time.perf_counter()
            done = subprocess.run(
                ["/usr/bin/time", "-f", "%M", python, *flags, "-c", "pass"],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append((time.perf_counter() - started, int(done.stderr.split()[-1])))
        wall, rss = sorted(runs)[len(runs) // 2]
        figures.append(
            f"`python3 {' '.join([*flags, '-c pass'])}` {wall * 1000:.0f} ms, {rss / 1024:.1f} MiB"
        )
    return (
        "the interpreter alone, in every process above (bare ones too): "
        + "; ".join(figures)
        + " (the difference is this machine's site-packages, not the agent's)"
    )


def python3_dir(work: Path) -> Path:
    """A directory whose ``python3`` is this interpreter's base (what ``/usr/bin/env python3`` runs):
    the old build's native code needs this Python minor; the new file takes any 3.9 - 3.13."""
    bin_dir = Path(tempfile.mkdtemp(prefix="python3-", dir=work))
    (bin_dir / "python3").symlink_to(Path(getattr(sys, "_base_executable", sys.executable)).resolve())
    return bin_dir
