"""``packaging/kubernetes/``: every manifest against the Kubernetes OpenAPI schemas (offline, with
``kubernetes-validate``, strict: an unknown or misspelt field fails), the kustomize base complete, the
Deployment locked down, and RBAC no wider than the controller's own requests.

The request side of that last check is real traffic: :func:`allowed` is also applied, in
``tests/test_controller_run.py``, to every request ``avika-controller run`` made to the fake API
server, so the Role and ClusterRole are shown to be sufficient as well as narrow.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controller.plan import Settings, reconcile
from controller.state import ControllerState
from tests.controller_fixtures import NOW, manifest

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "packaging" / "kubernetes"
BASE = KUBE / "base"
# The oldest Kubernetes still in common support, and the newest the validator knows.
VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


MANIFESTS = sorted(p for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml")


def objects() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in documents(path)]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(KUBE)))
def test_every_manifest_validates_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    for doc in documents(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_catches_a_misspelt_field() -> None:
    """The check above can fail: strict mode refuses a field the schema does not know."""
    deployment = next(d for d in documents(BASE / "deployment.yaml") if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_the_kustomize_base_lists_every_file_and_only_existing_ones() -> None:
    kustomization = documents(BASE / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == on_disk
    assert kustomization["namespace"] == "avika"
    for path in on_disk:
        for doc in documents(BASE / path):
            assert doc["metadata"].get("namespace", "avika") == "avika"


def test_the_deployment_is_locked_down() -> None:
    deployment = next(d for d in documents(BASE / "deployment.yaml") if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(container["resources"]["limits"]) == {"cpu", "memory"}
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/var/lib/avika-controller", "/tmp"} <= mounts  # the only writable paths
    assert deployment["spec"]["replicas"] >= 2  # one acts, one stands by (the Lease)


def rules() -> list[tuple[str | None, dict[str, Any]]]:
    """(namespace or None for cluster-wide, rule) for every rule bound to the controller's account."""
    docs = objects()
    bound = {
        (d["roleRef"]["kind"], d["roleRef"]["name"], d["metadata"].get("namespace"))
        for d in docs
        if d["kind"] in ("RoleBinding", "ClusterRoleBinding")
        and any(s["kind"] == "ServiceAccount" and s["name"] == "avika-controller" for s in d["subjects"])
    }
    out = []
    for d in docs:
        if d["kind"] == "ClusterRole" and ("ClusterRole", d["metadata"]["name"], None) in bound:
            out += [(None, r) for r in d["rules"]]
        if d["kind"] == "Role" and ("Role", d["metadata"]["name"], d["metadata"]["namespace"]) in bound:
            out += [(d["metadata"]["namespace"], r) for r in d["rules"]]
    return out


def allowed(verb: str, group: str, resource: str, namespace: str | None, name: str | None) -> bool:
    for scope, rule in rules():
        if scope is not None and scope != namespace:
            continue
        named = not rule.get("resourceNames") or name in rule["resourceNames"]
        if group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"] and named:
            return True
    return False


_PATH = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)(?:/namespaces/(?P<ns>[^/]+))?/(?P<res>[^/?]+)(?:/(?P<name>[^/?]+))?"
)


def request_allowed(method: str, path: str) -> bool:
    """Would RBAC let the controller's account make this request? (GET without a name is list.)"""
    m = _PATH.match(path)
    assert m, path
    group, ns, res, name = m.group("group") or "", m.group("ns"), m.group("res"), m.group("name")
    verb = {"GET": "get" if name else "list", "POST": "create", "PATCH": "patch", "DELETE": "delete"}[method]
    return allowed(verb, group, res, ns, name)


def test_rbac_is_least_privilege() -> None:
    grants = set()
    for scope, rule in rules():
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                for verb in rule["verbs"]:
                    grants.add((scope, group, res, verb, tuple(rule.get("resourceNames", ()))))
    workloads = {(None, "apps", r, v, ()) for r in ("daemonsets", "deployments", "statefulsets")
                 for v in ("get", "list", "watch", "patch")}  # fmt: skip
    pods = {(None, "", "pods", v, ()) for v in ("get", "list", "watch", "delete")}
    nodes = {(None, "", "nodes", v, ()) for v in ("get", "list", "watch")}
    own = {
        ("avika", "coordination.k8s.io", "leases", "create", ()),
        ("avika", "coordination.k8s.io", "leases", "get", ("avika-controller",)),
        ("avika", "coordination.k8s.io", "leases", "patch", ("avika-controller",)),
        ("avika", "", "configmaps", "create", ()),
        ("avika", "", "configmaps", "get", ("avika-controller-state",)),
        ("avika", "", "configmaps", "patch", ("avika-controller-state",)),
    }
    assert grants == workloads | pods | nodes | own
    assert not allowed("delete", "apps", "daemonsets", "avika", "avika-agent")
    assert not allowed("patch", "", "configmaps", "kube-system", "coredns")
    assert not allowed("get", "", "secrets", "avika", "anything")


def test_the_example_agent_daemonset_is_one_the_controller_rolls_per_node() -> None:
    ds = next(d for d in documents(KUBE / "examples" / "agent-daemonset.yaml") if d["kind"] == "DaemonSet")
    assert ds["spec"]["updateStrategy"]["type"] == "OnDelete"
    ds["status"] = {"desiredNumberScheduled": 3}
    m = manifest("0.1.45", 100, container_image="hellodk/avika-agent:0.1.45")
    nodes = [{"kind": "Node", "metadata": {"name": f"node-{i}"}} for i in range(3)]
    plan = reconcile(m, [ds], [], nodes, ControllerState(), Settings("prod-eu"), NOW)
    (wp,) = plan.workloads
    assert (wp.action.action, wp.action.reason) == ("patch_image", "in_wave")
    assert wp.workload.on_delete and wp.workload.version_of(wp.workload.image) == "0.1.44"


def test_the_dockerfile_runs_the_controller_as_a_user() -> None:
    text = (KUBE / "Dockerfile").read_text()
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert 'ENTRYPOINT ["avika-controller"]' in text
    assert "PUBLIC_KEYS" in text and "no container engine" in text


def test_docs_name_every_variable_the_controller_reads_and_cite_real_tests() -> None:
    """docs/kubernetes.md's configuration table is the controller's (one definition: config.py)."""
    source = (ROOT / "controller" / "config.py").read_text()
    read = set(re.findall(r'"((?:AVIKA|UPDATE)_[A-Z_]+)"', source)) - {"AVIKA_FLEET_SECRET"}
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    table = set(re.findall(r"^\| `((?:AVIKA|UPDATE)_[A-Z_]+)`", docs, re.M))
    table |= set(re.findall(r"^\| `AVIKA_LEASE_NAME` / `(AVIKA_LEASE_DURATION)`", docs, re.M))
    assert read == table
    for filename, name in re.findall(r"tests/(test_\w+\.py)::(\w+)", docs):
        assert f"def {name}(" in (ROOT / "tests" / filename).read_text(), f"{filename}::{name}"
