"""The reconcile core on data (DESIGN section 10), a table of cases like ``tests/test_decide.py``.

Rules checked here:
- an ``OnDelete`` DaemonSet is staged per node: a node is in the wave when
  ``fnv1a32(salt + node) % 100 < percent``; the template moves first, then pods on in-wave nodes,
  at most ``avika.io/max-unavailable`` down at a time (a pod not Ready, terminating or not yet
  replaced counts as down; a pod already down is replaced at no cost);
- any other workload moves whole when ``fnv1a32(salt + cluster/namespace/name) % 100 < percent``;
- percent 0 halts: nothing new starts, moved pods stay, a rollback still happens;
- a new pod in CrashLoopBackOff or ImagePullBackOff, stuck not Ready past the progress deadline, or
  a Deployment past its own deadline rolls back to ``avika.io/previous-image`` and records
  (version, image) as bad; a bad pair is never applied again (re-signs included) unless the
  manifest names another image (digest);
- GitOps/Helm-managed workloads are reported with the change to make in git, unless annotated
  ``avika.io/allow-patch: "true"``;
- images are pinned by digest when the manifest has one;
- only workloads labelled ``avika.io/updates=enabled`` are touched, and only pods matching their
  selectors (the fixtures hold another DaemonSet's pods on the same nodes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.manifest import rollout_bucket
from controller.objects import pinned_image, workload_agent_id
from controller.plan import Plan, Settings, reconcile
from controller.state import BadVersion, ControllerState, Reported
from tests.controller_fixtures import CLUSTER, NOW, Cluster, image, in_wave_nodes, manifest

DIGEST = "sha256:" + "d" * 64
NODES = Cluster().node_names
WAVE_50 = in_wave_nodes(NODES, "1.1.0", 50)  # 4 of the 8 nodes (buckets 26, 33, 44, 46)
CANARIES = in_wave_nodes(NODES, "1.2.0", 25)  # 3 nodes (buckets 13, 17, 22)
AGENT_DS = workload_agent_id(CLUSTER, "avika", "DaemonSet", "avika-agent")


def plan_for(cluster: Cluster, state: ControllerState | None = None, **manifest_args: Any) -> Plan:
    workloads, pods, nodes = cluster.as_lists()
    state = state or ControllerState()
    return reconcile(
        manifest(**manifest_args), workloads, pods, nodes, state, Settings(CLUSTER, 300, 600), NOW
    )


def workload_action(plan: Plan, name: str) -> tuple[str, str]:
    wp = next(wp for wp in plan.workloads if wp.workload.name == name)
    return wp.action.action, wp.action.reason


def pod_counts(plan: Plan, name: str) -> dict[str, int]:
    wp = next(wp for wp in plan.workloads if wp.workload.name == name)
    return dict(Counter(f"{a.action}/{a.reason}" for a in wp.pods))


def status_of(plan: Plan, name: str) -> str | None:
    wp = next(wp for wp in plan.workloads if wp.workload.name == name)
    return wp.status.state if wp.status else None


def moved(cluster: Cluster, nodes: list[str], version: str, **kw: Any) -> None:
    for node in nodes:
        cluster.set_pod(cluster.pod_on("avika-agent", node), img=image(version), **kw)


def bad(version: str, img: str) -> ControllerState:
    return ControllerState(
        highest_serial=7, bad=(BadVersion(version, img, AGENT_DS, "CrashLoopBackOff", "t"),)
    )


@dataclass(frozen=True)
class Case:
    setup: Callable[[Cluster], Any] = lambda c: None
    args: dict[str, Any] = field(default_factory=dict)
    state: ControllerState = field(default_factory=ControllerState)
    workload: str = "avika-agent"
    expect: tuple[str, str] = ("none", "up_to_date")
    pods: dict[str, int] | None = None
    status: str | None = "any"


def on_target(c: Cluster, previous: str = "1.0.0", version: str = "1.1.0") -> None:
    c.set_template("avika-agent", image(version), previous=image(previous))


CASES = [
    # -- a DaemonSet with OnDelete, staged per node
    pytest.param(
        Case(
            args={"percent": 50},
            expect=("patch_image", "in_wave"),
            pods={"delete_pod/in_wave": 1, "none/wave_full": 3, "none/not_in_wave": 4},
            status="restarting",
        ),
        id="the template moves first and one in-wave pod goes with it",
    ),
    pytest.param(
        Case(
            args={"percent": 25},
            expect=("none", "not_in_wave"),
            pods={"none/up_to_date": 8},
            status="update_available",
        ),
        id="no node in the wave: nothing moves, update_available is reported",
    ),
    pytest.param(
        Case(
            args={"percent": 100},
            expect=("patch_image", "in_wave"),
            pods={"delete_pod/in_wave": 1, "none/wave_full": 7},
        ),
        id="percent 100 takes every node, still one at a time",
    ),
    pytest.param(
        Case(
            setup=lambda c: c.set_annotation("avika-agent", "avika.io/max-unavailable", "3"),
            args={"percent": 100},
            expect=("patch_image", "in_wave"),
            pods={"delete_pod/in_wave": 3, "none/wave_full": 5},
        ),
        id="max-unavailable 3 deletes three pods at once",
    ),
    pytest.param(
        Case(
            setup=lambda c: c.set_annotation("avika-agent", "avika.io/max-unavailable", "50%"),
            args={"percent": 100},
            expect=("patch_image", "in_wave"),
            pods={"delete_pod/in_wave": 4, "none/wave_full": 4},
        ),
        id="max-unavailable 50% of 8 pods is 4",
    ),
    pytest.param(
        Case(
            setup=lambda c: (on_target(c), moved(c, WAVE_50[:1], "1.1.0", state="creating")),
            args={"percent": 50},
            expect=("none", "rolling"),
            pods={"none/starting": 1, "none/wave_full": 3, "none/not_in_wave": 4},
            status="restarting",
        ),
        id="a replacement not yet Ready holds the next pod back",
    ),
    pytest.param(
        Case(
            setup=lambda c: (on_target(c), c.remove_pod(c.pod_on("avika-agent", WAVE_50[0]))),
            args={"percent": 50},
            expect=("none", "rolling"),
            pods={"none/wave_full": 3, "none/not_in_wave": 4},
        ),
        id="a deleted pod not yet replaced counts as down",
    ),
    pytest.param(
        Case(
            setup=lambda c: (on_target(c), moved(c, WAVE_50[:1], "1.1.0")),
            args={"percent": 50},
            expect=("none", "rolling"),
            pods={"none/up_to_date": 1, "delete_pod/in_wave": 1, "none/wave_full": 2, "none/not_in_wave": 4},
        ),
        id="once the replacement is Ready the next in-wave pod goes",
    ),
    pytest.param(
        Case(
            setup=lambda c: (on_target(c), c.set_pod(c.pod_on("avika-agent", WAVE_50[1]), state="notready")),
            args={"percent": 50},
            expect=("none", "rolling"),
            pods={"delete_pod/in_wave": 1, "none/wave_full": 3, "none/not_in_wave": 4},
        ),
        id="an in-wave pod that is down already is replaced at no cost, and uses up the budget",
    ),
    pytest.param(
        Case(
            setup=lambda c: (
                on_target(c),
                c.set_pod(c.pod_on("avika-agent", WAVE_50[0]), state="terminating"),
            ),
            args={"percent": 50},
            expect=("none", "rolling"),
            pods={"none/terminating": 1, "none/wave_full": 3, "none/not_in_wave": 4},
        ),
        id="a terminating pod counts as down",
    ),
    pytest.param(
        Case(
            setup=lambda c: (on_target(c), c.set_node_ready(WAVE_50[0], False)),
            args={"percent": 50},
            expect=("none", "rolling"),
            pods={
                "none/node_not_ready": 1,
                "delete_pod/in_wave": 1,
                "none/wave_full": 2,
                "none/not_in_wave": 4,
            },
        ),
        id="a pod on a NotReady node is not deleted (its replacement could not start)",
    ),
    pytest.param(
        Case(
            setup=lambda c: (on_target(c), moved(c, WAVE_50, "1.1.0", started=NOW - timedelta(minutes=1))),
            args={"percent": 50},
            expect=("none", "watching"),
            pods={"none/watching": 4, "none/not_in_wave": 4},
            status="watching",
        ),
        id="every in-wave pod Ready but inside the health window: watching",
    ),
    pytest.param(
        Case(
            setup=lambda c: (on_target(c), moved(c, WAVE_50, "1.1.0")),
            args={"percent": 50},
            state=ControllerState(reported={AGENT_DS: Reported("watching", "1.1.0", "1.1.0")}),
            expect=("none", "up_to_date"),
            pods={"none/up_to_date": 4, "none/not_in_wave": 4},
            status="committed",
        ),
        id="healthy past the window after our rollout: committed",
    ),
    pytest.param(
        Case(
            setup=lambda c: (on_target(c), moved(c, WAVE_50, "1.1.0")),
            args={"percent": 50},
            expect=("none", "up_to_date"),
            status=None,
        ),
        id="already on the release when the controller came: nothing to commit",
    ),
    # -- halt
    pytest.param(
        Case(args={"percent": 0}, expect=("none", "halted"), pods={"none/up_to_date": 8}, status=None),
        id="percent 0 halts: nothing starts, nothing is reported available",
    ),
    pytest.param(
        Case(
            setup=lambda c: (on_target(c), moved(c, WAVE_50[:2], "1.1.0")),
            args={"percent": 0},
            expect=("none", "halted"),
            pods={"none/up_to_date": 2, "none/halted": 6},
        ),
        id="halted mid-wave: moved pods stay, no other pod goes",
    ),
    pytest.param(
        Case(
            setup=lambda c: (on_target(c), moved(c, WAVE_50[:1], "1.1.0", state="crashloop")),
            args={"percent": 0},
            expect=("rollback", "unhealthy"),
            status="rolled_back",
        ),
        id="halted, a crash loop is still rolled back (halt is not a health gate)",
    ),
    # -- the health gate
    pytest.param(
        Case(
            setup=lambda c: (on_target(c), moved(c, WAVE_50[:1], "1.1.0", state="crashloop")),
            args={"percent": 50},
            expect=("rollback", "unhealthy"),
            pods={"delete_pod/rollback": 1, "none/up_to_date": 7},
            status="rolled_back",
        ),
        id="CrashLoopBackOff rolls back to the previous image and replaces the crashing pod",
    ),
    pytest.param(
        Case(
            setup=lambda c: (on_target(c), moved(c, WAVE_50[:1], "1.1.0", state="imagepull")),
            args={"percent": 50},
            expect=("rollback", "unhealthy"),
            status="rolled_back",
        ),
        id="ImagePullBackOff rolls back",
    ),
    pytest.param(
        Case(
            setup=lambda c: (
                on_target(c),
                moved(c, WAVE_50[:1], "1.1.0", state="creating", created=NOW - timedelta(minutes=11)),
            ),
            args={"percent": 50},
            expect=("rollback", "unhealthy"),
        ),
        id="a new pod not Ready 10 minutes after creation rolls back",
    ),
    pytest.param(
        Case(
            setup=lambda c: (
                c.set_template("avika-agent", image("1.1.0")),
                moved(c, WAVE_50[:1], "1.1.0", state="crashloop"),
            ),
            args={"percent": 50},
            expect=("none", "unhealthy"),
            status="failed",
        ),
        id="no previous image recorded: nothing to roll back to, reported failed",
    ),
    pytest.param(
        Case(
            setup=lambda c: (
                c.set_template("avika-agent", image("1.0.0"), previous=image("0.9.0")),
                moved(c, WAVE_50[:2], "1.1.0", state="crashloop"),
            ),
            state=bad("1.1.0", image("1.1.0")),
            args={"percent": 0},
            expect=("none", "halted"),
            pods={"delete_pod/rollback": 2, "none/up_to_date": 6},
        ),
        id="after a rollback, pods still on the bad image go back to the template, even halted",
    ),
    # -- the rollback that sticks
    pytest.param(
        Case(
            state=bad("1.1.0", image("1.1.0")),
            args={"percent": 100},
            expect=("none", "bad_version"),
            pods={"none/up_to_date": 8},
            status=None,
        ),
        id="a version rolled back in this cluster is never applied again",
    ),
    pytest.param(
        Case(
            state=bad("1.1.0", image("1.1.0")),
            args={"percent": 100, "serial": 12},
            expect=("none", "bad_version"),
        ),
        id="a re-signed manifest (new serial, same image) does not clear it",
    ),
    pytest.param(
        Case(
            state=bad("1.1.0", image("1.1.0")),
            args={"percent": 100, "digest": DIGEST},
            expect=("patch_image", "in_wave"),
        ),
        id="the same version with another image (a digest) is a new candidate",
    ),
    pytest.param(
        Case(
            setup=lambda c: (on_target(c), moved(c, WAVE_50[:1], "1.1.0")),
            state=bad("1.1.0", image("1.1.0")),
            args={"percent": 50},
            expect=("none", "bad_version"),
            pods={"none/up_to_date": 1, "none/bad_version": 7},
        ),
        id="someone put the bad image back: nothing more moves to it",
    ),
    # -- whole workloads, by the cluster bucket
    pytest.param(
        Case(
            workload="avika-gateway",
            args={"percent": 53},
            expect=("patch_image", "in_wave"),
            pods={"none/rolling": 2},
            status="restarting",
        ),
        id="a Deployment moves whole when its cluster bucket (52) is in the wave",
    ),
    pytest.param(
        Case(
            workload="avika-gateway",
            args={"percent": 52},
            expect=("none", "not_in_wave"),
            status="update_available",
        ),
        id="a Deployment whose bucket equals the percent waits",
    ),
    pytest.param(
        Case(
            workload="avika-gateway",
            setup=lambda c: (
                c.set_template("avika-gateway", image("1.1.0"), previous=image("1.0.0")),
                c.workload("avika-gateway")["status"]["conditions"].append(
                    {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
                ),
            ),
            args={"percent": 100},
            expect=("rollback", "unhealthy"),
        ),
        id="a Deployment past its progress deadline rolls back",
    ),
    pytest.param(
        Case(
            workload="avika-edge",
            setup=lambda c: c.workload("avika-edge")["spec"].update(updateStrategy={"type": "OnDelete"}),
            args={"percent": 100},
            expect=("patch_image", "in_wave"),
            pods={"delete_pod/in_wave": 1, "none/wave_full": 1},
        ),
        id="a StatefulSet with OnDelete has its pods replaced one at a time",
    ),
    # -- who else manages the workload
    pytest.param(
        Case(
            workload="avika-relay",
            args={"percent": 100},
            expect=("report_only", "gitops_managed"),
            pods={"none/up_to_date": 2},
            status="update_available",
        ),
        id="Argo CD manages it: report the change to make in git, patch nothing",
    ),
    pytest.param(
        Case(
            workload="avika-relay",
            setup=lambda c: c.set_annotation("avika-relay", "avika.io/allow-patch", "true"),
            args={"percent": 100},
            expect=("patch_image", "in_wave"),
        ),
        id="avika.io/allow-patch lets it be patched",
    ),
    pytest.param(
        Case(
            workload="avika-edge",
            setup=lambda c: c.set_annotation("avika-edge", "avika.io/allow-patch", None),
            args={"percent": 100},
            expect=("report_only", "gitops_managed"),
        ),
        id="Helm (app.kubernetes.io/managed-by) manages it",
    ),
    pytest.param(
        Case(
            workload="avika-gateway",
            setup=lambda c: c.set_label("avika-gateway", "kustomize.toolkit.fluxcd.io/name", "avika"),
            args={"percent": 100},
            expect=("report_only", "gitops_managed"),
        ),
        id="Flux manages it",
    ),
    pytest.param(
        Case(
            workload="avika-relay",
            setup=lambda c: (
                c.set_template("avika-relay", image("1.1.0"), previous=image("1.0.0")),
                c.set_pod(c.pods_of("avika-relay")[0], img=image("1.1.0"), state="crashloop"),
            ),
            args={"percent": 100},
            expect=("report_only", "unhealthy"),
            status="failed",
        ),
        id="a GitOps-managed workload that crash-loops is reported (revert in git), not patched",
    ),
    pytest.param(
        Case(
            setup=lambda c: (
                on_target(c),
                c.set_label("avika-agent", "argocd.argoproj.io/instance", "avika"),
            ),
            args={"percent": 50},
            expect=("none", "rolling"),
            pods={"delete_pod/in_wave": 1, "none/wave_full": 3, "none/not_in_wave": 4},
        ),
        id="git changed a GitOps-managed OnDelete DaemonSet: its pods are still staged per node",
    ),
    # -- versions
    pytest.param(
        Case(args={"version": "1.0.0"}, expect=("none", "up_to_date")), id="the same version is up to date"
    ),
    pytest.param(
        Case(args={"version": "0.9.0"}, expect=("none", "older_than_running")),
        id="an older version without downgrade is ignored",
    ),
    pytest.param(
        Case(args={"version": "0.9.0", "downgrade": True}, expect=("patch_image", "in_wave")),
        id="a signed downgrade moves in waves",
    ),
    pytest.param(
        Case(
            args={"percent": 0, "min_version": "1.0.5"},
            expect=("patch_image", "below_min_version"),
            pods={"delete_pod/in_wave": 1, "none/wave_full": 7},
        ),
        id="min_version forces a workload below it past the halt and the wave",
    ),
    pytest.param(
        Case(args={"container_image": None}, expect=("none", "no_container_image"), status=None),
        id="a manifest without container_image moves nothing",
    ),
    pytest.param(
        Case(
            setup=lambda c: c.set_annotation("avika-agent", "avika.io/container", "sidecar"),
            expect=("none", "invalid_workload"),
            status=None,
        ),
        id="the annotated container is not in the template",
    ),
    pytest.param(
        Case(
            setup=lambda c: c.set_annotation("avika-agent", "avika.io/max-unavailable", "0"),
            expect=("none", "invalid_workload"),
        ),
        id="max-unavailable 0 is refused",
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_plan(case: Case) -> None:
    cluster = Cluster()
    case.setup(cluster)
    result = plan_for(cluster, case.state, **case.args)
    assert workload_action(result, case.workload) == case.expect
    if case.pods is not None:
        assert pod_counts(result, case.workload) == case.pods
    if case.status != "any":
        assert status_of(result, case.workload) == case.status


def test_in_wave_nodes_are_exactly_those_whose_bucket_is_below_the_percent() -> None:
    cluster = Cluster()
    cluster.set_annotation("avika-agent", "avika.io/max-unavailable", "100%")
    result = plan_for(cluster, percent=50)
    deleted = {a.node for wp in result.workloads for a in wp.pods if a.action == "delete_pod"}
    assert deleted == set(WAVE_50) == {n for n in NODES if rollout_bucket(n, "1.1.0") < 50}
    assert len(WAVE_50) == 4


def test_a_rollback_records_the_pair_and_reports_why() -> None:
    cluster = Cluster()
    on_target(cluster, "1.1.0", "1.2.0")
    moved(cluster, CANARIES[:1], "1.2.0", state="crashloop")
    result = plan_for(cluster, version="1.2.0", percent=25)
    wp = result.workloads[0]
    assert wp.bad is not None and (wp.bad.version, wp.bad.image) == ("1.2.0", image("1.2.0"))
    assert wp.change is not None and (wp.change.from_image, wp.change.to_image) == (
        image("1.2.0"),
        image("1.1.0"),
    )
    assert wp.status is not None
    assert (wp.status.state, wp.status.version, wp.status.target_version) == ("rolled_back", "1.1.0", "1.2.0")
    assert wp.status.error is not None and wp.status.error.startswith("CrashLoopBackOff: pod avika-agent-")
    assert result.to_dict()["bad_versions"] == [{"version": "1.2.0", "image": image("1.2.0")}]


def test_images_are_pinned_by_digest_when_the_manifest_names_one() -> None:
    result = plan_for(Cluster(), percent=100, digest=DIGEST)
    target = f"{image('1.1.0').rsplit(':', 1)[0]}@{DIGEST}"
    assert result.image == target == pinned_image(image("1.1.0"), DIGEST)
    wp = next(wp for wp in result.workloads if wp.workload.name == "avika-agent")
    assert wp.change is not None and wp.change.to_image == target
    # The version is kept in an annotation: the digest hides the tag.
    assert wp.change.annotations["avika.io/version"] == "1.1.0"


def test_a_registry_port_is_not_taken_for_a_tag() -> None:
    assert pinned_image("registry:5000/avika/agent:1.1.0", DIGEST) == f"registry:5000/avika/agent@{DIGEST}"
    assert pinned_image("registry:5000/avika/agent", DIGEST) == f"registry:5000/avika/agent@{DIGEST}"


def test_only_labelled_workloads_and_their_own_pods_are_planned() -> None:
    result = plan_for(Cluster(), percent=100)
    names = {wp.workload.name for wp in result.workloads}
    assert names == {"avika-agent", "avika-gateway", "avika-relay", "avika-edge"}
    assert result.skipped == ("DaemonSet avika/fluent-bit",)
    touched = {a.name for a in result.actions() if a.kind == "Pod"}
    assert not any(name.startswith("fluent-bit") for name in touched)
    assert len(touched) == 8 + 2 + 2 + 2


def test_a_workload_bucket_depends_on_the_cluster() -> None:
    """Two clusters running the same Deployment get different canaries for one release."""
    cluster = Cluster().only("avika-gateway")
    workloads, pods, nodes = cluster.as_lists()
    buckets = {c: rollout_bucket(f"{c}/avika/avika-gateway", "1.1.0") for c in ("prod-eu", "prod-us")}
    assert buckets["prod-eu"] != buckets["prod-us"]
    percent = max(buckets.values())
    actions = {
        c: reconcile(manifest(percent=percent), workloads, pods, nodes, ControllerState(), Settings(c), NOW)
        .workloads[0]
        .action.action
        for c in buckets
    }
    low = min(buckets, key=buckets.__getitem__)
    assert actions[low] == "patch_image" and actions[max(buckets, key=buckets.__getitem__)] == "none"


def test_raising_the_percent_only_adds_nodes() -> None:
    previous: set[str] = set()
    for percent in (0, 10, 25, 50, 75, 100):
        cluster = Cluster()
        cluster.set_annotation("avika-agent", "avika.io/max-unavailable", "100%")
        result = plan_for(cluster, percent=percent, min_version=None)
        wave = {a.node for a in result.workloads[0].pods if a.action == "delete_pod"}
        assert previous <= wave
        previous = wave
    assert len(previous) == 8


@settings(max_examples=150, deadline=None)
@given(
    states=st.lists(
        st.sampled_from(["ready", "notready", "creating", "gone", "terminating"]), min_size=8, max_size=8
    ),
    on_new=st.lists(st.booleans(), min_size=8, max_size=8),
    budget=st.integers(1, 4),
    percent=st.integers(0, 100),
)
def test_never_more_than_max_unavailable_ready_pods_are_taken_down(
    states: list[str], on_new: list[bool], budget: int, percent: int
) -> None:
    """Whatever the pods look like, deleting never leaves more than max-unavailable pods down,
    except for pods that were down already (replacing those takes nothing away)."""
    cluster = Cluster().only("avika-agent")
    on_target(cluster)
    cluster.set_annotation("avika-agent", "avika.io/max-unavailable", str(budget))
    for node, state, new in zip(NODES, states, on_new, strict=True):
        pod = cluster.pod_on("avika-agent", node)
        if state == "gone":
            cluster.remove_pod(pod)
        else:
            cluster.set_pod(pod, img=image("1.1.0") if new else None, state=state)
    result = plan_for(cluster, percent=percent)
    wp = result.workloads[0]
    pods = {p["metadata"]["name"]: p for p in cluster.pods_of("avika-agent")}
    down_before = sum(1 for s in states if s != "ready")
    ready_deleted = sum(
        1
        for a in wp.pods
        if a.action == "delete_pod" and states[NODES.index(pods[a.name]["spec"]["nodeName"])] == "ready"
    )
    assert down_before + ready_deleted <= max(budget, down_before)
    for a in wp.pods:
        if a.action == "delete_pod" and a.reason == "in_wave":
            assert percent > 0 and a.node in in_wave_nodes(NODES, "1.1.0", percent)
        elif a.action == "delete_pod":  # a pod stuck on the new release goes back with the rollback
            assert (a.reason, wp.action.action) == ("rollback", "rollback")
