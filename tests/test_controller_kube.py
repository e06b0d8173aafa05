"""The Kubernetes adapter over lightkube, against an HTTP fake of the API server (kmock, 127.0.0.1).

No real API server can be installed here (no Docker, kind, k3s or envtest): ``tests/kube_fake.py``
says what the fake does and does not do. The tests are written so its gaps cannot hide a bug:

- it ignores label selectors: the fixtures hold an unmanaged DaemonSet and its pods on the same
  nodes, and the adapter must filter them out itself;
- it keeps no ``resourceVersion``: a concurrent change is made inside the server just before the
  controller's patch, and the patch's ``test`` of the image must refuse it (422 -> ``Conflict``),
  leaving the other writer's image in place;
- a strategic-merge patch would replace whole lists: the DaemonSet has a second container, which
  an image change must leave alone, and every patch must be ``application/json-patch+json``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from controller.changes import image_patch
from controller.config import ReportTokens, load
from controller.kube import Conflict, Forbidden, Gone, KubeError, LightkubeKube
from controller.manifests import ManifestSource
from controller.objects import parse_workload
from controller.plan import ImageChange
from controller.reports import WorkloadReporter
from controller.run import Controller
from controller.state import BadVersion, StateError
from tests.controller_fixtures import PUBLIC_KEY, REGISTRY, Cluster, image
from tests.kube_fake import FakeApiServer


@pytest.fixture(scope="module")
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def cluster(api: FakeApiServer, tmp_path: Path) -> Iterator[Cluster]:
    """The fixture cluster, created in the fake; removed again afterwards."""
    c = Cluster()
    sidecar = {
        "name": "log-tailer",
        "image": "busybox:1.36",
        "args": ["tail", "-F", "/var/log/avika/agent.log"],
    }
    c.workload("avika-agent")["spec"]["template"]["spec"]["containers"].append(sidecar)
    for obj in [*c.workloads, *c.pods, *c.nodes]:
        api.create(copy.deepcopy(obj))
    yield c
    for kind in ("DaemonSet", "Deployment", "StatefulSet", "Pod", "Node", "ConfigMap", "Lease"):
        for obj in api.list(kind):
            meta = obj["metadata"]
            api.delete(kind, meta.get("namespace"), meta["name"])
    assert api.emulator is not None
    api.emulator.faults.clear()
    api.emulator.hooks.clear()


@pytest.fixture
def kube(api: FakeApiServer, tmp_path: Path) -> Iterator[LightkubeKube]:
    client = LightkubeKube.from_kubeconfig(str(api.kubeconfig(tmp_path / "kubeconfig")))
    yield client
    client.close()


def test_lists_are_filtered_by_label_here_whatever_the_server_does(
    api: FakeApiServer, kube: LightkubeKube, cluster: Cluster
) -> None:
    assert len(api.list("DaemonSet")) == 2  # the fake ignores selectors: both come back
    workloads = kube.list_workloads(None)
    assert sorted(w["metadata"]["name"] for w in workloads) == [
        "avika-agent",
        "avika-edge",
        "avika-gateway",
        "avika-relay",
    ]
    assert any("labelSelector=avika.io%2Fupdates%3Denabled" in path for _, path, _, _ in api.seen)
    pods = kube.list_pods(workloads)
    assert len(pods) == 8 + 2 + 2 + 2
    assert not any(p["metadata"]["name"].startswith("fluent-bit") for p in pods)
    assert {w["kind"] for w in workloads} == {"DaemonSet", "Deployment", "StatefulSet"}
    assert len(kube.list_nodes()) == 8  # the fixtures decode with the client's typed models


def test_namespaces_limit_the_lists(kube: LightkubeKube, cluster: Cluster) -> None:
    assert [w["metadata"]["name"] for w in kube.list_workloads(["avika-edge"])] == ["avika-edge"]


def test_an_image_change_is_a_json_patch_that_leaves_other_containers_alone(
    api: FakeApiServer, kube: LightkubeKube, cluster: Cluster
) -> None:
    w = parse_workload(api.get("DaemonSet", "avika", "avika-agent") or {})
    change = ImageChange(
        "DaemonSet", "avika", "avika-agent", "avika-agent", 0, image("1.0.0"), image("1.1.0"),
        {"avika.io/previous-image": image("1.0.0"), "avika.io/version": "1.1.0"}, bool(w.annotations), None,
    )  # fmt: skip
    kube.patch("DaemonSet", "avika", "avika-agent", image_patch(change))
    stored = api.get("DaemonSet", "avika", "avika-agent") or {}
    containers = stored["spec"]["template"]["spec"]["containers"]
    assert [c["image"] for c in containers] == [image("1.1.0"), "busybox:1.36"]
    assert containers[1]["args"] == ["tail", "-F", "/var/log/avika/agent.log"]
    annotations = stored["metadata"]["annotations"]
    assert annotations["avika.io/previous-image"] == image("1.0.0")
    assert annotations["deprecated.daemonset.template.generation"] == "4"  # kept, not replaced
    assert api.patches[-1] == (
        "/apis/apps/v1/namespaces/avika/daemonsets/avika-agent",
        "application/json-patch+json",
    )


def test_a_concurrent_image_change_is_never_overwritten(
    api: FakeApiServer, kube: LightkubeKube, cluster: Cluster
) -> None:
    def someone_else(obj: dict[str, Any]) -> None:  # kubectl set image, between our read and our patch
        obj["spec"]["template"]["spec"]["containers"][0]["image"] = f"{REGISTRY}:1.0.1-hotfix"

    change = ImageChange(
        "DaemonSet", "avika", "avika-agent", "avika-agent", 0, image("1.0.0"), image("1.1.0"), {}, True, None
    )
    api.before("PATCH", "DaemonSet", someone_else)
    with pytest.raises(Conflict) as refused:
        kube.patch("DaemonSet", "avika", "avika-agent", image_patch(change))
    assert refused.value.status == 422
    stored = api.get("DaemonSet", "avika", "avika-agent") or {}
    assert stored["spec"]["template"]["spec"]["containers"][0]["image"] == f"{REGISTRY}:1.0.1-hotfix"


def test_a_container_moved_to_another_index_is_never_patched(
    api: FakeApiServer, kube: LightkubeKube, cluster: Cluster
) -> None:
    api.json_patch(
        "DaemonSet", "avika", "avika-agent",
        [{"op": "move", "from": "/spec/template/spec/containers/1",
          "path": "/spec/template/spec/containers/0"}],
    )  # fmt: skip
    change = ImageChange(
        "DaemonSet", "avika", "avika-agent", "avika-agent", 0, image("1.0.0"), image("1.1.0"), {}, True, None
    )
    with pytest.raises(Conflict):
        kube.patch("DaemonSet", "avika", "avika-agent", image_patch(change))
    images = [
        c["image"]
        for c in (api.get("DaemonSet", "avika", "avika-agent") or {})["spec"]["template"]["spec"][
            "containers"
        ]
    ]
    assert images == ["busybox:1.36", image("1.0.0")]


def test_an_expired_list_is_read_again(api: FakeApiServer, kube: LightkubeKube, cluster: Cluster) -> None:
    api.fail("GET", "Pod", 410, times=2)
    assert len(kube.list("Pod", "avika", {"app.kubernetes.io/name": "avika-agent"})) == 8
    api.fail("GET", "Pod", 410, times=3)
    with pytest.raises(Gone):
        kube.list("Pod", "avika")


def test_errors_are_mapped_by_status(api: FakeApiServer, kube: LightkubeKube, cluster: Cluster) -> None:
    assert kube.get("Lease", "avika", "missing") is None
    assert kube.delete("Pod", "avika", "missing") is False
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "x", "namespace": "avika"},
    }
    kube.create("Lease", lease)
    with pytest.raises(Conflict):
        kube.create("Lease", lease)
    api.fail("PATCH", "DaemonSet", 500)
    with pytest.raises(KubeError) as failed:
        kube.patch(
            "DaemonSet", "avika", "avika-agent", [{"op": "test", "path": "/kind", "value": "DaemonSet"}]
        )
    assert failed.value.status == 500 and not isinstance(failed.value, Conflict)
    api.fail("GET", "Node", 403)
    with pytest.raises(Forbidden):
        kube.list("Node")
    api.fail("GET", "Node", 403)
    assert kube.list_nodes() == []  # without RBAC for nodes: readiness unknown, not a failure


def test_an_unreachable_api_server_is_a_kube_error(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "x",
        "clusters": [{"name": "x", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "x", "user": {}}],
        "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}],
    }))  # fmt: skip
    client = LightkubeKube.from_kubeconfig(str(path))
    with pytest.raises(KubeError) as failed:
        client.list("Pod", "avika")
    assert failed.value.status is None


# ---------------------------------------------------------------- Lease and state, through the runner


def controller(kube: LightkubeKube, tmp_path: Path, identity: str, clock: list[datetime]) -> Controller:
    env = {
        "AVIKA_UPDATE_SERVER": "http://127.0.0.1:9/updates",
        "AVIKA_CLUSTER_ID": "prod-eu",
        "AVIKA_PUBLIC_KEYS": PUBLIC_KEY,
        "AVIKA_NAMESPACE": "avika",
        "AVIKA_IDENTITY": identity,
        "AVIKA_LEASE_DURATION": "30s",
        "AVIKA_STATE_DIR": str(tmp_path / identity),
    }
    cfg = load(env)
    source = ManifestSource(cfg.manifest_url, cfg.public_keys)
    reporter = WorkloadReporter(cfg.state_dir, ReportTokens(), "disabled")
    return Controller(cfg, kube, source, reporter, clock=lambda: clock[0])


def test_one_replica_holds_the_lease_and_another_takes_it_when_it_goes_silent(
    api: FakeApiServer, kube: LightkubeKube, cluster: Cluster, tmp_path: Path
) -> None:
    clock = [datetime(2026, 3, 1, 12, 0, tzinfo=UTC)]
    a, b = controller(kube, tmp_path, "replica-a", clock), controller(kube, tmp_path, "replica-b", clock)
    assert a.hold_lease(clock[0]) is True
    assert b.hold_lease(clock[0]) is False
    clock[0] += timedelta(seconds=20)
    assert a.hold_lease(clock[0]) is True  # renewed
    clock[0] += timedelta(seconds=29)
    assert b.hold_lease(clock[0]) is False  # renewed 29 s ago: still a's
    clock[0] += timedelta(seconds=2)
    assert b.hold_lease(clock[0]) is True  # a went silent for 31 s > 30 s
    lease = api.get("Lease", "avika", "avika-controller") or {}
    assert lease["spec"]["holderIdentity"] == "replica-b" and lease["spec"]["leaseTransitions"] == 1
    assert a.hold_lease(clock[0]) is False  # a comes back: it does not act
    assert a.leader is False and b.leader is True
    b.release_lease()
    assert (api.get("Lease", "avika", "avika-controller") or {})["spec"]["holderIdentity"] == ""
    assert a.hold_lease(clock[0]) is True  # released: taken at once


def test_two_replicas_racing_for_an_expired_lease_cannot_both_win(
    api: FakeApiServer, kube: LightkubeKube, cluster: Cluster, tmp_path: Path
) -> None:
    clock = [datetime(2026, 3, 1, 12, 0, tzinfo=UTC)]
    a = controller(kube, tmp_path, "replica-a", clock)
    old = controller(kube, tmp_path, "replica-old", clock)
    assert old.hold_lease(clock[0])
    clock[0] += timedelta(minutes=5)

    def b_takes_it_first(obj: dict[str, Any]) -> None:  # b's patch lands between a's read and a's write
        obj["spec"].update(holderIdentity="replica-b", renewTime="2026-03-01T12:05:00.000000Z")

    api.before("PATCH", "Lease", b_takes_it_first)
    assert a.hold_lease(clock[0]) is False
    assert (api.get("Lease", "avika", "avika-controller") or {})["spec"]["holderIdentity"] == "replica-b"


def test_state_writes_never_lose_a_concurrent_writer(
    api: FakeApiServer, kube: LightkubeKube, cluster: Cluster, tmp_path: Path
) -> None:
    clock = [datetime(2026, 3, 1, 12, 0, tzinfo=UTC)]
    a = controller(kube, tmp_path, "replica-a", clock)
    first = BadVersion(
        "1.2.0", image("1.2.0"), "k8s/prod-eu/avika/daemonset/avika-agent", "CrashLoopBackOff", "t"
    )
    a.save_state(lambda s: s.with_bad(first))

    def other(obj: dict[str, Any]) -> None:  # another writer records its own bad version first
        doc = json.loads(obj["data"]["state.json"])
        doc["bad"].append(
            {"version": "1.3.0", "image": image("1.3.0"), "workload": "x", "reason": "r", "time": "t"}
        )
        obj["data"]["state.json"] = json.dumps(doc)

    api.before("PATCH", "ConfigMap", other)
    second = BadVersion(
        "1.2.1", image("1.2.1"), "k8s/prod-eu/avika/daemonset/avika-agent", "ImagePullBackOff", "t"
    )
    a.save_state(lambda s: s.with_trust(9, "f" * 64).with_bad(second))
    _, state = a.read_state()
    assert [b.version for b in state.bad] == ["1.2.0", "1.3.0", "1.2.1"]
    assert state.highest_serial == 9


def test_an_unreadable_state_configmap_stops_the_pass(
    api: FakeApiServer, kube: LightkubeKube, cluster: Cluster, tmp_path: Path
) -> None:
    api.create({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "avika-controller-state", "namespace": "avika"},
        "data": {"state.json": "{not json"},
    })  # fmt: skip
    clock = [datetime(2026, 3, 1, 12, 0, tzinfo=UTC)]
    a = controller(kube, tmp_path, "replica-a", clock)
    with pytest.raises(StateError):
        a.read_state()
    assert a.step() == "failed"
    assert (api.get("ConfigMap", "avika", "avika-controller-state") or {})["data"][
        "state.json"
    ] == "{not json"
