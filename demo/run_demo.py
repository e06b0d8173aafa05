"""`make demo`: a signed release, published to a local store, served, and evaluated by agents.

Offline and on loopback only. Everything it writes lands under one folder (``demo-run/`` by
default, or ``--dir``), which it names at the start and wipes at the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PUBLISH = [str(BIN / "avika-publish")]
AGENT = [str(BIN / "avika-agent")]

AGENTS = [f"web-{n:02d}.eu-west" for n in range(1, 9)] + ["edge-01.us-east", "edge-02.us-east"]
CONTAINER_AGENTS = {"edge-01.us-east", "edge-02.us-east"}


def say(step: str) -> None:
    print(f"\n==> {step}", flush=True)


def run(cmd: list[str], env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    if check and result.returncode != 0:
        sys.exit(f"demo: {' '.join(cmd[:3])} failed ({result.returncode}):\n{result.stderr}{result.stdout}")
    return result


def sample_binary(path: Path, version: str) -> None:
    """A tiny stand-in agent: answers `version` / `--version` like the real one."""
    path.write_text(f'#!/bin/sh\necho "{version}"\n')
    path.chmod(0o755)


def start_server(store: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    log = log_path.open("w")
    proc = subprocess.Popen(
        [*PUBLISH, "serve", "--root", str(store), "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        sys.exit(f"demo: serve did not start: {line!r} (log: {log_path})")
    url = line[line.index("http://") :].split()[0].rstrip("/")
    return proc, url


def check_agents(workdir: Path, server: str, public_key: str, versions: dict[str, str]) -> list[dict]:
    rows = []
    for agent_id in AGENTS:
        target = workdir / "hosts" / agent_id / "avika-agent"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "AGENT_ID": agent_id,
            "UPDATE_SERVER": server,
            "UPDATE_PUBLIC_KEYS": public_key,
            "UPDATE_STATE_DIR": str(target.parent / "state"),
            "UPDATE_TARGET": str(target),
            "DEPLOYMENT_MODE": "container" if agent_id in CONTAINER_AGENTS else "vm",
            "UPDATE_REPORT_URL": "disabled",
        }
        result = run([*AGENT, "check", "--config", str(workdir / "empty.conf")], env=env, check=False)
        try:
            out = json.loads(result.stdout)
        except json.JSONDecodeError:
            sys.exit(f"demo: check for {agent_id} printed no JSON: {result.stderr}")
        if result.returncode != 0:
            sys.exit(f"demo: check for {agent_id} failed: {out}")
        rows.append(out)
        versions[agent_id] = out["current_version"]
    return rows


def tamper_check(workdir: Path, server: str, public_key: str) -> subprocess.CompletedProcess:
    agent_id = AGENTS[0]
    target = workdir / "hosts" / agent_id / "avika-agent"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AGENT_ID": agent_id,
        "UPDATE_SERVER": server,
        "UPDATE_PUBLIC_KEYS": public_key,
        "UPDATE_STATE_DIR": str(target.parent / "state"),
        "UPDATE_TARGET": str(target),
        "DEPLOYMENT_MODE": "vm",
    }
    return run([*AGENT, "check", "--config", str(workdir / "empty.conf")], env=env, check=False)


def print_table(rows: list[dict]) -> None:
    header = f"{'agent':<18} {'mode':<10} {'running':<8} {'manifest':<8} {'bucket':>6} {'in wave':<8} action"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['agent_id']:<18} {r['mode']:<10} {r['current_version']:<8} {r['manifest_version']:<8} "
            f"{r['bucket']:>6} {str(r['in_wave']).lower():<8} {r['action']} ({r['reason']})"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=ROOT / "demo-run", help="folder for everything")
    args = parser.parse_args()
    workdir: Path = args.dir.resolve()
    started = time.monotonic()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / "empty.conf").write_text("# the demo configures agents through the environment\n")
    store = workdir / "updates"
    print(f"Avika Updates demo: all files under {workdir}")

    say("1. Create an Ed25519 signing key")
    key = workdir / "signing-key.pem"
    keygen = json.loads(run([*PUBLISH, "keygen", "--out", str(key), "--json"]).stdout)
    public_key = keygen["public_key"]
    print(f"public key {public_key}  key id {keygen['key_id'][:16]}...")

    say("2. Build two tiny sample agent binaries (0.1.43, 0.1.44)")
    builds = workdir / "builds"
    builds.mkdir()
    for version in ("0.1.43", "0.1.44"):
        sample_binary(builds / f"avika-agent-{version}", version)
    sign = ["--key", str(key), "--store", str(store)]

    def release(version: str, *extra: str) -> dict:
        binary = builds / f"avika-agent-{version}"
        cmd = [*PUBLISH, "release", version, "--binary", f"linux-amd64={binary}"]
        cmd += ["--binary", f"linux-arm64={binary}", *sign, "--json", *extra]
        return json.loads(run(cmd).stdout)

    say("3. Publish 0.1.43 to the local store")
    out = release("0.1.43")
    print(f"published 0.1.43 as serial {out['serial']} to {store}")

    say("4. Hosts install 0.1.43; serve the store on 127.0.0.1")
    for agent_id in AGENTS:
        host = workdir / "hosts" / agent_id
        host.mkdir(parents=True)
        sample_binary(host / "avika-agent", "0.1.43")
    server, url = start_server(store, workdir / "serve.log")

    def stop_server(*_: object) -> None:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=10)

    signal.signal(signal.SIGTERM, lambda *a: (stop_server(), sys.exit(130)))
    try:
        print(f"serving {store} at {url}")
        versions: dict[str, str] = {}
        rows = check_agents(workdir, url, public_key, versions)
        print_table(rows)

        say("5. Publish 0.1.44 at a 50 % rollout (salt = version, so each release picks new canaries)")
        out = release("0.1.44", "--rollout", "50", "--changelog", "Fixed WAL directory creation")
        print(f"published 0.1.44 as serial {out['serial']}, rollout 50 %")

        say("6. Every agent verifies the signed manifest and decides (avika-agent check)")
        rows = check_agents(workdir, url, public_key, versions)
        print_table(rows)
        updating = sum(r["action"] == "update" for r in rows)
        reporting = sum(r["action"] == "report" for r in rows)
        print(f"\n{updating} VM agents in the 50 % wave would update now; {reporting} containers report")

        say("7. Audit what the server serves (avika-publish verify)")
        verify = run([*PUBLISH, "verify", "--public-key", public_key, "--url", url])
        print(verify.stdout.strip())

        say("8. Someone changes one byte of the served manifest: agents and the audit refuse it")
        manifest = store / "manifest.json"
        original = manifest.read_bytes()
        index = original.index(b'"payload":"') + 40
        manifest.write_bytes(
            original[:index] + (b"B" if original[index : index + 1] == b"A" else b"A") + original[index + 1 :]
        )
        try:
            tampered = tamper_check(workdir, url, public_key)
            audit = run([*PUBLISH, "verify", "--public-key", public_key, "--url", url], check=False)
        finally:
            manifest.write_bytes(original)
        print(f"avika-agent check  -> exit {tampered.returncode}: {tampered.stdout.strip()}")
        print(f"avika-publish verify -> exit {audit.returncode}: {audit.stderr.strip().splitlines()[-1]}")
        if tampered.returncode != 3 or audit.returncode != 3:
            sys.exit("demo: a tampered manifest was not refused")
    finally:
        stop_server()
    print(f"\nDemo finished in {time.monotonic() - started:.1f} s; files are under {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
