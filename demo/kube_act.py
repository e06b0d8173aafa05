"""The Kubernetes act of ``make demo``: the container half of the fleet follows a signed manifest too.

A simulated cluster (``tests/kube_fake.py``: kmock's fake API server on 127.0.0.1, with this
script playing the DaemonSet controller and the kubelets of 8 nodes) runs the agent as a DaemonSet
with ``updateStrategy: OnDelete``. A real ``avika-controller run`` process watches it through a
kubeconfig, exactly as it would watch a real API server:

1. 0.1.44 at 25 %: the template moves, then each in-wave node's pod is replaced, one at a time,
   each replacement Ready before the next pod goes;
2. ``rollout 100``: the other nodes follow, one at a time;
3. 0.1.45 at 25 %: its pod crash-loops on the canary node; the controller rolls it back on its own
   (``avika.io/previous-image``), remembers 0.1.45 as bad in its state ConfigMap, and reports
   ``rolled_back``; the fleet table shows the workload beside the VMs.

The cluster follows its own store (``kube/updates``, signed with the demo's key), so the act can
replay 0.1.44 and 0.1.45 whenever it runs; in production one store serves VMs and clusters alike.

``demo/run_demo.py`` runs it after the VM fleet's acts (``Demo.step_kubernetes``), with its key,
reports endpoint and process table, so ``fleet`` shows the workload beside the VM agents.

Standalone: ``python demo/kube_act.py --dir DIR [--quick]`` makes its own key and reports endpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the repository's packages and test helpers
    sys.path.insert(0, str(ROOT))

from agent.manifest import rollout_bucket  # noqa: E402
from infra.reports.store import ReportStore  # noqa: E402
from tests.kube_fake import CRASHLOOP, READY, FakeApiServer, Kubelet  # noqa: E402

BIN = Path(sys.executable).parent
PUBLISH = str(BIN / "avika-publish")
CONTROLLER = str(BIN / "avika-controller")

OLD, NEW, BAD = "0.1.43", "0.1.44", "0.1.45"
WAVE = 25
REPOSITORY = "hellodk/avika-agent"
# Node names chosen so that 25 % of 0.1.44 holds three nodes and 25 % of 0.1.45 exactly one (the
# canary); the act prints every node's bucket.
NODES = [f"worker-{n}" for n in range(1, 9)]
CLUSTER_ID = "demo"
NAMESPACE = "avika"
AGENT_ID = f"k8s/{CLUSTER_ID}/{NAMESPACE}/daemonset/avika-agent"


class ActError(Exception):
    """The act did not go as told: the message says what, the controller's log why."""


def say(step: str) -> None:
    print(f"\n==> {step}", flush=True)


def note(text: str = "") -> None:
    print(f"    {text}" if text else "", flush=True)


def image(version: str) -> str:
    return f"{REPOSITORY}:{version}"


@dataclass
class ActEnv:
    """What the act borrows from the demo it is part of."""

    workdir: Path  # the demo folder; the act writes under kube/
    key: Path  # the signing key (PEM)
    public_key: str  # its public half (base64), for the controller
    reports_url: str  # POST /v1/reports of the running avika-publish serve
    reports: str  # sqlite:///... behind it, for `avika-publish fleet`
    env: dict[str, str]  # the publisher's environment (AVIKA_FLEET_SECRET for enroll)
    start: Callable[..., subprocess.Popen[Any]]  # starts (and tracks) a process: (argv, role, **popen)
    quick: bool = False


@dataclass
class Act:
    env: ActEnv
    dir: Path = field(init=False)
    api: FakeApiServer | None = None
    kubelet: Kubelet | None = None
    controller: subprocess.Popen[Any] | None = None
    cdn: subprocess.Popen[Any] | None = None
    cdn_url: str = ""
    timeout: float = 90.0

    def __post_init__(self) -> None:
        self.dir = self.env.workdir / "kube"

    # -- tools

    def start(self, argv: list[str], role: str, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start through the demo (which stops it on exit) and note the pid in ``kube/pids.txt``."""
        proc = self.env.start(argv, role, **kwargs)
        with (self.dir / "pids.txt").open("a") as out:
            out.write(f"{proc.pid} {role}\n")
        return proc

    def publish(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [PUBLISH, *args], capture_output=True, text=True, env=self.env.env, timeout=120, check=False
        )
        if done.returncode != 0:
            raise ActError(
                f"avika-publish {' '.join(args[:2])} exited {done.returncode}: {done.stderr}{done.stdout}"
            )
        return done

    def signing(self) -> list[str]:
        return ["--key", str(self.env.key), "--store", str(self.dir / "updates")]

    def release(self, version: str, percent: int) -> int:
        binary = self.dir / "builds" / f"avika-agent-{version}"
        binary.parent.mkdir(exist_ok=True)
        # The cluster runs images; the manifest still names a binary per platform (VM agents'), so a
        # stand-in file is published beside the image reference.
        binary.write_bytes(f"avika-agent {version} (stand-in: the cluster runs {image(version)})\n".encode())
        out = self.publish(
            "release", version, "--binary", f"linux-amd64={binary}", "--image", image(version),
            "--init", "--rollout", str(percent), "--reports-url", self.env.reports_url, *self.signing(),
            "--json", "--no-inspect",  # a stand-in: the cluster runs the image, not this file
        )  # fmt: skip
        return int(json.loads(out.stdout)["serial"])

    def rollout(self, percent: int) -> None:
        self.publish("rollout", str(percent), *self.signing())

    def show_fleet(self) -> None:
        note("$ avika-publish fleet --reports sqlite:///.../reports.db")
        text = self.publish("fleet", "--reports", self.env.reports).stdout
        print("\n".join(f"    {line}" for line in text.rstrip().splitlines()), flush=True)

    def row(self) -> dict[str, Any] | None:
        fleet = json.loads(self.publish("fleet", "--reports", self.env.reports, "--json").stdout)
        return next((a for a in fleet["agents"] if a["agent_id"] == AGENT_ID), None)

    def events(self) -> list[dict[str, Any]]:
        store = ReportStore.from_url(self.env.reports)
        try:
            return sorted(store.agent_events(AGENT_ID), key=lambda e: (e["stream"], e["seq"]))
        finally:
            store.close()

    # -- the cluster

    def pods(self) -> dict[str, dict[str, Any]]:
        assert self.api is not None
        return {p["spec"]["nodeName"]: p for p in self.api.list("Pod", NAMESPACE)}

    @staticmethod
    def ready(pod: dict[str, Any] | None) -> bool:
        conditions = ((pod or {}).get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    def running(self) -> dict[str, str | None]:
        """Per node: the version its pod runs when Ready, else None."""
        out: dict[str, str | None] = {}
        pods = self.pods()
        for node in NODES:
            pod = pods.get(node)
            out[node] = pod["spec"]["containers"][0]["image"].rsplit(":", 1)[-1] if self.ready(pod) else None
        return out

    def template(self) -> str:
        assert self.api is not None
        ds = self.api.get("DaemonSet", NAMESPACE, "avika-agent") or {}
        return ds["spec"]["template"]["spec"]["containers"][0]["image"]

    def state(self) -> dict[str, Any]:
        assert self.api is not None
        cm = self.api.get("ConfigMap", NAMESPACE, "avika-controller-state") or {"data": {"state.json": "{}"}}
        return json.loads(cm["data"]["state.json"])

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = (self.dir / "controller.log").read_text().splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return "\n".join(text)

    def wait(self, what: str, done: Callable[[], bool], on_tick: Callable[[], None] | None = None) -> float:
        started = time.monotonic()
        while not done():
            if on_tick:
                on_tick()
            if time.monotonic() - started > self.timeout:
                raise ActError(f"timed out after {self.timeout:.0f} s waiting for {what}\n{self.log_tail()}")
            time.sleep(0.2)
        if on_tick:
            on_tick()
        return time.monotonic() - started

    def follow_pods(self, version: str) -> Callable[[], None]:
        """A tick that prints each node as its pod is replaced and Ready on ``version``."""
        seen = {
            node: (p["metadata"]["name"], v) for node, p in self.pods().items() for v in [self._version(p)]
        }
        printed: set[str] = set()
        started = time.monotonic()
        assert self.kubelet is not None

        def tick() -> None:
            pods = self.pods()
            for node in NODES:
                pod = pods.get(node)
                if node in printed or pod is None or not self.ready(pod) or self._version(pod) != version:
                    continue
                before_name, before_version = seen.get(node, ("-", "-"))
                if before_version == version:
                    continue
                printed.add(node)
                elapsed = time.monotonic() - started
                note(
                    f"{elapsed:5.1f} s  {node}: {before_name} ({before_version}) deleted -> "
                    f"{pod['metadata']['name']} ({version}) Ready"
                )

        return tick

    @staticmethod
    def _version(pod: dict[str, Any]) -> str:
        return pod["spec"]["containers"][0]["image"].rsplit(":", 1)[-1]

    # -- the steps

    def setup(self, step: int) -> None:
        quick = self.env.quick
        say(
            f"{step}. Kubernetes: a simulated cluster of {len(NODES)} nodes runs the agent as a DaemonSet "
            f"(OnDelete), and avika-controller follows the signed manifest"
        )
        self.dir.mkdir(parents=True)
        (self.dir / "updates").mkdir()
        self.release(OLD, 100)
        log = (self.dir / "cdn.log").open("w")
        self.cdn = self.start(
            [PUBLISH, "serve", "--root", str(self.dir / "updates"), "--host", "127.0.0.1", "--port", "0"],
            "avika-publish serve (kube store)",
            stdout=subprocess.PIPE, stderr=log, text=True, env=self.env.env,
        )  # fmt: skip
        assert self.cdn.stdout is not None
        line = self.cdn.stdout.readline()
        if "http://" not in line:
            raise ActError(f"avika-publish serve did not start: {line!r}")
        self.cdn_url = line[line.index("http://") :].split()[0].rstrip("/")
        self.api = FakeApiServer()
        for node in NODES:
            self.api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
                             "status": {"conditions": [{"type": "Ready", "status": "True"}]}})  # fmt: skip
        self.api.create(daemonset())
        self.kubelet = Kubelet(
            self.api, NODES, behaviour=lambda img: CRASHLOOP if img.endswith(f":{BAD}") else READY
        )
        self.kubelet.start()
        self.wait(f"8 pods on {OLD}", lambda: all(v == OLD for v in self.running().values()))
        self.kubelet.down.clear()
        note(
            f"fake API server {self.api.url} (kmock; this script plays the DaemonSet controller and the "
            f"kubelets): DaemonSet {NAMESPACE}/avika-agent, {image(OLD)}, "
            f"a Ready pod on each of {len(NODES)} nodes"
        )
        token = self.publish("enroll", AGENT_ID).stdout.strip()
        kubeconfig = self.api.kubeconfig(self.dir / "kubeconfig", NAMESPACE)
        window = "1s" if quick else "3s"
        env = {k: v for k, v in self.env.env.items() if not k.startswith(("AVIKA_", "UPDATE_"))}
        env.update(
            KUBECONFIG=str(kubeconfig), AVIKA_UPDATE_SERVER=self.cdn_url,
            AVIKA_PUBLIC_KEYS=self.env.public_key,
            AVIKA_CLUSTER_ID=CLUSTER_ID, AVIKA_NAMESPACE=NAMESPACE, AVIKA_IDENTITY="avika-controller-0",
            AVIKA_HEALTH_WINDOW=window, AVIKA_RECONCILE_INTERVAL="1s", AVIKA_LEASE_DURATION="10s",
            AVIKA_STATE_DIR=str(self.dir / "controller-state"), UPDATE_INTERVAL="1s",
            UPDATE_REPORT_URL=self.env.reports_url, UPDATE_REPORT_TOKEN=f"{AGENT_ID}={token}",
        )  # fmt: skip
        with (self.dir / "controller.log").open("ab") as out:
            self.controller = self.start(
                [CONTROLLER, "run"], "avika-controller run", stdout=out, stderr=out, env=env
            )
        self.wait("the controller to take its Lease", lambda: "leading" in self.log_tail(200))
        note(
            f"avika-controller run: cluster id {CLUSTER_ID}, manifest {self.cdn_url}/manifest.json, "
            f"AVIKA_HEALTH_WINDOW={window}, reports as {AGENT_ID} (token from avika-publish enroll); "
            f"log: kube/controller.log"
        )
        print(f"    {'node':<10} {'bucket ' + NEW:>13} {'bucket ' + BAD:>13}")
        for node in NODES:
            print(f"    {node:<10} {rollout_bucket(node, NEW):>13} {rollout_bucket(node, BAD):>13}")
        note("a node is in the wave when fnv1a32(salt + node name) % 100 < percent (the agents' rule)")

    def first_wave(self, step: int) -> list[str]:
        wave = [n for n in NODES if rollout_bucket(n, NEW) < WAVE]
        say(f"{step}. Publish {NEW} at {WAVE} %: the controller moves {', '.join(wave)}, one pod at a time")
        self.release(NEW, WAVE)
        took = self.wait(
            f"the {WAVE} % wave on {NEW}",
            lambda: all(self.running()[n] == NEW for n in wave),
            self.follow_pods(NEW),
        )
        self.wait(f"{NEW} committed", lambda: (self.row() or {}).get("state") == "committed")
        others = [n for n, v in self.running().items() if v == OLD]
        note(f"({took:.1f} s) the other {len(others)} nodes stay on {OLD}; at most "
             f"{max(self.kubelet.down['avika-agent'])} pod was down at any time (avika.io/max-unavailable 1)")  # type: ignore[union-attr]  # fmt: skip
        return wave

    def full_rollout(self, step: int) -> None:
        say(f"{step}. avika-publish rollout 100: the other nodes follow, one at a time")
        self.rollout(100)
        took = self.wait(f"every node on {NEW}", lambda: all(v == NEW for v in self.running().values()),
                         self.follow_pods(NEW))  # fmt: skip
        self.wait(
            f"{NEW} committed again", lambda: sum(e["state"] == "committed" for e in self.events()) >= 2
        )
        note(f"({took:.1f} s) every node runs {NEW}")

    def bad_release(self, step: int) -> str:
        canary = next(n for n in NODES if rollout_bucket(n, BAD) < WAVE)
        say(f"{step}. Publish {BAD} at {WAVE} %: its pod crash-loops on the canary node {canary}")
        self.release(BAD, WAVE)
        started = time.monotonic()

        def rolled_back() -> bool:
            row = self.row() or {}
            return row.get("state") == "rolled_back" and row.get("target_version") == BAD

        self.wait(f"{BAD} rolled back", rolled_back)
        self.wait(f"{canary} back on {NEW}", lambda: all(v == NEW for v in self.running().values()))
        tried = [(node, name) for node, name, img in self.kubelet.created if img == image(BAD)]  # type: ignore[union-attr]
        note(f"({time.monotonic() - started:.1f} s) {', '.join(f'{n}: {p}' for n, p in tried)} ran {BAD}: "
             f"CrashLoopBackOff; the controller put {image(NEW)} back and replaced the pod")  # fmt: skip
        bad = self.state().get("bad") or []
        note(f"state ConfigMap avika-controller-state: bad = {[(b['version'], b['image']) for b in bad]} "
             f"(never applied again in this cluster)")  # fmt: skip
        for line in self.log_tail(200).splitlines():
            if "rollback unhealthy" in line or "recorded as bad" in line:
                note("controller: " + line.split(" controller: ", 1)[-1].split(" (back-off", 1)[0])
        chain = " → ".join(f"{e['state']} {e['target_version'] or ''}".strip() for e in self.events()
                           if e["state"] != "heartbeat")  # fmt: skip
        note(f"{AGENT_ID} reported: {chain}")
        return canary

    def check(self, wave: list[str], canary: str) -> list[str]:
        problems = []
        running = self.running()
        if any(v != NEW for v in running.values()):
            problems.append(f"not every node runs {NEW}: {running}")
        if self.template() != image(NEW):
            problems.append(f"the DaemonSet template is {self.template()}, not {image(NEW)}")
        assert self.kubelet is not None
        if max(self.kubelet.down["avika-agent"]) > 1:
            problems.append("more than one pod was down at once")
        tried = [node for node, _, img in self.kubelet.created if img == image(BAD)]
        if tried != [canary]:
            problems.append(f"{BAD} ran on {tried}, not on the canary {canary} alone")
        if [b["version"] for b in self.state().get("bad") or []] != [BAD]:
            problems.append(f"{BAD} is not recorded as bad")
        if len(wave) != 3:
            problems.append(f"the {WAVE} % wave of {NEW} held {len(wave)} nodes, not 3")
        return problems

    def stop(self) -> None:
        for proc in (self.controller, self.cdn):
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if self.kubelet is not None:
            self.kubelet.stop()
        if self.api is not None:
            self.api.close()
            self.api = None


def daemonset() -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "avika-agent"}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": "avika-agent",
            "namespace": NAMESPACE,
            "labels": {**labels, "avika.io/updates": "enabled"},
            "annotations": {"avika.io/container": "avika-agent", "avika.io/max-unavailable": "1"},
        },
        "spec": {
            "selector": {"matchLabels": labels},
            "updateStrategy": {"type": "OnDelete"},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "avika-agent", "image": image(OLD)}]},
            },
        },
        "status": {
            "currentNumberScheduled": len(NODES),
            "desiredNumberScheduled": len(NODES),
            "numberMisscheduled": 0,
            "numberReady": len(NODES),
        },
    }


STEPS = 5  # narrated steps: set-up, first wave, full rollout, bad release, fleet


def run_act(env: ActEnv, step: int = 1) -> dict[str, Any]:
    """The whole act; raises :class:`ActError` when the story does not happen as told."""
    act = Act(env)
    try:
        act.setup(step)
        wave = act.first_wave(step + 1)
        act.full_rollout(step + 2)
        canary = act.bad_release(step + 3)
        say(f"{step + 4}. The fleet: the workload beside the other agents (avika-publish fleet)")
        act.show_fleet()
        problems = act.check(wave, canary)
        summary = {
            "agent_id": AGENT_ID,
            "first_wave": wave,
            "canary": canary,
            "row": act.row(),
            "events": [e["state"] for e in act.events()],
            "max_down": max(act.kubelet.down["avika-agent"]) if act.kubelet else None,
            "bad": act.state().get("bad"),
            "problems": problems,
        }
        (env.workdir / "kube" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if problems:
            raise ActError("the act did not happen as told:\n" + "\n".join(problems))
        note(
            f"checked: the {WAVE} % wave moved {len(wave)} nodes one at a time, rollout 100 the rest, and "
            f"{BAD} was rolled back on its own on {canary} alone"
        )
        return summary
    finally:
        act.stop()


# ---------------------------------------------------------------- standalone


MARKER = ".avika-kube-demo"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir", type=Path, default=ROOT / "demo-run-kube", help="folder for everything (wiped first)"
    )
    parser.add_argument("--quick", action="store_true", help="shorter health window: for CI")
    args = parser.parse_args(argv)
    workdir: Path = args.dir.resolve()
    if workdir.exists():
        if any(workdir.iterdir()) and not (workdir / MARKER).exists():
            print(
                f"kube_act: refusing to wipe {workdir}: not a demo folder (no {MARKER} in it)",
                file=sys.stderr,
            )
            return 2
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("written by demo/kube_act.py: this folder is wiped at the next run\n")
    started = time.monotonic()
    print(f"Avika Updates, the Kubernetes act: everything under {workdir}, on 127.0.0.1 only.", flush=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AVIKA_", "UPDATE_"))}
    env["AVIKA_FLEET_SECRET"] = secrets.token_hex(24)
    procs: list[subprocess.Popen[Any]] = []

    def start(argv: list[str], role: str, **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, **kwargs)
        procs.append(proc)
        return proc

    code = 0
    try:
        key = workdir / "signing-key.pem"
        out = subprocess.run(
            [PUBLISH, "keygen", "--out", str(key), "--json"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        public_key = json.loads(out.stdout)["public_key"]
        reports_db = workdir / "reports.db"
        (workdir / "reports-only").mkdir()
        server = start(
            [PUBLISH, "serve", "--root", str(workdir / "reports-only"), "--host", "127.0.0.1", "--port", "0",
             "--reports", f"sqlite:///{reports_db}"],
            "reports endpoint",
            stdout=subprocess.PIPE, stderr=(workdir / "serve.log").open("w"), text=True, env=env,
        )  # fmt: skip
        assert server.stdout is not None
        line = server.stdout.readline()
        url = line[line.index("http://") :].split()[0].rstrip("/")
        run_act(
            ActEnv(
                workdir,
                key,
                public_key,
                f"{url}/v1/reports",
                f"sqlite:///{reports_db}",
                env,
                start,
                args.quick,
            ),
            step=1,
        )
    except (ActError, subprocess.CalledProcessError, ValueError) as exc:
        print(f"\nkube_act: error: {exc}", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:
        print("\nkube_act: interrupted", file=sys.stderr, flush=True)
        code = 130
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
    print(f"\nKubernetes act {'finished' if code == 0 else 'FAILED'} in {time.monotonic() - started:.1f} s; "
          f"files are under {workdir}")  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main())
