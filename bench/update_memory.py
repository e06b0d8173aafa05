#!/usr/bin/env python3
"""How much memory an agent needs to update to a big binary, and how fast the new version runs.

    .venv/bin/python bench/update_memory.py [--size-mib 512] [--real-binary] [--keep] [--no-results]

What it does, all on 127.0.0.1 and in one temporary directory:

1. writes the new release: a runnable agent of SIZE MiB (a Python zipapp whose launcher sits
   behind SIZE MiB of random padding, so ``FILE version`` still answers at once) and signs a
   manifest for it, in the store layout, served by ``publisher.serve`` (the local CDN);
2. starts the old agent (a small development build, or with ``--real-binary`` a ``make
   agent-binary`` build) with ``run`` and the ``exec`` restart method;
3. runs ``avika-agent update`` by hand: it downloads, verifies, stages, swaps, then signals the
   running agent, which re-execs into the new binary (same PID);
4. prints the peak RSS of the ``update`` process (``VmHWM``: polled from /proc every 5 ms, and as
   the process itself logged it at the swap), the time the transaction took, and the time from
   the swap to the new version running (both ends read from the agents' JSON log lines, one
   clock). ``ru_maxrss`` of the child is not used: Linux carries it across ``exec``, so it
   reports this script's own image, which the child was forked from;
5. puts swap -> running next to bare start-ups, each the median wall time of 5 fresh processes
   (after one untimed warm-up run), with the same environment as the agent: the interpreter
   importing exactly what the agent imports at start-up (``import agent.cli``: DESIGN section 4,
   every module is imported there), the new binary's ``FILE version`` (interpreter start on the
   big zipapp; it answers before importing the agent), and with ``--real-binary`` the built
   binary's own ``FILE version`` (shiv's bootstrap, then the agent's imports), measured while it
   is still the installed target.

It prints figures, appends them to ``bench/RESULTS.md`` (unless ``--no-results``) and asserts
nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
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
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from results import Report, append, command_line, load_average

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import environment  # noqa: E402
from agent.manifest import Binary, LocalSigner, Manifest, Rollout, generate_private_key, sign_envelope  # noqa: E402
from publisher.serve import make_server  # noqa: E402
from tests.agent_harness import Host, dev_binary, wait_for  # noqa: E402

OLD, NEW = "1.0.0", "2.0.0"
CHUNK = 8 << 20
STARTUP_RUNS = 5
STARTUP_TIMEOUT = 60
# What the agent imports at start-up: agent.cli imports every module the agent needs (DESIGN 4);
# then one line of output, the "ready" mark startup_seconds times.
AGENT_IMPORTS = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import agent.cli; print('ready')"


def big_binary(path: Path, version: str, keys: str, size: int) -> str:
    """A runnable agent of exactly ``size`` bytes; returns its sha256 (hashed while writing)."""
    main = (
        "import sys\n"
        f"if sys.argv[1:2] == ['version']:\n    print({version!r}); sys.exit(0)\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import agent.buildinfo\n"
        f"agent.buildinfo.VERSION = {version!r}\n"
        f"agent.buildinfo.PUBLIC_KEYS = {keys!r}\n"
        "from agent import cli\n"
        "sys.exit(cli.main())\n"
    )
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("__main__.py", main)
    head = f"#!{sys.executable}\n".encode()
    tail = archive.getvalue()
    padding = size - len(head) - len(tail)
    if padding < 0:
        raise SystemExit(f"--size-mib too small: the launcher alone is {len(head) + len(tail)} bytes")
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        for part in (head,):
            fh.write(part)
            digest.update(part)
        while padding:
            block = os.urandom(min(CHUNK, padding))
            fh.write(block)
            digest.update(block)
            padding -= len(block)
        fh.write(tail)
        digest.update(tail)
    path.chmod(0o755)
    return digest.hexdigest()


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


def env_python3(env: dict[str, str]) -> tuple[str, str]:
    """What ``/usr/bin/env python3`` (the built binary's shebang) runs with ``env``: the file found
    on PATH, and the interpreter it ends up as (differs when PATH has a wrapper, e.g. a pyenv shim)."""
    found = shutil.which("python3", path=env.get("PATH")) or "python3"
    done = subprocess.run(
        [found, "-c", "import sys; print(sys.executable)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return found, done.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512, help="size of the new binary (default 512)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument(
        "--real-binary",
        action="store_true",
        help="the updating (old) agent is a `make agent-binary` build, not a development launcher",
    )
    args = parser.parse_args()
    size = args.size_mib << 20

    work = Path(tempfile.mkdtemp(prefix="avika-bench-"))
    signer = LocalSigner(generate_private_key())
    keys = signer.public_key.b64
    store = work / "store" / "updates"
    store.mkdir(parents=True)
    server = make_server(work / "store", "127.0.0.1", 0)
    server.RequestHandlerClass.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
    host = Host(
        work / "host", f"{server.url}/updates", {"UPDATE_INTERVAL": "1h", "UPDATE_HEALTH_WINDOW": "1s"}
    )
    agent = None
    out = Report()
    load_at_start = load_average()
    try:
        print(f"writing a {args.size_mib} MiB release in {work} ...", flush=True)
        started = time.monotonic()
        binary = work / "release" / "avika-agent"
        binary.parent.mkdir()
        digest = big_binary(binary, NEW, keys, size)
        print(f"  {size} bytes, sha256 {digest[:16]}..., {time.monotonic() - started:.1f}s", flush=True)

        if args.real_binary:
            host.env_extra["SHIV_ROOT"] = str(work / "shiv")
            build = [sys.executable, str(ROOT / "packaging" / "build_agent.py"), "--version", OLD]
            subprocess.run(
                [*build, "--out", str(host.target), "--public-keys", keys], check=True, capture_output=True
            )
        else:
            dev_binary(host.target, OLD, keys)
        agent = host.start()
        wait_for(lambda: host.running_version() == OLD, 30, "the old agent to run")
        # Bare start-ups, before anything is published (the old agent idles: interval 1 h).
        env = host.env()
        startups: list[tuple[str, tuple[float, float]]] = []

        def startup(label: str, cmd: list[str]) -> None:
            startups.append((label, startup_seconds(cmd, env, host.dir)))

        imports = "fresh `python -c 'import agent.cli'`: interpreter + the agent's start-up imports"
        startup(imports, [sys.executable, "-c", AGENT_IMPORTS])
        zipapp = f"new binary `FILE version`: interpreter on the {args.size_mib} MiB zipapp, no agent imports"
        startup(zipapp, [str(binary), "version"])
        if args.real_binary:  # the installed target is still the built binary
            found, interpreter = env_python3(env)
            shiv = f"built binary `FILE version`: shiv bootstrap + the agent's imports (python3: {found})"
            startup(shiv, [str(host.target), "version"])
            if Path(found).resolve() != Path(interpreter).resolve():
                direct = f"built binary `{interpreter} FILE version`: the same without the PATH wrapper"
                startup(direct, [interpreter, str(host.target), "version"])
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
            print(f"update failed ({update.returncode}): {answer}\n{host.log_text()[-3000:]}")
            return 1
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
        old_agent = "a `make agent-binary` build" if args.real_binary else "a development launcher"
        out(f"New release: a {args.size_mib} MiB zipapp; the updating agent {OLD} is {old_agent}.")
        out()
        out(f"- update of {args.size_mib} MiB: {result['restart']} restart, took {elapsed:.1f} s")
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
            out()
            out(
                f"Bare start-ups: median of {STARTUP_RUNS} fresh processes with the agent's environment, "
                "after one untimed warm-up run, timed from the spawn to the first line the process "
                "prints (its version, or `ready` after the imports), so the interpreter's teardown is "
                "left out as it is from swap -> running; `to exit` adds it. Swap -> running also "
                "holds the rest of the transaction after the swap and the signal to the running agent; "
                "both it and exec -> running end at the new version's `running` log line, after its "
                "imports and its start (config, state lock, pid record). Log times have 1 ms resolution."
            )
        else:
            out("- swap -> new version running: not found in the log")
        out(f"Load average at the start / the end: {load_at_start} / {load_average()}")
        if not args.no_results:
            append(out.lines, title="bench/update_memory.py", command=command_line())
        return 0
    finally:
        for pid in host.processes():
            os.kill(pid, signal.SIGKILL)
        if agent is not None:
            agent.wait(timeout=10)
        server.shutdown()
        server.server_close()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
