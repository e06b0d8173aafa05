#!/usr/bin/env python3
"""How much memory an agent needs to update to a big release, and how fast the new version runs.

    .venv/bin/python bench/update_memory.py [--size-mib 512] [--kinds new,old] [--keep] [--no-results]

For each kind of agent file (bench/agent_builds.py: ``new`` = this tree's ``make agent-binary``
file, ``old`` = the shiv build before issue 11), all on 127.0.0.1 in one temporary directory:

1. builds that kind's 1.0.0 and 2.0.0; 2.0.0, padded to SIZE MiB, is the release (a signed
   manifest in the store layout, served by ``publisher.serve``, the local CDN);
2. starts 1.0.0 with ``run`` and the ``exec`` restart method (``python3`` on PATH: this Python);
3. runs ``avika-agent update`` by hand: it downloads, verifies, smoke-tests (``<staged> version``),
   swaps, then signals the running agent, which re-execs into 2.0.0 (same PID); the new file finds
   its code unpacked (the passing smoke test's unpacking was kept), the old shiv build extracts it;
4. prints the peak RSS of the ``update`` process (``VmHWM``: polled from /proc every 5 ms, and as
   the process itself logged it at the swap), the time the transaction took, and the time from
   the swap to the new version running and from its exec to running (both ends read from the
   agents' JSON log lines, one clock). ``ru_maxrss`` of the child is not used: Linux carries it
   across ``exec``, so it reports this script's own image, which the child was forked from;
5. puts those next to bare start-ups, each the median wall time of 5 fresh processes (after one
   untimed warm-up run) with the agent's environment: a bare interpreter importing what the agent
   imports at start-up (``import agent.cli`` from a bytecode-compiled copy of this tree, with this
   virtualenv's dependencies: DESIGN section 4, every module is imported there), and the built
   1.0.0's own ``FILE version`` from its warm cache (its bootstrap, then the same imports).

It prints figures, appends them to ``bench/RESULTS.md`` (unless ``--no-results``) and asserts
nothing.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent_builds import KINDS, LABELS, build, cache_env, interpreter_note, pad, python3_dir
from results import Report, append, command_line, load_average

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import environment  # noqa: E402
from agent.manifest import Binary, LocalSigner, Manifest, Rollout, generate_private_key, sign_envelope  # noqa: E402
from publisher.serve import make_server  # noqa: E402
from tests.agent_harness import Host, wait_for  # noqa: E402

OLD, NEW = "1.0.0", "2.0.0"
STARTUP_RUNS = 5
STARTUP_TIMEOUT = 60
# What the agent imports at start-up: agent.cli imports every module the agent needs (DESIGN 4);
# then one line of output, the "ready" mark startup_seconds times. {src}: a compiled copy of the tree.
AGENT_IMPORTS = "import sys; sys.path.insert(0, {src!r}); import agent.cli; print('ready')"


def compiled_copy(work: Path) -> Path:
    """agent/ and infra/ with their bytecode (this tree's environment may forbid writing it)."""
    src = work / "src"
    for name in ("agent", "infra"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "_embedded.py"))
    compileall.compile_dir(src, quiet=1)
    return src


def publish(store: Path, signer: LocalSigner, version: str, binary: Path, digest: str) -> None:
    platform = environment.platform_key()
    key = f"binaries/{version}/{digest}/avika-agent-{platform}"
    (store / key).parent.mkdir(parents=True, exist_ok=True)
    os.link(binary, store / key)
    now = datetime.now(UTC)
    manifest = Manifest(
        serial=1,
        version=version,
        released_at=now - timedelta(minutes=1),
        expires=now + timedelta(days=1),
        binaries={platform: Binary(key, digest, binary.stat().st_size)},
        rollout=Rollout(100, version),
    )
    (store / "manifest.json").write_bytes(sign_envelope(manifest.to_payload(), [signer]))


def hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def log_time(host: Host, predicate) -> datetime | None:
    for line in host.log_lines():
        if predicate(line):
            return datetime.fromisoformat(line["time"])
    return None


def startup_seconds(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Medians over ``STARTUP_RUNS`` fresh runs of ``cmd``, after an untimed warm-up (page cache;
    shiv's first run extracts its archive): (seconds to its first line of output, i.e. started
    and ready, as the agent's "running" log line; seconds to its exit, interpreter teardown
    included)."""

    def once() -> tuple[float, float]:
        started = time.perf_counter()
        with subprocess.Popen(
            cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        ) as proc:
            stdout = proc.stdout
            if stdout is None:  # never: stdout=PIPE (for the type checker)
                raise RuntimeError("no stdout pipe")
            if not select.select([stdout], [], [], STARTUP_TIMEOUT)[0]:
                proc.kill()
                raise SystemExit(f"{cmd[:2]} printed nothing within {STARTUP_TIMEOUT} s")
            stdout.readline()
            ready = time.perf_counter() - started
            stdout.read()
            code = proc.wait(timeout=STARTUP_TIMEOUT)
        if code != 0:
            raise SystemExit(f"{cmd[:2]} exited {code}")
        return ready, time.perf_counter() - started

    once()
    runs = [once() for _ in range(STARTUP_RUNS)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def measure(kind: str, args: argparse.Namespace, work: Path, src: Path, out: Report) -> None:
    size = args.size_mib << 20
    signer = LocalSigner(generate_private_key())
    keys = signer.public_key.b64
    store = work / "store" / "updates"
    store.mkdir(parents=True)
    server = make_server(work / "store", "127.0.0.1", 0)
    server.RequestHandlerClass.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
    env_extra = {
        "UPDATE_INTERVAL": "1h",
        "UPDATE_HEALTH_WINDOW": "1s",
        "UPDATE_RESTART_METHOD": "exec",
        "PATH": f"{python3_dir(work)}{os.pathsep}/usr/bin:/bin",
        **cache_env(kind, work / "host" / "cache"),
    }
    host = Host(work / "host", f"{server.url}/updates", env_extra)
    agent = None
    try:
        print(f"[{kind}] building {OLD} and {NEW}, writing a {args.size_mib} MiB release ...", flush=True)
        builds = work / "builds"
        old = build(kind, OLD, keys, builds / f"{kind}-{OLD}", builds)
        new = build(kind, NEW, keys, builds / f"{kind}-{NEW}", builds)
        binary = work / "release" / "avika-agent"
        binary.parent.mkdir()
        digest = pad(new, binary, size)
        host.target.parent.mkdir(parents=True)
        shutil.copy2(old, host.target)
        agent = host.start()
        wait_for(lambda: host.running_version() == OLD, 60, "the old agent to run")
        # Bare start-ups, before anything is published (the old agent idles: interval 1 h).
        env = host.env()
        startups: list[tuple[str, tuple[float, float]]] = []

        def startup(label: str, cmd: list[str]) -> None:
            startups.append((label, startup_seconds(cmd, env, host.dir)))

        imports = "bare interpreter + the agent's start-up imports (`python -c 'import agent.cli'`, bytecode)"
        startup(imports, [sys.executable, "-c", AGENT_IMPORTS.format(src=str(src))])
        startup(f"{LABELS[kind]} {OLD} `FILE version`, warm cache", [str(host.target), "version"])
        publish(store, signer, NEW, binary, digest)

        with open(host.log_path, "ab") as log:
            update = subprocess.Popen(
                [str(host.target), "update", "--config", str(host.config)],
                stdout=subprocess.PIPE,
                stderr=log,
                env=host.env(),
                cwd=host.dir,
            )
        peak = 0
        t0 = time.monotonic()
        while update.poll() is None:
            peak = max(peak, hwm_kib(update.pid) or 0)
            time.sleep(0.005)
        elapsed = time.monotonic() - t0
        answer = update.stdout.read().decode() if update.stdout else ""
        if update.returncode != 0:
            tail = host.log_text()[-3000:]
            raise SystemExit(f"[{kind}] update failed ({update.returncode}): {answer}\n{tail}")
        result = json.loads(answer)
        wait_for(lambda: host.running_version() == NEW, 60, "the new version to run")
        swapped = log_time(
            host, lambda line: str(line.get("msg", "")).startswith("swapped ") and "->" not in line["msg"]
        )
        running = log_time(host, lambda line: str(line.get("msg", "")).startswith(f"agent {NEW} running"))
        agent_pid = agent.pid
        execed = log_time(
            host, lambda line: line.get("pid") == agent_pid and str(line.get("msg", "")).startswith("exec ")
        )
        wait_for(lambda: "committed" in host.chain(NEW), 60, "the commit")

        own = [line["peak_rss_kib"] for line in host.log_lines() if "peak_rss_kib" in line]
        out(f"### {LABELS[kind]}: {OLD} updating to a {args.size_mib} MiB {NEW}")
        out()
        out(f"- update of {args.size_mib} MiB: {result.get('restart')} restart, took {elapsed:.1f} s")
        out(f"- peak RSS of the update process, VmHWM polled every 5 ms: {peak / 1024:.1f} MiB")
        if own:
            out(f"- peak RSS of the update process, VmHWM it logged at the swap: {own[-1] / 1024:.1f} MiB")
        out(f"- committed: {host.pending() is None}")
        out()
        if swapped and running:
            seconds = (running - swapped).total_seconds()
            own_start = (running - execed).total_seconds() if execed else None
            rows = [
                [f"swap -> new version running (this update, same pid {agent_pid})", f"{seconds:.3f} s"],
                [
                    "  of which exec -> running (the new process's own start)",
                    "not in the log" if own_start is None else f"{own_start:.3f} s",
                ],
            ]
            for label, (ready, wall) in startups:
                by_exec = "-" if own_start is None else f"{own_start / ready:.2f}"
                rows.append([label, f"{ready:.3f} s", f"{seconds / ready:.2f}", by_exec, f"{wall:.3f} s"])
            header = ["start-up", "to running / ready", "swap -> running / this", "exec -> running / this"]
            out.table([*header, "to exit"], [row + [""] * (5 - len(row)) for row in rows])
        else:
            out("- swap -> new version running: not found in the log")
        out()
    finally:
        for pid in host.processes():
            os.kill(pid, signal.SIGKILL)
        if agent is not None:
            agent.wait(timeout=10)
        server.shutdown()
        server.server_close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512, help="size of the new release (default 512)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="agent files to measure (default new,old)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(KINDS):
        parser.error(f"--kinds takes {', '.join(KINDS)}")
    work = Path(tempfile.mkdtemp(prefix="avika-bench-"))
    out = Report()
    load_at_start = load_average()
    try:
        src = compiled_copy(work)
        for kind in kinds:
            (work / kind).mkdir()
            measure(kind, args, work / kind, src, out)
        out(
            f"Bare start-ups: median of {STARTUP_RUNS} fresh processes with the agent's environment, "
            "after one untimed warm-up run, timed from the spawn to the first line the process "
            "prints (its version, or `ready` after the imports), so the interpreter's teardown is "
            "left out as it is from swap -> running; `to exit` adds it. Swap -> running also "
            "holds the rest of the transaction after the swap and the signal to the running agent; "
            "both it and exec -> running end at the new version's `running` log line, after its "
            "imports and its start (config, state lock, pid record); the old shiv build's also "
            "hold its extraction of the new build. Log times have 1 ms resolution."
        )
        out(f"Also: {interpreter_note()}.")
        out(f"Load average at the start / the end: {load_at_start} / {load_average()}")
        if not args.no_results:
            append(out.lines, title="bench/update_memory.py", command=command_line())
        return 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
