#!/usr/bin/env python3
"""Download + verify + stage (fsync included): the agent against curl + openssl and python-tuf.

    .venv/bin/python bench/download.py [--sizes 64,512] [--runs 3] [--no-results]

Everything on 127.0.0.1, in one temporary directory that is removed at the end:

- random binaries of each size (MiB) are served by nginx (the Debian package; started here with
  its own minimal config: ``daemon off``, one worker, ``sendfile on``, no access log), which is
  stopped at the end even on error; a minimal TUF repository (root / targets / snapshot /
  timestamp, one Ed25519 key, built with ``tuf.api.metadata`` and securesystemslib's
  ``CryptoSigner``) is served by the same nginx, its target a hard link to the same file;
- each tool runs in its own process, ``--runs`` times, in rotating order, and the median is
  reported:

  ours  a child process running the agent's install path: ``agent.install.stage`` (O_EXCL file
        next to a target, fsync, mode) around ``agent.fetch.HttpFetcher().download`` (streaming
        sha256, size cap). The timed span is the stage call; interpreter start-up and imports are
        not (the agent is already running when it downloads), but are shown as process wall.
  curl  ``curl -sS --fail -o FILE URL && openssl dgst -sha256 -r FILE && sync FILE`` in one ``sh``
        (``sync FILE`` fsyncs the file, as our stage does); the digest printed is compared with
        the expected one. Timed: the whole pipeline, process start-ups included.
  tuf   a child process with python-tuf's ngclient: ``Updater(...).refresh()`` and
        ``get_targetinfo`` (not timed), then ``download_target`` + an ``fsync`` of the file it
        wrote (added for fairness: tuf itself does not fsync). Timed: those two steps.

- peak RSS is GNU time's ``%M`` for each tool's process tree (the max over its processes): a
  process spawned straight from this script would inherit our own high-water mark through
  ``fork``/``vfork`` + ``exec`` (Linux folds the old mm's peak into ``ru_maxrss``), while one forked
  by ``/usr/bin/time`` starts clean. The Python children also report their own ``VmHWM``.

Whole process (issue 11), ``--agent-files`` (on by default): the update as a host runs it, a real
agent file (``make agent-binary``) running ``FILE update --force`` against a signed manifest on
the same nginx, interpreter start-up, imports, pre-flight, download, verification, smoke test
(``<staged> version``) and swap included, from a warm code cache as on a running host; beside the
same for the old shiv build (bench/agent_builds.py) and ``curl -o f && openssl dgst -sha256 f``:

  file   this tree's agent file 1.0.0 updating to 2.0.0 (2.0.0 padded to the size: bench/agent_builds.py)
  shiv   the old shiv build 1.0.0 updating to its 2.0.0, padded the same way
  plain  ``curl -sS --fail -o f URL && openssl dgst -sha256 f`` (no sync: as the issue states it)

  The target's directory is reset before each run (untimed): the old build back, no backup, no
  state; the cache keeps the old build's unpacked code. Also shown: what each update left in the
  code cache (shiv keeps the smoke test's extraction, named after the staged file).

Targets (issue 6): ours <= curl + openssl, ours <= 0.6 x tuf, ours < 40 MiB peak RSS at 512 MiB.
Targets (issue 11): file <= 0.9 x plain at 512 MiB, peak RSS < 40 MiB.
It prints a table, appends it to ``bench/RESULTS.md`` and asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent_builds import KINDS, build, cache_env, interpreter_note, pad, python3_dir
from results import Report, append, command_line, heading, load_average, machine

ROOT = Path(__file__).resolve().parents[1]
TITLE = "bench/download.py"
PYTHON = sys.executable
GNU_TIME = "/usr/bin/time"
MIB = 1024 * 1024
TOOLS = ("ours", "curl", "tuf", "wire")
AGENT_TOOLS = ("file", "shiv", "plain")  # whole-process: `update --force`, and curl + openssl without sync
KIND_OF = {"file": "new", "shiv": "old"}
OLD, NEW = "1.0.0", "2.0.0"
CHILD_TIMEOUT = 600
LABELS = {
    "ours": "ours (agent)",
    "curl": "curl + openssl dgst + sync",
    "tuf": "python-tuf ngclient",
    "wire": "(floor: curl -o /dev/null)",
    "file": "agent file `update --force` (this build)",
    "shiv": "old shiv build `update --force`",
    "plain": "curl -o f && openssl dgst -sha256 f",
}


# ================================================================ children (run in their own process)


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def child_ours(url: str, target: str, size: int, sha256: str, manifest_url: str) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from agent.fetch import HttpFetcher

    path_used = "agent.install.stage + HttpFetcher.download"
    try:
        from agent.install import stage
    except ImportError:  # the install module is not there: the same steps by hand
        path_used = "O_EXCL file + HttpFetcher.download + fsync (agent.install not importable)"
        stage = None

    fetcher = HttpFetcher()
    # The agent fetched and verified the manifest earlier in the same process (as tuf's refresh
    # below): warm the code paths the same way, untimed.
    fetcher.get_manifest(manifest_url)
    cpu0, started = cpu_seconds(), time.perf_counter()
    if stage is not None:
        staged = stage(Path(target), "bench", lambda fd: fetcher.download(url, fd, size, sha256))
    else:
        staged = Path(target).with_name(".staged")
        fd = os.open(staged, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fetcher.download(url, fd, size, sha256)
            os.fsync(fd)
        finally:
            os.close(fd)
    elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu0
    fetcher.close()
    return {"op": elapsed, "op_cpu": cpu, "vmhwm": vm_hwm_kib(), "file": str(staged), "path": path_used}


def child_tuf(metadata_url: str, targets_url: str, client_dir: str, out: str, name: str) -> dict[str, Any]:
    from tuf.ngclient import Updater

    root = (Path(client_dir) / "root.json").read_bytes()
    updater = Updater(client_dir, metadata_url, str(Path(out).parent), targets_url, bootstrap=root)
    updater.refresh()
    info = updater.get_targetinfo(name)
    if info is None:
        raise SystemExit(f"tuf: no target {name}")
    cpu0, started = cpu_seconds(), time.perf_counter()
    path = updater.download_target(info, out)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu0
    return {"op": elapsed, "op_cpu": cpu, "vmhwm": vm_hwm_kib(), "file": path}


# ================================================================ setup: files, TUF repo, nginx


def tool_versions() -> list[str]:
    """The versions of what ours is compared with, for the Machine line."""
    versions = []
    for cmd in (["nginx", "-v"], ["curl", "--version"], ["openssl", "version"]):
        with contextlib.suppress(OSError):
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            versions.append((done.stdout or done.stderr).splitlines()[0].strip())
    with contextlib.suppress(ImportError):
        import tuf

        versions.append(f"python-tuf {tuf.__version__}")
    return versions


def write_random(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        left = size
        while left:
            block = os.urandom(min(8 * MIB, left))
            digest.update(block)
            fh.write(block)
            left -= len(block)
    path.chmod(0o644)
    return digest.hexdigest()


def build_tuf_repo(www: Path, files: dict[str, tuple[Path, int, str]]) -> Path:
    """metadata/{1.root,root,timestamp,snapshot,targets}.json and targets/<name> (hard links)."""
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
    from tuf.api.serialization.json import JSONSerializer

    signer = CryptoSigner.generate_ed25519()
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    root = Root(expires=expires, consistent_snapshot=False)
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.add_key(signer.public_key, role)
    targets = Targets(expires=expires)
    (www / "tuf" / "targets").mkdir(parents=True)
    (www / "tuf" / "metadata").mkdir()
    for name, (path, size, sha256) in files.items():
        os.link(path, www / "tuf" / "targets" / name)
        targets.targets[name] = TargetFile(length=size, hashes={"sha256": sha256}, path=name)
    snapshot = Snapshot(expires=expires, meta={"targets.json": MetaFile(version=1)})
    timestamp = Timestamp(expires=expires, snapshot_meta=MetaFile(version=1))
    serializer = JSONSerializer(compact=True)
    metadata = www / "tuf" / "metadata"
    for signed, names in (
        (root, ["1.root.json", "root.json"]),
        (targets, ["targets.json"]),
        (snapshot, ["snapshot.json"]),
        (timestamp, ["timestamp.json"]),
    ):
        md = Metadata(signed)
        md.sign(signer)
        for filename in names:
            md.to_file(str(metadata / filename), serializer)
    for path in (www / "tuf").rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return metadata / "1.root.json"


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 30;
    default_type application/octet-stream;
    types {{ application/json json; }}
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def nginx(www: Path, prefix: Path) -> Iterator[str]:
    """nginx on 127.0.0.1 serving ``www``; stopped (TERM, then KILL) when the block ends."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    prefix.mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, root=www))
    log = (prefix / "stderr.log").open("wb")
    proc = subprocess.Popen(
        [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"nginx exited {proc.returncode}: {(prefix / 'error.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("nginx did not start listening within 10 s") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()


# ================================================================ measuring


def timed(cmd: list[str], workdir: Path, env: dict[str, str] | None = None) -> tuple[float, int, float, str]:
    """Run ``cmd`` under GNU time: (wall s, peak RSS KiB of its process tree, CPU s user+sys, stdout).

    Dirty pages left by the previous run are written back first (``sync``, not timed), so no
    tool pays for another's writeback.
    """
    report = workdir / "time.out"
    os.sync()
    started = time.perf_counter()
    done = subprocess.run(
        [GNU_TIME, "-f", "%M %U %S", "-o", str(report), *cmd],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        env=env,
        cwd=workdir,
        check=False,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} {cmd[1] if len(cmd) > 1 else ''} failed: {done.stderr.strip()[-500:]}")
    rss, user, system = report.read_text().strip().splitlines()[-1].split()
    return wall, int(rss), float(user) + float(system), done.stdout


class Bench:
    def __init__(self, tmp: Path, base: str, files: dict[str, tuple[Path, int, str]], root_json: Path | None):
        self.tmp, self.base, self.files, self.root_json = tmp, base, files, root_json
        self.out = tmp / "out"
        self.out.mkdir()
        self.notes: set[str] = set()
        self.manifest = f"{base}/manifest.json"

    def run(self, tool: str, name: str) -> dict[str, Any]:
        _, size, sha256 = self.files[name]
        url = f"{self.base}/{name}"
        work = self.out / f"{tool}-{name}"
        work.mkdir()
        try:
            if tool == "ours":
                target = work / "avika-agent"
                target.write_bytes(b"#!/bin/sh\necho old\n")
                target.chmod(0o755)
                wall, rss, cpu, stdout = timed(
                    [PYTHON, __file__, "--child", "ours", url, str(target), str(size), sha256, self.manifest],
                    work,
                )
                result = json.loads(stdout)
                self.notes.add(f"ours: {result['path']}")
                return {**result, "wall": wall, "rss": rss, "cpu": cpu}
            if tool == "wire":  # the floor: the transfer alone, nothing written, nothing hashed
                wall, rss, cpu, _ = timed(["curl", "-sS", "--fail", "-o", "/dev/null", url], work)
                return {"op": wall, "op_cpu": cpu, "wall": wall, "rss": rss, "cpu": cpu, "vmhwm": None}
            if tool in ("curl", "plain"):
                script = 'curl -sS --fail -o "$1" "$2" && openssl dgst -sha256 -r "$1"'
                script += ' && sync "$1"' if tool == "curl" else ""
                dest = work / "file"
                wall, rss, cpu, stdout = timed(["sh", "-c", script, "sh", str(dest), url], work)
                if stdout.split()[0].lower() != sha256:
                    raise RuntimeError(f"curl + openssl: digest {stdout.split()[0]} != {sha256}")
                return {"op": wall, "op_cpu": cpu, "wall": wall, "rss": rss, "cpu": cpu, "vmhwm": None}
            assert self.root_json is not None
            client = work / "client"
            client.mkdir()
            shutil.copy(self.root_json, client / "root.json")
            cmd = [
                PYTHON,
                __file__,
                "--child",
                "tuf",
                f"{self.base}/tuf/metadata/",
                f"{self.base}/tuf/targets/",
            ]
            wall, rss, cpu, stdout = timed([*cmd, str(client), str(work / "file"), name], work)
            result = json.loads(stdout)
            return {**result, "wall": wall, "rss": rss, "cpu": cpu}
        finally:
            shutil.rmtree(work, ignore_errors=True)


class AgentHost:
    """One simulated host updating itself by hand: ``bin/avika-agent update --force``."""

    def __init__(
        self, kind: str, size: int, tmp: Path, www: Path, base: str, builds: dict[str, Path], signer: Any
    ) -> None:
        from agent import environment
        from agent.manifest import Binary, Manifest, Rollout, sign_envelope

        self.kind, self.size = kind, size
        self.dir = tmp / "hosts" / f"{kind}-{size // MIB}MiB"
        self.old = builds[f"{kind}-{OLD}"]
        self.target = self.dir / "bin" / "avika-agent"
        self.cache = self.dir / "cache"
        self.config = self.dir / "avika-agent.conf"
        site = f"{kind}-{size // MIB}MiB"
        platform = environment.platform_key()
        release = www / site / "release"
        release.parent.mkdir(parents=True)
        self.sha256 = pad(builds[f"{kind}-{NEW}"], release, size)
        key = f"binaries/{NEW}/{self.sha256}/avika-agent-{platform}"
        (www / site / key).parent.mkdir(parents=True)
        os.link(release, www / site / key)
        now = datetime.now(UTC)
        manifest = Manifest(
            serial=1,
            version=NEW,
            released_at=now - timedelta(minutes=1),
            expires=now + timedelta(days=1),
            binaries={platform: Binary(key, self.sha256, size)},
            rollout=Rollout(100, NEW),
        )
        (www / site / "manifest.json").write_bytes(sign_envelope(manifest.to_payload(), [signer]))
        for path in (www / site).rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (www / site).chmod(0o755)
        self.keys = signer.public_key.b64
        self.env = {
            "PATH": f"{python3_dir(tmp)}{os.pathsep}/usr/bin:/bin",
            "HOME": str(self.dir),
            "LANG": "C.UTF-8",
            "UPDATE_SERVER": f"{base}/{site}",
            "UPDATE_TARGET": str(self.target),
            "UPDATE_STATE_DIR": str(self.dir / "state"),
            "BUFFER_DIR": str(self.dir / "data"),
            "UPDATE_PUBLIC_KEYS": self.keys,
            "AGENT_ID": "bench-host",
            "DEPLOYMENT_MODE": "vm",
            "UPDATE_REPORT_URL": "disabled",
            "UPDATE_RESTART_METHOD": "exec",
            **cache_env(KIND_OF.get(kind, kind), self.cache),
        }
        self.dir.mkdir(parents=True)
        self.config.write_text("# settings come from the environment\n")
        self.reset()
        warm = subprocess.run([str(self.target), "version"], env=self.env, capture_output=True, text=True)
        if warm.stdout.strip() != OLD:
            raise SystemExit(f"{kind} {OLD} does not run: {warm.stderr.strip()[-500:]}")
        self.warm = {p.name for p in self.cache.iterdir()}

    def reset(self) -> None:
        """The old build back, no backup, no state; what the last update left in the cache removed."""
        shutil.rmtree(self.target.parent, ignore_errors=True)
        shutil.rmtree(self.dir / "state", ignore_errors=True)
        self.target.parent.mkdir()
        shutil.copy2(self.old, self.target)
        if self.cache.exists() and hasattr(self, "warm"):
            for path in self.cache.iterdir():
                if path.name not in self.warm:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()

    def left_in_cache(self) -> int:
        """Bytes of files the update added to the cache; a hard link to the old build's is no new file."""
        seen = {
            p.stat().st_ino
            for p in self.cache.rglob("*")
            if p.is_file() and p.relative_to(self.cache).parts[0] in self.warm
        }
        added = {}
        for path in self.cache.rglob("*"):
            if path.is_file() and path.relative_to(self.cache).parts[0] not in self.warm:
                info = path.stat()
                if info.st_ino not in seen:
                    added[info.st_ino] = info.st_size
        return sum(added.values())

    def run(self) -> dict[str, Any]:
        self.reset()
        cmd = [str(self.target), "update", "--force", "--config", str(self.config)]
        wall, rss, cpu, stdout = timed(cmd, self.dir, self.env)
        answer = json.loads(stdout)
        if answer.get("action") != "update" or self.target.stat().st_size != self.size:
            raise RuntimeError(f"{self.kind}: the update did not happen: {stdout.strip()}")
        left = self.left_in_cache()
        return {"op": wall, "op_cpu": cpu, "wall": wall, "rss": rss, "cpu": cpu, "vmhwm": None, "left": left}


def tuf_available() -> str | None:
    try:
        import securesystemslib  # noqa: F401
        import tuf.ngclient  # noqa: F401
    except ImportError as exc:
        return f"python-tuf is not installed ({exc}); `.venv/bin/pip install -e '.[dev]'`"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="64,512", help="file sizes in MiB, comma-separated (default 64,512)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per tool and size; the median is shown")
    parser.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument(
        "--agent-files",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time whole-process updates by real agent files, new and old (default: on)",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = (
            child_ours(rest[0], rest[1], int(rest[2]), rest[3], rest[4])
            if kind == "ours"
            else child_tuf(*rest)
        )
        print(json.dumps(result))
        return 0

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1 or args.runs < 1:
        parser.error("--sizes must list positive MiB values and --runs must be >= 1")
    missing = [tool for tool in ("nginx", "curl", "openssl", "sync") if not shutil.which(tool)]
    if not Path(GNU_TIME).exists():
        missing.append(GNU_TIME)
    if missing and not (missing == ["nginx"] and Path("/usr/sbin/nginx").exists()):
        raise SystemExit(f"missing: {', '.join(missing)} (apt-get install nginx-light curl openssl time)")
    no_tuf = tuf_available()
    tools = [t for t in TOOLS if not (t == "tuf" and no_tuf)]

    out = Report()
    command, machine_line = command_line(), machine(tool_versions())
    for line in heading(title=TITLE, command=command, machine_line=machine_line):
        print(line, flush=True)
    started = time.monotonic()
    out(f"Load average at start: {load_average()}")
    tmp = Path(tempfile.mkdtemp(prefix="avika-download-"))
    try:
        tmp.chmod(0o755)  # nginx's worker runs as another user
        www = tmp / "www"
        www.mkdir(mode=0o755)
        www.chmod(0o755)
        files = {}
        for size in sizes:
            name = f"avika-agent-{size}MiB"
            sha256 = write_random(www / name, size * MIB)
            files[name] = (www / name, size * MIB, sha256)
        (www / "manifest.json").write_text('{"stand-in": "the warm-up fetch of our child"}\n')
        (www / "manifest.json").chmod(0o644)
        root_json = build_tuf_repo(www, files) if "tuf" in tools else None
        builds = {}
        signer = None
        if args.agent_files:
            sys.path.insert(0, str(ROOT))
            from agent.manifest import LocalSigner, generate_private_key

            signer = LocalSigner(generate_private_key())
            print("building the agent files (this tree's and the old shiv build) ...", flush=True)
            for kind in KINDS:
                for version in (OLD, NEW):
                    dest = tmp / "builds" / f"{kind}-{version}"
                    keys = signer.public_key.b64
                    builds[f"{kind}-{version}"] = build(kind, version, keys, dest, tmp / "builds")
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        with nginx(www, tmp / "nginx") as base:
            bench = Bench(tmp, base, files, root_json)
            hosts = {}
            if args.agent_files:
                for name, (_, size, _) in files.items():
                    for tool, kind in KIND_OF.items():
                        hosts[(tool, name)] = AgentHost(kind, size, tmp, www, base, builds, signer)
            every = tools + (list(AGENT_TOOLS) if args.agent_files else [])
            for name in files:
                subprocess.run(["curl", "-sS", "-o", "/dev/null", f"{base}/{name}"], check=True)  # warm
                for run in range(args.runs):
                    order = every[run % len(every) :] + every[: run % len(every)]
                    for tool in order:
                        result = hosts[(tool, name)].run() if (tool, name) in hosts else bench.run(tool, name)
                        results.setdefault((tool, name), []).append(result)
                        print(
                            f"  {name} run {run + 1} {tool:<5} {result['op']:.3f} s, "
                            f"peak RSS {result['rss'] / 1024:.1f} MiB",
                            flush=True,
                        )
        out()
        report(out, files, tools, results, args.runs)
        if args.agent_files:
            out()
            whole_process(out, files, results, args.runs)
        for note in sorted(bench.notes):
            out(f"- {note}")
        if no_tuf:
            out(f"- tuf column missing: {no_tuf}")
        out(f"- load average at the end: {load_average()}")
        out(f"- total run time {time.monotonic() - started:.0f} s, scratch directory {tmp} (removed)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not args.no_results:
        append(out.lines, title=TITLE, command=command, machine_line=machine_line)
    return 0


def report(out: Report, files: dict[str, Any], tools: list[str], results: dict[Any, Any], runs: int) -> None:
    header = [
        "file",
        "tool",
        f"time (median of {runs})",
        "MiB/s",
        "CPU",
        "process wall",
        "peak RSS",
        "own VmHWM",
    ]
    rows = []
    medians: dict[tuple[str, str], tuple[float, float]] = {}
    for name, (_, size, _) in files.items():
        for tool in tools:
            got = results[(tool, name)]
            op = statistics.median(r["op"] for r in got)
            wall = statistics.median(r["wall"] for r in got)
            rss = statistics.median(r["rss"] for r in got)
            cpu = statistics.median(r["op_cpu"] for r in got)
            hwm = [r["vmhwm"] for r in got if r["vmhwm"] is not None]
            medians[(tool, name)] = (op, rss)
            rows.append(
                [
                    name,
                    LABELS[tool],
                    f"{op:.3f} s",
                    f"{size / MIB / op:,.0f}",
                    f"{cpu:.2f} s",
                    f"{wall:.3f} s",
                    f"{rss / 1024:.1f} MiB",
                    f"{statistics.median(hwm) / 1024:.1f} MiB" if hwm else "-",
                ]
            )
    out.table(header, rows)
    out()
    rows = []
    for name in files:
        ours_op, ours_rss = medians[("ours", name)]
        curl_op, _ = medians[("curl", name)]
        row = [
            name,
            f"{ours_op / curl_op:.2f}",
            "yes" if ours_op <= curl_op else f"NO (+{(ours_op / curl_op - 1) * 100:.0f} %)",
        ]
        if ("tuf", name) in medians:
            tuf_op, tuf_rss = medians[("tuf", name)]
            ratio = ours_op / tuf_op
            row += [
                f"{ratio:.2f}",
                "yes" if ratio <= 0.6 else f"NO ({ratio:.2f} > 0.6)",
                f"{tuf_rss / 1024:.1f} MiB",
            ]
        else:
            row += ["-", "-", "-"]
        rss_ok = ours_rss / 1024 < 40
        row += [f"{ours_rss / 1024:.1f} MiB", "yes" if rss_ok else f"NO (+{ours_rss / 1024 - 40:.1f} MiB)"]
        rows.append(row)
    out.table(
        ["file", "ours / curl", "<= 1.0", "ours / tuf", "<= 0.6", "tuf RSS", "ours RSS", "< 40 MiB"],
        rows,
    )
    out()
    out("Notes:")
    out("- time: ours and tuf = the download+verify+stage call inside an already started process;")
    out("  curl = the whole shell pipeline (its process start-ups are milliseconds). Process wall adds")
    out("  the Python children's interpreter start and imports.")
    out("- CPU: user + system seconds of the timed span (curl: of the whole pipeline); less noisy than")
    out("  wall time when other work shares the machine.")
    out("- peak RSS: GNU time %M (max over the tool's processes); own VmHWM: the Python child's /proc value.")
    out("- floor: the transfer alone over loopback (nothing hashed, nothing written), for scale.")
    out("- the served files sit in the page cache (warmed once); every tool writes to the same disk.")


def paired_ratio(runs: list[dict[str, Any]], plain: list[dict[str, Any]]) -> float:
    """The median over rounds of one tool's wall over curl + openssl's in the same round."""
    return statistics.median(r["wall"] / p["wall"] for r, p in zip(runs, plain, strict=True))


def whole_process(out: Report, files: dict[str, Any], results: dict[Any, Any], runs: int) -> None:
    """The agent files' `update --force` beside curl + openssl (issue 11's targets)."""
    rows, ratios = [], []
    for name in files:
        medians = {}
        for tool in AGENT_TOOLS:
            got = results[(tool, name)]
            wall = statistics.median(r["wall"] for r in got)
            rss = statistics.median(r["rss"] for r in got)
            left = [r["left"] for r in got if "left" in r]
            medians[tool] = (wall, rss)
            rows.append(
                [
                    name,
                    LABELS[tool],
                    f"{wall:.3f} s",
                    f"{statistics.median(r['cpu'] for r in got):.2f} s",
                    f"{rss / 1024:.1f} MiB",
                    f"{statistics.median(left) / MIB:.1f} MiB" if left else "-",
                ]
            )
        plain = medians["plain"][0]
        for tool in ("file", "shiv"):
            wall, rss = medians[tool]
            paired = paired_ratio(results[(tool, name)], results[("plain", name)])
            worst = max(wall / plain, paired)
            ok = "yes" if worst <= 0.9 else f"NO ({worst:.2f} > 0.9)"
            rss_ok = "yes" if rss / 1024 < 40 else f"NO ({rss / 1024:.1f} MiB)"
            ratios.append([name, LABELS[tool], f"{wall / plain:.2f}", f"{paired:.2f}", ok, rss_ok])
    out(f"Whole process: `update --force` of a release of that size, median of {runs}:")
    out()
    header = ["release", "tool", "wall", "CPU", "peak RSS", "left in the code cache"]
    out.table(header, rows)
    out()
    out.table(["release", "tool", "/ plain", "paired", "<= 0.9 (both)", "RSS < 40 MiB"], ratios)
    out()
    out("- wall: the whole process (GNU time), from exec to exit; CPU: user + system of its tree.")
    out(
        "- / plain: the median wall over the median of curl + openssl; paired: the median of each "
        "round's own ratio (the two ran in the same round, seconds apart, so a burst of load on "
        "this shared machine weighs on both); the target is met when both are."
    )
    out(f"- {interpreter_note()}.")
    out("- peak RSS: GNU time %M, the largest process of the tree (the agent, or its smoke test child).")
    out(
        "- left in the code cache: bytes an update added to the cache beside the old build's code "
        "(hard links to it not counted): this build keeps the new build's code its smoke test unpacked, "
        "for its first start after the swap (its dependencies' bytecode and native libraries are "
        "links to the old build's); "
        "the old shiv build leaves the smoke test's extraction, which nothing uses or removes."
    )


if __name__ == "__main__":
    sys.exit(main())
