"""Shared helpers for the controller tests: a cluster as ``kubectl get -o json`` prints it, and signed
manifests.

The cluster comes from ``tests/controller/*.json`` (one namespace ``avika`` with the agent's
DaemonSet on 8 nodes, ``OnDelete``; a Deployment ``avika-gateway`` whose container is named
``agent``; an Argo CD-managed Deployment ``avika-relay``; a Helm-managed StatefulSet ``avika-edge``
allowed to be patched; and a ``fluent-bit`` DaemonSet that is not managed, whose pods share the
namespace and the nodes). A test copies it, changes what its case needs, and writes the three files.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.manifest import (
    Binary,
    LocalSigner,
    Manifest,
    Rollout,
    generate_private_key,
    rollout_bucket,
    sign_envelope,
)

FIXTURES = Path(__file__).resolve().parent / "controller"
REGISTRY = "registry.example.com/avika/avika-agent"
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
NOW_TEXT = "2026-03-01T12:00:00Z"
CLUSTER = "prod-eu"
SIGNER = LocalSigner(generate_private_key())
PUBLIC_KEY = SIGNER.public_key.b64


def image(version: str) -> str:
    return f"{REGISTRY}:{version}"


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def manifest(
    version: str = "1.1.0",
    percent: int = 100,
    *,
    serial: int = 7,
    digest: str | None = None,
    min_version: str | None = None,
    downgrade: bool = False,
    container_image: str | None = "default",
    salt: str | None = None,
    expires: datetime | None = None,
) -> Manifest:
    return Manifest(
        serial=serial,
        version=version,
        released_at=NOW - timedelta(hours=1),
        expires=expires or NOW + timedelta(days=30),
        binaries={
            "linux-amd64": Binary(f"binaries/{version}/{'a' * 64}/avika-agent-linux-amd64", "a" * 64, 1000)
        },
        container_image=image(version) if container_image == "default" else container_image,
        container_digest=digest,
        min_version=min_version,
        rollout=Rollout(percent, version if salt is None else salt),
        downgrade=downgrade,
    )


def envelope(m: Manifest, signer: LocalSigner = SIGNER) -> bytes:
    return sign_envelope(m.to_payload(), [signer])


def in_wave_nodes(nodes: list[str], version: str, percent: int) -> list[str]:
    return [n for n in nodes if rollout_bucket(n, version) < percent]


class Cluster:
    """A mutable copy of the fixture cluster."""

    def __init__(self) -> None:
        self.workloads: list[dict[str, Any]] = load("workloads.json")["items"]
        self.pods: list[dict[str, Any]] = load("pods.json")["items"]
        self.nodes: list[dict[str, Any]] = load("nodes.json")["items"]

    @property
    def node_names(self) -> list[str]:
        return [n["metadata"]["name"] for n in self.nodes]

    def workload(self, name: str) -> dict[str, Any]:
        return next(w for w in self.workloads if w["metadata"]["name"] == name)

    def only(self, *names: str) -> Cluster:
        self.workloads = [w for w in self.workloads if w["metadata"]["name"] in names]
        return self

    def set_annotation(self, name: str, key: str, value: str | None) -> Cluster:
        anns = self.workload(name)["metadata"].setdefault("annotations", {})
        if value is None:
            anns.pop(key, None)
        else:
            anns[key] = value
        return self

    def set_label(self, name: str, key: str, value: str | None) -> Cluster:
        labels = self.workload(name)["metadata"].setdefault("labels", {})
        if value is None:
            labels.pop(key, None)
        else:
            labels[key] = value
        return self

    def container(self, name: str) -> dict[str, Any]:
        w = self.workload(name)
        cname = (w["metadata"].get("annotations") or {}).get("avika.io/container", "avika-agent")
        return next(c for c in w["spec"]["template"]["spec"]["containers"] if c["name"] == cname)

    def set_template(self, name: str, img: str, previous: str | None = None) -> Cluster:
        self.container(name)["image"] = img
        if previous is not None:
            version = previous.rsplit(":", 1)[-1]
            self.set_annotation(name, "avika.io/previous-image", previous)
            self.set_annotation(name, "avika.io/previous-version", version)
        return self

    def pods_of(self, name: str) -> list[dict[str, Any]]:
        return sorted(
            (
                p
                for p in self.pods
                if (p["metadata"].get("labels") or {}).get("app.kubernetes.io/name") == name
            ),
            key=lambda p: p["spec"].get("nodeName", ""),
        )

    def pod_on(self, name: str, node: str) -> dict[str, Any]:
        return next(p for p in self.pods_of(name) if p["spec"]["nodeName"] == node)

    def set_pod(
        self,
        pod: dict[str, Any],
        *,
        img: str | None = None,
        state: str = "ready",
        started: datetime | None = None,
        created: datetime | None = None,
    ) -> Cluster:
        """``state``: ready | crashloop | imagepull | creating | notready | terminating."""
        spec_c = pod["spec"]["containers"][0]
        status_c = pod["status"]["containerStatuses"][0]
        if img is not None:
            spec_c["image"] = status_c["image"] = img
        started = started or NOW - timedelta(hours=1)
        if created is None and state in ("creating", "crashloop", "imagepull"):
            created = NOW - timedelta(seconds=30)  # a replacement: just made
        if created is not None:
            pod["metadata"]["creationTimestamp"] = stamp(created)
        ready = state in ("ready", "terminating")
        for cond in pod["status"]["conditions"]:
            if cond["type"] in ("Ready", "ContainersReady"):
                cond["status"] = "True" if ready else "False"
        status_c["ready"] = ready
        if state in ("ready", "terminating", "notready"):
            status_c["state"] = {"running": {"startedAt": stamp(started)}}
        elif state == "crashloop":
            status_c["state"] = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": "back-off 40s restarting failed container",
                }
            }
            status_c["lastState"] = {"terminated": {"exitCode": 1, "reason": "Error"}}
            status_c["restartCount"] = 3
        elif state == "imagepull":
            status_c["state"] = {
                "waiting": {
                    "reason": "ImagePullBackOff",
                    "message": f'Back-off pulling image "{spec_c["image"]}"',
                }
            }
        elif state == "creating":
            status_c["state"] = {"waiting": {"reason": "ContainerCreating"}}
        if state == "terminating":
            pod["metadata"]["deletionTimestamp"] = NOW_TEXT
        return self

    def remove_pod(self, pod: dict[str, Any]) -> Cluster:
        self.pods = [p for p in self.pods if p is not pod]
        return self

    def set_node_ready(self, node: str, ready: bool) -> Cluster:
        obj = next(n for n in self.nodes if n["metadata"]["name"] == node)
        for cond in obj["status"]["conditions"]:
            if cond["type"] == "Ready":
                cond["status"] = "True" if ready else "Unknown"
        return self

    def as_lists(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        return copy.deepcopy(self.workloads), copy.deepcopy(self.pods), copy.deepcopy(self.nodes)

    def write(self, directory: Path) -> dict[str, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        out = {}
        for name, items in (("workloads", self.workloads), ("pods", self.pods), ("nodes", self.nodes)):
            path = directory / f"{name}.json"
            path.write_text(
                json.dumps(
                    {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items},
                    indent=4,
                )
            )
            out[name] = path
        return out
