"""``avika-controller run`` end to end: real processes, the fake API server, the test as kubelet.

The parts: the real publisher (``avika-publish keygen``, ``release``, ``rollout``, ``enroll``) and
``avika-publish serve`` (the store and ``POST /v1/reports`` into SQLite); two replicas of
``avika-controller run`` (processes, kubeconfig pointing at :class:`tests.kube_fake.FakeApiServer`);
the test's :class:`tests.kube_fake.Kubelet`, which replaces every pod the controller deletes with one
on the template's image, Ready or crash-looping as the image dictates.

The story, checked from the cluster, the controller's state ConfigMap and ``avika-publish fleet``:
1.0.0 -> 1.1.0 at 50 % (only in-wave nodes move, one pod at a time, each replacement Ready before
the next), ``rollout 100`` (the rest follow), then 1.2.0, whose pods crash-loop: the canary is rolled
back on its own, 1.2.0 is recorded as bad, and a re-signed 1.2.0 (``rollout 100``) is not applied
again. Only the replica holding the Lease acts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.manifest import rollout_bucket
from infra.reports.store import ReportStore
from tests.controller_fixtures import REGISTRY, Cluster
from tests.kube_fake import CRASHLOOP, READY, FakeApiServer, Kubelet
from tests.test_controller_packaging import request_allowed

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
PUBLISH = str(BIN / "avika-publish")
CONTROLLER = str(BIN / "avika-controller")
NODES = Cluster().node_names
CLUSTER_ID = "e2e"
AGENT_ID = f"k8s/{CLUSTER_ID}/avika/daemonset/avika-agent"
TIMEOUT = 120.0


def image(version: str) -> str:
    return f"{REGISTRY}:{version}"


def wait_for(
    what: str, check: Callable[[], Any], timeout: float = TIMEOUT, logs: Callable[[], str] = str
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{logs()}")
        time.sleep(0.2)


def daemonset() -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "avika-agent"}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": "avika-agent",
            "namespace": "avika",
            "labels": {**labels, "avika.io/updates": "enabled"},
            "annotations": {},
        },
        "spec": {
            "selector": {"matchLabels": labels},
            "updateStrategy": {"type": "OnDelete"},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "avika-agent", "image": image("1.0.0")}]},
            },
        },
        "status": {
            "currentNumberScheduled": len(NODES),
            "desiredNumberScheduled": len(NODES),
            "numberMisscheduled": 0,
            "numberReady": len(NODES),
            "observedGeneration": 1,
        },
    }


@dataclass
class Stack:
    tmp: Path
    api: FakeApiServer
    kubelet: Kubelet
    env: dict[str, str]
    url: str
    procs: list[subprocess.Popen[str]]
    logs: list[Path]

    def publish(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [PUBLISH, *args], capture_output=True, text=True, env=self.env, timeout=120, check=False
        )
        assert done.returncode == 0, f"avika-publish {' '.join(args[:2])}: {done.stderr}{done.stdout}"
        return done

    def signing(self) -> list[str]:
        return ["--key", str(self.tmp / "key.pem"), "--store", str(self.tmp / "store")]

    def release(self, version: str, percent: int) -> None:
        binary = self.tmp / f"avika-agent-{version}"
        binary.write_bytes(f"stand-in for avika-agent {version}\n".encode() * 100)
        self.publish(
            "release", version, "--binary", f"linux-amd64={binary}", "--image", image(version),
            "--init", "--rollout", str(percent), "--reports-url", f"{self.url}/v1/reports", *self.signing(),
            "--no-inspect",  # a stand-in: the cluster runs the image, not this file
        )  # fmt: skip

    def events(self) -> list[dict[str, Any]]:
        """The workload's events as the reports endpoint stored them, in the order it sent them."""
        store = ReportStore.from_url(f"sqlite:///{self.tmp / 'reports.db'}")
        try:
            return sorted(store.agent_events(AGENT_ID), key=lambda e: (e["stream"], e["seq"]))
        finally:
            store.close()

    def fleet(self, *args: str) -> dict[str, Any]:
        return json.loads(
            self.publish("fleet", *args, "--reports", f"sqlite:///{self.tmp / 'reports.db'}", "--json").stdout
        )

    def template_image(self) -> str:
        ds = self.api.get("DaemonSet", "avika", "avika-agent") or {}
        return ds["spec"]["template"]["spec"]["containers"][0]["image"]

    def pods_by_node(self) -> dict[str, dict[str, Any]]:
        return {p["spec"]["nodeName"]: p for p in self.api.list("Pod", "avika")}

    def running(self, node: str) -> str | None:
        """The image the pod on ``node`` runs, when it is Ready."""
        pod = self.pods_by_node().get(node)
        if pod is None:
            return None
        ready = any(
            c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])
        )
        return pod["spec"]["containers"][0]["image"] if ready else None

    def state(self) -> dict[str, Any]:
        cm = self.api.get("ConfigMap", "avika", "avika-controller-state") or {"data": {"state.json": "{}"}}
        return json.loads(cm["data"]["state.json"])

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in self.logs if p.exists())

    def row(self) -> dict[str, Any] | None:
        return next((a for a in self.fleet()["agents"] if a["agent_id"] == AGENT_ID), None)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AVIKA_", "UPDATE_"))}
    env["AVIKA_FLEET_SECRET"] = "e2e-fleet-secret-0123456789abcdef"
    procs: list[subprocess.Popen[str]] = []
    api = FakeApiServer()
    kubelet = Kubelet(api, NODES, behaviour=lambda img: CRASHLOOP if img.endswith(":1.2.0") else READY)
    try:
        keygen = subprocess.run(
            [PUBLISH, "keygen", "--out", str(tmp_path / "key.pem"), "--json"],
            capture_output=True, text=True, env=env, timeout=60, check=True,
        )  # fmt: skip
        public_key = json.loads(keygen.stdout)["public_key"]
        (tmp_path / "store").mkdir()
        serve_log = (tmp_path / "serve.log").open("w")
        server = subprocess.Popen(
            [PUBLISH, "serve", "--root", str(tmp_path / "store"), "--port", "0",
             "--reports", f"sqlite:///{tmp_path / 'reports.db'}"],
            stdout=subprocess.PIPE, stderr=serve_log, text=True, env=env, start_new_session=True,
        )  # fmt: skip
        procs.append(server)
        assert server.stdout is not None
        line = server.stdout.readline()
        url = line[line.index("http://") :].split()[0].rstrip("/")
        stack = Stack(tmp_path, api, kubelet, env, url, procs, [])
        stack.release("1.0.0", 100)
        token = stack.publish("enroll", AGENT_ID).stdout.strip()
        api.create(daemonset())
        for node in Cluster().nodes:
            api.create(node)
        kubelet.start()
        wait_for("8 pods on 1.0.0", lambda: all(stack.running(n) == image("1.0.0") for n in NODES))
        kubelet.down.clear()  # from here on, every pod that goes down is the controller's doing
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        for replica in ("a", "b"):
            log = tmp_path / f"controller-{replica}.log"
            stack.logs.append(log)
            controller_env = {
                **env,
                "KUBECONFIG": str(kubeconfig),
                "AVIKA_UPDATE_SERVER": url,
                "AVIKA_PUBLIC_KEYS": public_key,
                "AVIKA_CLUSTER_ID": CLUSTER_ID,
                "AVIKA_NAMESPACE": "avika",
                "AVIKA_IDENTITY": f"avika-controller-{replica}",
                "AVIKA_HEALTH_WINDOW": "1s",
                "AVIKA_RECONCILE_INTERVAL": "1s",
                "AVIKA_LEASE_DURATION": "10s",
                "AVIKA_STATE_DIR": str(tmp_path / f"state-{replica}"),
                "UPDATE_INTERVAL": "1s",
                "UPDATE_REPORT_TOKEN": f"{AGENT_ID}={token}",
            }
            controller_env.pop("AVIKA_FLEET_SECRET")  # the controller never holds the fleet secret
            with log.open("w") as out:
                procs.append(
                    subprocess.Popen(
                        [CONTROLLER, "run"],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        text=True,
                        env=controller_env,
                        start_new_session=True,
                    )
                )
            if replica == "a":  # a leads: it starts first and holds the Lease before b is up
                wait_for(
                    "replica a to lead", lambda: "leading" in stack.logs[0].read_text(), logs=stack.log_text
                )
        yield stack
    finally:
        kubelet.stop()
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        api.close()


def test_run_takes_a_daemonset_through_waves_and_rolls_a_crash_loop_back(stack: Stack) -> None:
    logs = stack.log_text
    wave = [n for n in NODES if rollout_bucket(n, "1.1.0") < 50]
    assert len(wave) == 4

    # -- 1.1.0 at 50 %: the in-wave nodes move, one pod at a time; the others stay
    stack.release("1.1.0", 50)
    wait_for(
        "the 50 % wave on 1.1.0", lambda: all(stack.running(n) == image("1.1.0") for n in wave), logs=logs
    )
    wait_for(
        "committed 1.1.0 in the fleet", lambda: (stack.row() or {}).get("state") == "committed", logs=logs
    )
    assert all(stack.running(n) == image("1.0.0") for n in NODES if n not in wave)
    assert stack.template_image() == image("1.1.0")
    assert max(stack.kubelet.down["avika-agent"]) == 1, "more than one pod was down at once"

    # -- rollout 100: the other nodes follow
    stack.publish("rollout", "100", *stack.signing())
    wait_for("every node on 1.1.0", lambda: all(stack.running(n) == image("1.1.0") for n in NODES), logs=logs)
    wait_for(
        "committed again after the full wave",
        lambda: sum(e["state"] == "committed" for e in stack.events()) == 2,
        logs=logs,
    )
    assert max(stack.kubelet.down["avika-agent"]) == 1

    # -- 1.2.0 at 25 %: its pods crash-loop; the canary is rolled back on its own
    canaries = [n for n in NODES if rollout_bucket(n, "1.2.0") < 25]
    assert canaries
    stack.release("1.2.0", 25)
    row = wait_for(
        "1.2.0 rolled back",
        lambda: (r := stack.row()) and r["state"] == "rolled_back" and r["target_version"] == "1.2.0" and r,
        logs=logs,
    )
    assert row["version"] == "1.1.0"
    assert row["last_error"].startswith("watching: CrashLoopBackOff: pod avika-agent-")
    # 1.2.0 is recorded as bad in the cluster: a failure to look at, not an update waiting
    assert row["mode"] == "container" and row["update_available"] is False
    wait_for(
        "every node back on 1.1.0", lambda: all(stack.running(n) == image("1.1.0") for n in NODES), logs=logs
    )
    assert stack.template_image() == image("1.1.0")
    bad = stack.state()["bad"]
    assert [(b["version"], b["image"], b["reason"]) for b in bad] == [
        ("1.2.0", image("1.2.0"), "CrashLoopBackOff")
    ]
    tried = [(node, img) for node, _, img in stack.kubelet.created if img == image("1.2.0")]
    assert len(tried) == 1 and tried[0][0] in canaries, "1.2.0 reached more than its first canary"

    # -- the rollback sticks: a re-signed 1.2.0 at 100 % is not applied again
    stack.publish("rollout", "100", *stack.signing())
    serial = json.loads(stack.publish("show", "--store", str(stack.tmp / "store"), "--json").stdout)["serial"]
    wait_for(
        "the controller to verify the re-signed manifest", lambda: stack.state()["highest_serial"] == serial
    )
    time.sleep(3)  # a few more passes at 1 s: none of them may touch the DaemonSet
    assert stack.template_image() == image("1.1.0")
    assert all(stack.running(n) == image("1.1.0") for n in NODES)
    assert len([1 for _, _, img in stack.kubelet.created if img == image("1.2.0")]) == 1

    # -- the fleet shows the workload's history from the controller's reports
    history = [(e["state"], e["target_version"]) for e in stack.events()]
    assert ("committed", "1.1.0") in history and ("rolled_back", "1.2.0") in history
    assert history.index(("restarting", "1.1.0")) < history.index(("committed", "1.1.0"))

    # -- only the replica holding the Lease acted
    a, b = (p.read_text() for p in stack.logs)
    assert "deleted pod" in a and "patch_image" in a
    assert "standing by: Lease avika-controller is held by avika-controller-a" in b
    assert "deleted pod" not in b and "patch_image" not in b
    assert stack.kubelet.errors == []

    # -- RBAC from packaging/kubernetes/ allows every request the controller made, and no more
    made = set(stack.api.requests_by("python-httpx"))
    assert {method for method, _ in made} == {"GET", "POST", "PATCH", "DELETE"}
    assert [r for r in made if not request_allowed(*r)] == []


@pytest.mark.parametrize(
    ("signer_is_trusted", "code"), [(True, 0), (False, 3)], ids=["verified manifest", "untrusted manifest"]
)
def test_run_once_exits_with_the_passes_outcome(tmp_path: Path, signer_is_trusted: bool, code: int) -> None:
    """``run --once``: one pass; a manifest that does not verify is exit 3 with the agent's error code,
    and the cluster is not touched."""
    from agent.manifest import LocalSigner, generate_private_key
    from tests.agent_fixtures import LocalServer
    from tests.controller_fixtures import PUBLIC_KEY, envelope, manifest

    signer = None if signer_is_trusted else LocalSigner(generate_private_key())
    from datetime import UTC, datetime, timedelta

    m = manifest("1.1.0", 100, container_image=image("1.1.0"), expires=datetime.now(UTC) + timedelta(days=1))
    body = envelope(m) if signer is None else envelope(m, signer)
    with FakeApiServer() as api, LocalServer() as server:
        server.serve("/updates/manifest.json", body)
        api.create(daemonset())
        for node in Cluster().nodes:  # an OnDelete DaemonSet is in the wave by its nodes
            api.create(node)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AVIKA_", "UPDATE_"))}
        env.update(
            KUBECONFIG=str(api.kubeconfig(tmp_path / "kubeconfig")),
            AVIKA_UPDATE_SERVER=server.url("/updates"),
            AVIKA_PUBLIC_KEYS=PUBLIC_KEY, AVIKA_CLUSTER_ID="once", AVIKA_NAMESPACE="avika",
            AVIKA_STATE_DIR=str(tmp_path / "state"), UPDATE_REPORT_URL="disabled",
        )  # fmt: skip
        done = subprocess.run(
            [CONTROLLER, "run", "--once"], capture_output=True, text=True, env=env, timeout=120
        )
        image_now = (api.get("DaemonSet", "avika", "avika-agent") or {})["spec"]["template"]["spec"][
            "containers"
        ][0]
    assert done.returncode == code, done.stderr
    if code == 0:
        assert image_now["image"] == image("1.1.0")
        assert "DaemonSet avika/avika-agent: patch_image in_wave" in done.stderr
    else:
        assert image_now["image"] == image("1.0.0")
        assert "refused: signature_invalid" in done.stderr
