#!/usr/bin/env python3
"""Fleet simulation: a staged rollout over 100,000 agent ids, real agents polling, CDN load.

    .venv/bin/python bench/fleet.py [--agents 100000] [--sample 20] [--interval 1h] [--binary-mib 17.6]
                                    [--no-results]

Everything on 127.0.0.1, in one temporary directory; it prints figures, appends them to
``bench/RESULTS.md`` and asserts nothing (bounded: well under a minute with the defaults).

1. Staged rollout 1 -> 10 -> 50 -> 100 % with the real code: the release is published with
   ``publisher.release`` into a ``DirStore`` and re-signed with ``publisher.release.resign`` for each
   wave; each wave's envelope is verified once with ``agent.manifest.verify_manifest`` (serial
   carried over as an agent would); every agent id (``host-NNNNNN.dcD``) is then decided with
   ``agent.decide.decide`` (which uses ``rollout_bucket`` / ``in_wave``). Per wave: the fraction
   in the wave against the target (and the binomial standard error), the spread over the seven
   data centres, and the agents that LEFT the wave since the previous one (must be 0).
2. A sample of real agent processes (``.venv/bin/avika-agent check``, ``DEPLOYMENT_MODE=vm``, a
   sidecar ``UPDATE_TARGET`` printing its version) polls a real ``publisher.serve`` server: two
   polls at 10 %, a re-sign to 50 %, two more polls. The server counts status codes and the bytes
   it wrote per response; every real answer (bucket, in_wave, action) is compared with the
   in-process decision for the same id and manifest.
3. Convergence and CDN load, analytically (formulas printed) and by Monte Carlo with the agent's
   own timing functions (``agent.runner.first_delay`` / ``next_delay`` when importable): time until
   every agent has seen a new manifest, and requests per second at the CDN for 10k and 100k
   agents, in steady state (phases spread) and after a synchronized fleet start.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from results import Report, append, command_line, heading, machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent import environment  # noqa: E402
from agent.config import parse_duration  # noqa: E402
from agent.decide import UPDATE, Host, decide  # noqa: E402
from agent.manifest import (  # noqa: E402
    LocalSigner,
    Manifest,
    Rollout,
    TrustState,
    generate_private_key,
    in_wave,
    verify_manifest,
)
from publisher.release import ReleaseSpec, release  # noqa: E402
from publisher.resign import resign  # noqa: E402
from publisher.serve import make_server  # noqa: E402
from publisher.stores import DirStore  # noqa: E402

try:  # the agent's own timing (DESIGN section 7); the contract's values if runner is not there
    from agent.runner import JITTER, MAX_SPLAY, first_delay, next_delay

    TIMING_SOURCE = "agent.runner.first_delay / next_delay"
except ImportError:  # pragma: no cover - only while agent/runner.py is being written
    JITTER, MAX_SPLAY = 0.10, 60.0
    TIMING_SOURCE = "DESIGN section 7 (agent.runner not importable)"

    def first_delay(interval: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(float(interval), MAX_SPLAY))

    def next_delay(interval: int, rng: random.Random) -> float:
        return interval * rng.uniform(1.0 - JITTER, 1.0 + JITTER)


AGENT_BIN = ROOT / ".venv" / "bin" / "avika-agent"
TITLE = "bench/fleet.py"
WAVES = (1, 10, 50, 100)
VERSION, RUNNING = "0.1.44", "0.1.43"
PLATFORM = environment.platform_key()
DEADLINE = 50.0  # seconds; the sample of real agents stops early rather than run past it


def agent_ids(n: int) -> list[str]:
    return [f"host-{i:06d}.dc{i % 7}" for i in range(n)]


# ================================================================ 1. staged rollout


def publish_waves(tmp: Path, signer: LocalSigner) -> tuple[DirStore, list[bytes]]:
    """Release at 1 %, then re-sign to each wave; the envelope of every wave, in order."""
    build = tmp / "avika-agent"
    build.write_text(f'#!/bin/sh\necho "{VERSION}"\n')
    store = DirStore(tmp / "store")
    store.root.mkdir()
    spec = ReleaseSpec(VERSION, {PLATFORM: build}, rollout_percent=WAVES[0], init=True)
    envelopes = [release(store, [signer], spec).envelope]
    for percent in WAVES[1:]:
        envelopes.append(resign(store, [signer], percent=percent).envelope)
    return store, [e for e in envelopes if e is not None]


def rollout(out: Report, ids: list[str], envelopes: list[bytes], signer: LocalSigner) -> list[Manifest]:
    out(f"### 1. Staged rollout over {len(ids):,} agent ids (real verify_manifest + decide)")
    out()
    now = datetime.now(UTC)
    trust = TrustState()
    previous: set[int] = set()
    manifests, rows = [], []
    started = time.perf_counter()
    for envelope in envelopes:
        manifest = verify_manifest(
            envelope, trusted=[signer.public_key], now=now, trust=trust, platform=PLATFORM
        )
        trust = TrustState(manifest.serial, manifest.digest)
        manifests.append(manifest)
        members: set[int] = set()
        per_dc = Counter[int]()
        for i, agent_id in enumerate(ids):
            decision = decide(manifest, Host(agent_id, RUNNING, "vm", platform=PLATFORM))
            if decision.in_wave:
                members.add(i)
                per_dc[i % 7] += 1
                assert decision.action == UPDATE  # every agent in the wave is told to update
        percent = manifest.rollout.percent
        fraction = len(members) / len(ids)
        stderr = math.sqrt(percent / 100 * (1 - percent / 100) / len(ids))
        dc_size = Counter(i % 7 for i in range(len(ids)))
        dc_fractions = [per_dc[d] / dc_size[d] for d in range(7)]
        left = len(previous - members)
        rows.append(
            [
                f"{percent} %",
                manifest.serial,
                f"{len(members):,}",
                f"{fraction * 100:.3f} %",
                f"{(fraction - percent / 100) * 100:+.3f} pp",
                f"{stderr * 100:.3f} pp",
                f"{min(dc_fractions) * 100:.2f}-{max(dc_fractions) * 100:.2f} %",
                f"{len(members - previous):,}",
                left,
            ]
        )
        previous = members
    elapsed = time.perf_counter() - started
    out.table(
        [
            "wave",
            "serial",
            "in wave",
            "fraction",
            "vs target",
            "binomial s.e.",
            "per-DC range",
            "joined",
            "LEFT (must be 0)",
        ],
        rows,
    )
    out()
    out(f"Decisions: {len(ids) * len(envelopes):,} in {elapsed:.1f} s.")
    out()
    salt_overlap(out, ids, manifests[0].rollout.salt)
    return manifests


def salt_overlap(out: Report, ids: list[str], salt: str) -> None:
    """Salt = version, so each release picks its own canaries: how far apart are they really?"""
    rows = []
    for percent in (1, 10):
        mine = {a for a in ids if in_wave(a, Rollout(percent, salt))}
        row = [f"{percent} %", f"{len(mine):,}"]
        for other in ("0.1.45", "0.1.48", "0.2.0"):
            theirs = {a for a in ids if in_wave(a, Rollout(percent, other))}
            row.append(f"{len(mine & theirs):,} (indep. {len(mine) * len(theirs) / len(ids):,.0f})")
        rows.append(row)
    out(f"Wave members shared between release {salt} and later releases (salt = version):")
    out()
    out.table(["wave", f"{salt}", "& 0.1.45", "& 0.1.48", "& 0.2.0"], rows)
    out()


# ================================================================ 2. real agents, real HTTP


class Traffic:
    """What the server answered: status per manifest request and the bytes written for each."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.responses: list[tuple[str, int, int]] = []  # (path, status, bytes incl. headers)

    def add(self, path: str, status: int, nbytes: int) -> None:
        with self.lock:
            self.responses.append((path, status, nbytes))

    def take(self) -> list[tuple[str, int, int]]:
        with self.lock:
            taken, self.responses = self.responses, []
        return taken


class _CountingWriter:
    def __init__(self, raw: Any) -> None:
        self.raw, self.count = raw, 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        self.raw.close()

    @property
    def closed(self) -> bool:
        return self.raw.closed


def counting_server(root: Path, traffic: Traffic) -> Any:
    server = make_server(root, "127.0.0.1", 0)
    base = server.RequestHandlerClass

    class Counting(base):  # type: ignore[misc, valid-type]
        def setup(self) -> None:
            super().setup()
            self.wfile = _CountingWriter(self.wfile)  # type: ignore[assignment]

        def log_request(self, code: Any = "-", size: Any = "-") -> None:
            self._status = int(code)

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def handle_one_request(self) -> None:
            before, self._status = self.wfile.count, 0  # type: ignore[attr-defined]
            super().handle_one_request()
            if self._status:
                traffic.add(self.path, self._status, self.wfile.count - before)  # type: ignore[attr-defined]

    server.RequestHandlerClass = Counting
    return server


def real_check(tmp: Path, url: str, agent_id: str, public_key: str) -> dict[str, Any]:
    home = tmp / "agents" / agent_id
    target = home / "avika-agent"
    if not target.exists():
        home.mkdir(parents=True)
        target.write_text(f'#!/bin/sh\necho "avika-agent {RUNNING}"\n')
        target.chmod(0o755)
        (home / "empty.conf").write_text("")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AGENT_ID": agent_id,
        "UPDATE_SERVER": url,
        "UPDATE_PUBLIC_KEYS": public_key,
        "UPDATE_STATE_DIR": str(home / "state"),
        "BUFFER_DIR": str(home / "data"),
        "UPDATE_TARGET": str(target),
        "DEPLOYMENT_MODE": "vm",
        "UPDATE_REPORT_URL": "disabled",
    }
    done = subprocess.run(
        [str(AGENT_BIN), "check", "--config", str(home / "empty.conf")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-200:]}"}


def sample_agents(out: Report, tmp: Path, ids: list[str], sample: int, deadline: float) -> dict[str, float]:
    out(f"### 2. {sample} real `avika-agent check` processes polling `publisher.serve` on 127.0.0.1")
    out()
    signer = LocalSigner(generate_private_key())
    www = tmp / "www"
    (www / "updates").mkdir(parents=True)
    build = tmp / "sample-agent"
    build.write_text(f'#!/bin/sh\necho "{VERSION}"\n')
    store = DirStore(www / "updates")
    release(store, [signer], ReleaseSpec(VERSION, {PLATFORM: build}, rollout_percent=10, init=True))
    traffic = Traffic()
    server = counting_server(www, traffic)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    url = server.url + "/updates"
    rng = random.Random(6)
    chosen = rng.sample(ids, sample)
    polls: list[tuple[str, list[dict[str, Any]], list[tuple[str, int, int]]]] = []
    mismatches, checked = [], 0
    try:
        for label, resign_to in (("10 %", None), ("10 %", None), ("50 % (re-signed)", 50), ("50 %", None)):
            if time.monotonic() > deadline:
                out(f"(stopped before poll '{label}': time budget reached)")
                break
            if resign_to is not None:
                resign(store, [signer], percent=resign_to)
            envelope = (www / "updates" / "manifest.json").read_bytes()
            manifest = verify_manifest(envelope, trusted=[signer.public_key], now=datetime.now(UTC))
            with ThreadPoolExecutor(max_workers=2) as pool:  # 2 cores: one agent per core
                answers = list(pool.map(lambda a: real_check(tmp, url, a, signer.public_key.b64), chosen))
            for agent_id, answer in zip(chosen, answers, strict=True):
                expected = decide(manifest, Host(agent_id, RUNNING, "vm", platform=PLATFORM))
                got = (
                    answer.get("bucket"),
                    answer.get("in_wave"),
                    answer.get("action"),
                    answer.get("serial"),
                )
                want = (expected.bucket, expected.in_wave, expected.action, manifest.serial)
                checked += 1
                if got != want:
                    mismatches.append((agent_id, got, want))
            polls.append((label, answers, traffic.take()))
    finally:
        server.shutdown()
        server.server_close()

    rows, sizes = [], {200: [], 304: []}
    for n, (label, answers, responses) in enumerate(polls, 1):
        manifest_responses = [r for r in responses if r[0].endswith("/manifest.json")]
        codes = Counter(status for _, status, _ in manifest_responses)
        total = sum(nbytes for _, _, nbytes in manifest_responses)
        for _, status, nbytes in manifest_responses:
            sizes.setdefault(status, []).append(nbytes)
        in_wave_count = sum(1 for a in answers if a.get("in_wave"))
        errors = sum(1 for a in answers if "error" in a)
        rows.append(
            [
                n,
                label,
                codes.get(200, 0),
                codes.get(304, 0),
                sum(v for k, v in codes.items() if k not in (200, 304)),
                f"{total / max(len(manifest_responses), 1):,.0f}",
                f"{in_wave_count}/{len(answers)}",
                errors,
            ]
        )
    out.table(["poll", "manifest", "200", "304", "other", "bytes/poll", "in wave", "errors"], rows)
    out()
    mean200 = sum(sizes[200]) / len(sizes[200]) if sizes[200] else float("nan")
    mean304 = sum(sizes[304]) / len(sizes[304]) if sizes[304] else float("nan")
    envelope_size = len((www / "updates" / "manifest.json").read_bytes())
    out(
        f"Bytes written per manifest response (status line + headers + body): 200 = {mean200:,.0f} "
        f"(envelope {envelope_size:,} B), 304 = {mean304:,.0f}. An unchanged manifest costs "
        f"{mean304 / mean200 * 100:.0f} % of a full one."
    )
    out(
        f"Real agents vs the in-process decision (bucket, in_wave, action, serial): "
        f"{checked - len(mismatches)}/{checked} identical."
    )
    for agent_id, got, want in mismatches[:5]:
        out(f"  MISMATCH {agent_id}: real {got} vs simulated {want}")
    out()
    return {"bytes_200": mean200, "bytes_304": mean304}


# ================================================================ 3. convergence and CDN load


def per_second_counts(
    n: int, interval: int, horizon: float, start: Callable[[random.Random], float], rng: random.Random
) -> list[int]:
    """Checks per 1-second window over [0, horizon) for n agents whose first check is start(rng)."""
    counts = [0] * int(horizon)
    for _ in range(n):
        t = start(rng)
        while t < horizon:
            counts[int(t)] += 1
            t += next_delay(interval, rng)
    return counts


def poisson_quantile(lam: float, q: float) -> int:
    """The smallest k with P(Poisson(lam) <= k) >= q (summed in log space: lam may be large)."""
    k, cdf = 0, 0.0
    while True:
        cdf += math.exp(k * math.log(lam) - lam - math.lgamma(k + 1)) if lam > 0 else float(k == 0)
        if cdf >= q or k > lam + 50 * math.sqrt(lam) + 50:
            return k
        k += 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def residual(interval: int, rng: random.Random) -> float:
    """Time from a random instant (a publish) to an agent's next check, in steady state.

    The instant falls in a wait with probability proportional to its length (length-biased
    sampling: accept w with probability w / max), then anywhere within it.
    """
    high = interval * (1 + JITTER)
    while True:
        wait = next_delay(interval, rng)
        if rng.random() * high <= wait:
            return rng.uniform(0, wait)


def convergence(
    out: Report, interval: int, sizes: dict[str, float], binary_mib: float, deadline: float
) -> None:
    j = JITTER
    title = f"interval {interval} s, jitter ±{j * 100:.0f} %, splay ≤ {MAX_SPLAY:.0f} s"
    out(f"### 3. Convergence and CDN load ({title})")
    out()
    out(f"Timing from {TIMING_SOURCE}. Waits W ~ U({1 - j:.2f}·I, {1 + j:.2f}·I), I = {interval} s.")
    out()
    out("Formulas (steady state, phases spread by the jitter):")
    out(f"- every agent has checked within max W = (1 + j)·I = {(1 + j) * interval:,.0f} s after a publish")
    out("  (+ the manifest's CDN max-age, 60 s, if the invalidation is lost; + the download itself);")
    out(
        "- mean time to an agent's next check = E[W²] / (2·E[W]) = I·(1 + j²/3) / 2 "
        f"= {interval * (1 + j * j / 3) / 2:,.0f} s;"
    )
    out(
        "- the last of N agents: 1 - F(t) = ((1+j)·I - t)² / (4·j·I²) near the end, so its median is "
        "(1+j)·I - I·sqrt(4·j·ln2 / N);"
    )
    out("- mean CDN request rate λ = N / E[W] = N / I; per-second counts ≈ Poisson(λ):")
    out("  p99 = the Poisson 99th percentile, the max over T one-second windows ≈ its 1 - 1/T quantile;")
    out("- a fleet started within one second polls first within the splay (λ₀ = N / 60 s), and the")
    out(
        f"  k-th checks spread as splay + sum of k waits (width 60 s + k·2j·I, "
        f"s.d. sqrt(k)·{2 * j / math.sqrt(12):.3f}·I),"
    )
    out("  so the start-up herd dissolves only over several intervals.")
    out()

    rng = random.Random(7)
    rows = []
    for n in (10_000, 100_000):
        if time.monotonic() > deadline:
            out(f"(skipped N = {n:,}: time budget reached)")
            continue
        residuals = [residual(interval, rng) for _ in range(n)]
        last_formula = (1 + j) * interval - interval * math.sqrt(4 * j * math.log(2) / n)
        horizon = 2 * interval
        # steady state: each first check after a stationary residual wait, counted over two intervals
        steady = per_second_counts(n, interval, horizon, lambda r: residual(interval, r), rng)
        lam = n / interval
        cold_horizon = 4 * interval
        cold = per_second_counts(n, interval, cold_horizon, lambda r: first_delay(interval, r), rng)
        cold_peaks = [max(cold[k * interval : (k + 1) * interval]) for k in range(4)]
        rows.append(
            [
                f"{n:,}",
                f"{sum(residuals) / n:,.0f} s",
                f"{percentile(residuals, 99):,.0f} s",
                f"{max(residuals):,.0f} s ({last_formula:,.0f})",
                f"{lam:.2f} ({sum(steady) / horizon:.2f})",
                f"{percentile(steady, 99)} ({poisson_quantile(lam, 0.99)})",
                f"{max(steady)} ({poisson_quantile(lam, 1 - 1 / horizon)})",
                " / ".join(str(p) for p in cold_peaks),
                f"{lam * sizes['bytes_304'] / 1024:,.1f} KiB/s",
                f"{n * binary_mib / ((1 + j) * interval):,.0f} MiB/s",
            ]
        )
    out.table(
        [
            "agents",
            "mean time to see a publish",
            "p99",
            "all agents (formula)",
            "req/s mean (simulated)",
            "req/s p99 over 1 s (formula)",
            "req/s max (formula)",
            "cold-start peak req/s, hours 1/2/3/4",
            "poll egress (304s)",
            f"binary egress at 100 % ({binary_mib:g} MiB)",
        ],
        rows,
    )
    out()
    out(
        "A staged rollout adds the operator's soak time per wave: the last agent of a wave has the "
        f"manifest at most {(1 + j) * interval:,.0f} s after the re-sign, so 1 → 10 → 50 → 100 % takes "
        f"at least 4 x {(1 + j) * interval:,.0f} s + the soaks."
    )
    out()


# ================================================================ main


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--agents", type=int, default=100_000, help="agent ids in the rollout (default 100000)"
    )
    parser.add_argument("--sample", type=int, default=20, help="real agent processes (default 20)")
    parser.add_argument("--interval", default="1h", help="UPDATE_INTERVAL for part 3 (default 1h)")
    parser.add_argument(
        "--binary-mib", type=float, default=17.6, help="binary size for egress (default 17.6)"
    )
    parser.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    if args.agents < 1 or args.sample < 0:
        parser.error("--agents must be >= 1 and --sample >= 0")
    interval = parse_duration(args.interval)
    started = time.monotonic()
    deadline = started + DEADLINE
    out = Report()
    command, machine_line = command_line(), machine()
    for line in heading(title=TITLE, command=command, machine_line=machine_line):
        print(line, flush=True)
    ids = agent_ids(args.agents)
    signer = LocalSigner(generate_private_key())
    with tempfile.TemporaryDirectory(prefix="avika-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        _, envelopes = publish_waves(tmp, signer)
        rollout(out, ids, envelopes, signer)
        sizes = {"bytes_200": float("nan"), "bytes_304": float("nan")}
        if args.sample:
            if AGENT_BIN.exists():
                sizes = sample_agents(out, tmp, ids, min(args.sample, len(ids)), deadline)
            else:
                out(f"(no real agents: {AGENT_BIN} is missing; run `make venv`)")
                out()
    convergence(out, interval, sizes, args.binary_mib, deadline)
    out(f"Total run time: {time.monotonic() - started:.1f} s.")
    if not args.no_results:
        append(out.lines, title=TITLE, command=command, machine_line=machine_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
