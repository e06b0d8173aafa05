"""``avika-controller plan`` through the real command line (DESIGN section 10), on ``kubectl get -o json``
files (``tests/controller/``, changed per case).

Each case runs the installed console script as a process and checks its exit code and its JSON:
``{"serial", "version", "actions": [{"kind", "namespace", "name", "action", "image", "reason"}]}``.
Exit codes as the agent's: 0, 1 (the manifest could not be fetched), 2 (invalid input),
3 (the manifest does not verify, with the agent's error code).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.manifest import LocalSigner, generate_private_key, rollout_bucket
from tests.agent_fixtures import LocalServer
from tests.controller_fixtures import (
    CLUSTER,
    NOW,
    NOW_TEXT,
    PUBLIC_KEY,
    Cluster,
    envelope,
    image,
    in_wave_nodes,
    manifest,
)

CONTROLLER = str(Path(sys.executable).parent / "avika-controller")
NODES = Cluster().node_names


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AVIKA_", "UPDATE_"))}
    return subprocess.run(
        [CONTROLLER, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        check=False,
    )


def plan(
    tmp_path: Path,
    cluster: Cluster,
    manifest_bytes: bytes,
    *extra: str,
    as_json: bool = True,
) -> subprocess.CompletedProcess[str]:
    files = cluster.write(tmp_path / "cluster")
    (tmp_path / "manifest.json").write_bytes(manifest_bytes)
    args = [
        "plan", "--manifest", str(tmp_path / "manifest.json"), "--workloads", str(files["workloads"]),
        "--pods", str(files["pods"]), "--nodes", str(files["nodes"]), "--cluster", CLUSTER,
        "--public-key", PUBLIC_KEY, "--now", NOW_TEXT, *extra,
    ]  # fmt: skip
    return run(*args, *(["--json"] if as_json else []))


def output(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def actions_for(result: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The workload's action, then its pods' (``plan`` prints them in that order)."""
    acts = result["actions"]
    start = next(i for i, a in enumerate(acts) if a["name"] == name and a["kind"] != "Pod")
    out = [acts[start]]
    for a in acts[start + 1 :]:
        if a["kind"] != "Pod":
            break
        out.append(a)
    return out


def state_configmap(path: Path, state: dict[str, Any]) -> Path:
    """The state ConfigMap as ``kubectl get configmap avika-controller-state -o json`` prints it."""
    doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "avika-controller-state", "namespace": "avika", "resourceVersion": "51234"},
        "data": {"state.json": json.dumps({"format": 1, **state})},
    }
    path.write_text(json.dumps(doc, indent=4))
    return path


def crash_on_canary(cluster: Cluster, state: str) -> str:
    """1.2.0 went out to its first canary node, which now runs it in ``state``; the node's name."""
    cluster.set_template("avika-agent", image("1.2.0"), previous=image("1.1.0"))
    for pod in cluster.pods_of("avika-agent"):
        cluster.set_pod(pod, img=image("1.1.0"))
    canary = in_wave_nodes(NODES, "1.2.0", 25)[0]
    cluster.set_pod(cluster.pod_on("avika-agent", canary), img=image("1.2.0"), state=state)
    return canary


def test_waves_per_node_for_an_on_delete_daemonset(tmp_path: Path) -> None:
    result = output(plan(tmp_path, Cluster().only("avika-agent"), envelope(manifest("1.1.0", 50))))
    ds, *pods = actions_for(result, "avika-agent")
    assert (result["serial"], result["version"]) == (7, "1.1.0")
    assert (ds["kind"], ds["action"], ds["reason"], ds["image"]) == (
        "DaemonSet",
        "patch_image",
        "in_wave",
        image("1.1.0"),
    )
    wave = {n for n in NODES if rollout_bucket(n, "1.1.0") < 50}
    assert len(wave) == 4
    for pod in pods:
        if pod["node"] in wave:
            assert (pod["action"], pod["reason"]) in {("delete_pod", "in_wave"), ("none", "wave_full")}
        else:
            assert (pod["action"], pod["reason"]) == ("none", "not_in_wave")
    deleted = [p for p in pods if p["action"] == "delete_pod"]
    assert len(deleted) == 1 and deleted[0]["image"] == image("1.1.0")


def test_waves_per_workload_by_the_cluster_bucket(tmp_path: Path) -> None:
    bucket = rollout_bucket(f"{CLUSTER}/avika/avika-gateway", "1.1.0")
    cluster = Cluster().only("avika-gateway")
    inside = output(plan(tmp_path, cluster, envelope(manifest("1.1.0", bucket + 1))))
    outside = output(plan(tmp_path, cluster, envelope(manifest("1.1.0", bucket))))
    assert actions_for(inside, "avika-gateway")[0]["action"] == "patch_image"
    assert (
        actions_for(outside, "avika-gateway")[0]["action"],
        actions_for(outside, "avika-gateway")[0]["reason"],
    ) == (
        "none",
        "not_in_wave",
    )
    # Kubernetes' own rolling update moves the pods: the controller deletes none.
    assert all(a["action"] == "none" for a in actions_for(inside, "avika-gateway")[1:])


def test_halt_starts_nothing(tmp_path: Path) -> None:
    result = output(plan(tmp_path, Cluster(), envelope(manifest("1.1.0", 0))))
    assert all(a["action"] == "none" for a in result["actions"])
    assert {a["reason"] for a in result["actions"] if a["kind"] != "Pod"} == {"halted"}


def test_gitops_managed_workloads_are_only_reported_with_the_change_for_git(tmp_path: Path) -> None:
    result = output(plan(tmp_path, Cluster().only("avika-relay"), envelope(manifest("1.1.0", 100))))
    relay = actions_for(result, "avika-relay")[0]
    assert (relay["action"], relay["reason"], relay["image"]) == (
        "report_only",
        "gitops_managed",
        image("1.1.0"),
    )
    assert "argocd.argoproj.io/instance=avika-prod" in relay["detail"]
    assert f"to {image('1.1.0')} in git" in relay["detail"]


@pytest.mark.parametrize("serial", [7, 12], ids=["same serial", "re-signed with a higher serial"])
def test_a_rolled_back_version_is_never_applied_again(tmp_path: Path, serial: int) -> None:
    state = state_configmap(
        tmp_path / "state.json",
        {
            "highest_serial": 7,
            "bad": [{"version": "1.2.0", "image": image("1.2.0"), "reason": "CrashLoopBackOff",
                     "workload": "k8s/prod-eu/avika/daemonset/avika-agent", "time": "2026-03-01T11:00:00Z"}],
        },
    )  # fmt: skip
    m = envelope(manifest("1.2.0", 100, serial=serial))
    result = output(plan(tmp_path, Cluster().only("avika-agent"), m, "--state", str(state)))
    ds, *pods = actions_for(result, "avika-agent")
    assert (ds["action"], ds["reason"]) == ("none", "bad_version")
    assert all(p["action"] == "none" for p in pods)
    # Another image for the same version (a digest) is a new candidate.
    pinned = envelope(manifest("1.2.0", 100, serial=serial, digest="sha256:" + "e" * 64))
    again = output(plan(tmp_path, Cluster().only("avika-agent"), pinned, "--state", str(state)))
    assert actions_for(again, "avika-agent")[0]["action"] == "patch_image"


@pytest.mark.parametrize(
    "pod_state", ["crashloop", "imagepull"], ids=["CrashLoopBackOff", "ImagePullBackOff"]
)
def test_a_new_pod_that_will_not_run_rolls_the_daemonset_back(tmp_path: Path, pod_state: str) -> None:
    cluster = Cluster().only("avika-agent")
    canary = crash_on_canary(cluster, pod_state)
    result = output(plan(tmp_path, cluster, envelope(manifest("1.2.0", 25))))
    ds, *pods = actions_for(result, "avika-agent")
    reason = {"crashloop": "CrashLoopBackOff", "imagepull": "ImagePullBackOff"}[pod_state]
    assert (ds["action"], ds["reason"], ds["image"]) == ("rollback", "unhealthy", image("1.1.0"))
    assert ds["detail"].startswith(f"{reason}: pod avika-agent-") and canary in ds["detail"]
    crashing = next(p for p in pods if p["node"] == canary)
    assert (crashing["action"], crashing["reason"], crashing["image"]) == (
        "delete_pod",
        "rollback",
        image("1.1.0"),
    )
    assert result["bad_versions"] == [{"version": "1.2.0", "image": image("1.2.0")}]


@pytest.mark.parametrize("budget", ["1", "2", "25%"])
def test_max_unavailable_bounds_the_pods_taken_down_at_once(tmp_path: Path, budget: str) -> None:
    cluster = Cluster().only("avika-agent")
    cluster.set_annotation("avika-agent", "avika.io/max-unavailable", budget)
    result = output(plan(tmp_path, cluster, envelope(manifest("1.1.0", 100))))
    pods = actions_for(result, "avika-agent")[1:]
    expected = {"1": 1, "2": 2, "25%": 2}[budget]
    assert sum(p["action"] == "delete_pod" for p in pods) == expected
    assert sum(p["reason"] == "wave_full" for p in pods) == 8 - expected


def test_a_manifest_signed_by_another_key_exits_3_with_the_agents_error_code(tmp_path: Path) -> None:
    other = LocalSigner(generate_private_key())
    done = plan(tmp_path, Cluster(), envelope(manifest("1.1.0", 100), other))
    assert done.returncode == 3
    assert json.loads(done.stdout)["error"] == "signature_invalid"
    assert "signature_invalid" in done.stderr


@pytest.mark.parametrize(
    ("build", "extra", "code"),
    [
        (lambda: envelope(manifest(expires=NOW - timedelta(hours=1))), (), "expired"),
        (lambda: envelope(manifest(serial=3)), ("state",), "serial_rollback"),
        (lambda: envelope(manifest())[:-20] + b"}", (), "malformed_envelope"),
        (lambda: b"x" * (1024 * 1024 + 1), (), "too_large"),
    ],
    ids=["expired", "replayed older serial", "truncated", "oversized"],
)
def test_an_untrusted_manifest_exits_3(tmp_path: Path, build: Any, extra: tuple[str, ...], code: str) -> None:
    args = []
    if extra:
        args = ["--state", str(state_configmap(tmp_path / "state.json", {"highest_serial": 5, "bad": []}))]
    done = plan(tmp_path, Cluster(), build(), *args)
    assert done.returncode == 3, done.stderr
    assert json.loads(done.stdout)["error"] == code


def test_invalid_input_exits_2_and_names_the_file(tmp_path: Path) -> None:
    cluster = Cluster()
    done = plan(tmp_path, cluster, envelope(manifest()))
    assert done.returncode == 0
    files = cluster.write(tmp_path / "cluster")
    files["pods"].write_text(
        "NAME READY STATUS\navika-agent-0cfd3 1/1 Running\n"
    )  # kubectl get without -o json
    bad = run(
        "plan", "--manifest", str(tmp_path / "manifest.json"), "--workloads", str(files["workloads"]),
        "--pods", str(files["pods"]), "--cluster", CLUSTER, "--public-key", PUBLIC_KEY,
        "--now", NOW_TEXT, "--json",
    )  # fmt: skip
    assert bad.returncode == 2
    assert json.loads(bad.stdout)["error"] == "invalid_input"
    assert "pods.json" in bad.stderr and "-o json" in bad.stderr


def test_a_cluster_id_with_a_slash_is_refused(tmp_path: Path) -> None:
    done = plan(tmp_path, Cluster(), envelope(manifest()), "--cluster", "prod/eu")
    assert done.returncode == 2
    assert "cluster id" in done.stderr


def test_the_manifest_can_come_from_the_update_server(tmp_path: Path) -> None:
    files = Cluster().only("avika-agent").write(tmp_path)
    base = ["--workloads", str(files["workloads"]), "--pods", str(files["pods"]), "--cluster", CLUSTER]
    base += ["--public-key", PUBLIC_KEY, "--now", NOW_TEXT, "--json"]
    with LocalServer() as server:
        server.serve("/updates/manifest.json", envelope(manifest("1.1.0", 100)))
        done = run("plan", "--manifest", server.url("/updates/"), *base)
        missing = run("plan", "--manifest", server.url("/elsewhere/"), *base)
    assert json.loads(done.stdout)["version"] == "1.1.0"
    assert missing.returncode == 1
    assert json.loads(missing.stdout)["error"] == "fetch_failed"


def test_the_text_output_is_a_table_a_person_can_read(tmp_path: Path) -> None:
    done = plan(tmp_path, Cluster(), envelope(manifest("1.1.0", 50)), as_json=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"manifest serial 7: 1.1.0 at 50 %, image {image('1.1.0')}"
    assert lines[1].split() == ["KIND", "NAMESPACE", "NAME", "NODE", "ACTION", "REASON", "IMAGE"]
    assert any(line.startswith("Deployment avika/avika-relay: managed by Argo CD") for line in lines)
    assert "ignored (no avika.io/updates=enabled label): DaemonSet avika/fluent-bit" in lines
    assert lines[-1].endswith("action(s) to take")


def test_help_names_every_option() -> None:
    done = run("plan", "--help")
    assert done.returncode == 0
    for option in (
        "--manifest",
        "--workloads",
        "--pods",
        "--nodes",
        "--cluster",
        "--public-key",
        "--state",
        "--json",
    ):
        assert option in done.stdout
