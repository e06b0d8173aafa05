"""The facts the plan reads from Kubernetes objects, exactly as ``kubectl get -o json`` prints them.

Pure: dicts in, small frozen records out. Nothing here trusts the API server to have filtered
anything (an HTTP fake ignores label selectors, and an operator may feed ``plan`` a whole
namespace): label selectors are matched here, by :func:`selector_matches`.

Names the controller reads and writes on workloads (DESIGN section 10):

- label ``avika.io/updates=enabled``: the workload is managed;
- annotation ``avika.io/container`` (default ``avika-agent``): the container whose image moves;
- annotation ``avika.io/max-unavailable`` (default 1; an integer, or a percent of the pods):
  how many pods of an ``OnDelete`` workload may be down at once;
- annotation ``avika.io/allow-patch: "true"``: patch even though GitOps or Helm manages it;
- annotations written with every image change: ``avika.io/previous-image`` (the image before
  the change: what a rollback puts back) and ``avika.io/previous-version``, ``avika.io/image``
  and ``avika.io/version`` (which release the image is, when a digest hides the tag).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from packaging.version import InvalidVersion

from agent.manifest import normalize_version, parse_time
from infra.reports.validation import valid_agent_id

LABEL_UPDATES = "avika.io/updates"
ANN_CONTAINER = "avika.io/container"
ANN_MAX_UNAVAILABLE = "avika.io/max-unavailable"
ANN_ALLOW_PATCH = "avika.io/allow-patch"
ANN_PREVIOUS_IMAGE = "avika.io/previous-image"
ANN_PREVIOUS_VERSION = "avika.io/previous-version"
ANN_IMAGE = "avika.io/image"
ANN_VERSION = "avika.io/version"
DEFAULT_CONTAINER = "avika-agent"

# kind -> (API group/version, plural). The three kinds the controller manages.
WORKLOAD_KINDS: dict[str, tuple[str, str]] = {
    "DaemonSet": ("apps/v1", "daemonsets"),
    "Deployment": ("apps/v1", "deployments"),
    "StatefulSet": ("apps/v1", "statefulsets"),
}
ON_DELETE = "OnDelete"

# Who else writes the workload (DESIGN section 10): a patch of ours would be undone at the next sync.
# Checked as labels and as annotations; (key, value or None for any, the manager's name).
GITOPS_MARKERS: tuple[tuple[str, str | None, str], ...] = (
    ("argocd.argoproj.io/instance", None, "Argo CD"),
    ("argocd.argoproj.io/tracking-id", None, "Argo CD"),
    ("kustomize.toolkit.fluxcd.io/name", None, "Flux"),
    ("helm.toolkit.fluxcd.io/name", None, "Flux (HelmRelease)"),
    ("app.kubernetes.io/managed-by", "Helm", "Helm"),
)

# Waiting reasons that mean the new image will not run (DESIGN section 10: crash loop, image pull).
CRASH_REASONS = frozenset({"CrashLoopBackOff"})
PULL_REASONS = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName"})
UNHEALTHY_REASONS = CRASH_REASONS | PULL_REASONS

_DIGEST_RE = re.compile(r"@sha256:[0-9a-f]{64}$")
_CLUSTER_RE = re.compile(r"[A-Za-z0-9._:@+=-]{1,40}")


class ObjectError(ValueError):
    """An input object is not what ``kubectl get -o json`` would print: names the object and the field."""


# ---------------------------------------------------------------- small readers


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str_map(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in _dict(value).items() if isinstance(v, str)}


def timestamp(value: Any) -> datetime | None:
    """A Kubernetes time (``2026-03-01T12:00:00Z``); None when absent or unreadable."""
    if not isinstance(value, str):
        return None
    try:
        return parse_time(value)
    except ValueError:
        return None


def describe(obj: Mapping[str, Any]) -> str:
    meta = _dict(obj.get("metadata"))
    return f"{obj.get('kind', '?')} {meta.get('namespace', '')}/{meta.get('name', '?')}".replace(" /", " ")


# ---------------------------------------------------------------- images and versions


def image_repository(image: str) -> str:
    """``registry:5000/org/app:1.0@sha256:..`` -> ``registry:5000/org/app`` (tag and digest dropped)."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    return name


def image_tag(image: str) -> str | None:
    last = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def pinned_image(image: str, digest: str | None) -> str:
    """The manifest's image, pinned as ``repository@sha256:...`` when it has a digest (DESIGN section 10)."""
    if digest is None:
        return image
    return f"{image_repository(image)}@{digest}"


def version_of_tag(image: str) -> str | None:
    tag = image_tag(image)
    if tag is None:
        return None
    try:
        return normalize_version(tag)
    except (InvalidVersion, ValueError):
        return None


# ---------------------------------------------------------------- selectors


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A ``LabelSelector`` (``matchLabels`` + ``matchExpressions``) against labels.

    An empty or missing selector matches nothing here: a workload always has one, and matching
    every pod of a namespace by accident would let the controller delete pods it does not own.
    """
    selector = _dict(selector)
    match_labels = _str_map(selector.get("matchLabels"))
    expressions = selector.get("matchExpressions") or []
    if not match_labels and not expressions:
        return False
    if any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    for expr in expressions:
        expr = _dict(expr)
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            return False  # an operator we do not know matches nothing (never too much)
    return True


# ---------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    """A managed DaemonSet, Deployment or StatefulSet; ``problem`` says why it cannot be planned."""

    kind: str
    namespace: str
    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    selector: Mapping[str, Any]
    container: str
    container_index: int | None
    image: str | None
    strategy: str
    desired: int | None  # pods that should exist (DaemonSet: desiredNumberScheduled; else replicas)
    progress_deadline_exceeded: bool = False
    resource_version: str | None = None
    problem: str | None = None

    @property
    def on_delete(self) -> bool:
        """Pods move only when deleted: the controller stages them (DaemonSet per node)."""
        return self.strategy == ON_DELETE and self.kind in ("DaemonSet", "StatefulSet")

    @property
    def enabled(self) -> bool:
        return self.labels.get(LABEL_UPDATES) == "enabled"

    @property
    def ref(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def agent_id(self, cluster: str) -> str:
        return workload_agent_id(cluster, self.namespace, self.kind, self.name)

    @property
    def manager(self) -> str | None:
        """GitOps or Helm, when one manages this workload and no ``allow-patch`` overrides it."""
        if self.annotations.get(ANN_ALLOW_PATCH) == "true":
            return None
        for key, value, name in GITOPS_MARKERS:
            for source in (self.labels, self.annotations):
                if key in source and (value is None or source[key] == value):
                    return f"{name} ({key}={source[key]})"
        return None

    def version_of(self, image: str | None) -> str | None:
        """Which release ``image`` is: our annotations first (a digest hides the tag), then its tag."""
        if image is None:
            return None
        if self.annotations.get(ANN_IMAGE) == image and self.annotations.get(ANN_VERSION):
            return self.annotations[ANN_VERSION]
        if self.annotations.get(ANN_PREVIOUS_IMAGE) == image and self.annotations.get(ANN_PREVIOUS_VERSION):
            return self.annotations[ANN_PREVIOUS_VERSION]
        return version_of_tag(image)

    @property
    def previous_image(self) -> str | None:
        return self.annotations.get(ANN_PREVIOUS_IMAGE) or None

    def max_unavailable(self) -> int:
        """``avika.io/max-unavailable``: an integer >= 1, or ``N%`` of the desired pods (at least 1)."""
        text = self.annotations.get(ANN_MAX_UNAVAILABLE, "1").strip()
        return parse_max_unavailable(text, self.desired)


def parse_max_unavailable(text: str, desired: int | None) -> int:
    if re.fullmatch(r"[1-9][0-9]{0,5}", text):
        return int(text)
    m = re.fullmatch(r"([1-9][0-9]?|100)%", text)
    if m:
        return max(1, (desired or 0) * int(m.group(1)) // 100)
    raise ObjectError(f"{ANN_MAX_UNAVAILABLE} {text!r} is not a count >= 1 or a percent like 25%")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def parse_workload(obj: Mapping[str, Any]) -> Workload:
    """A workload object; ``ObjectError`` when it is not one at all (no kind, name or spec)."""
    kind = obj.get("kind")
    meta = _dict(obj.get("metadata"))
    name, namespace = meta.get("name"), meta.get("namespace") or "default"
    if kind not in WORKLOAD_KINDS:
        raise ObjectError(f"{describe(obj)}: kind {kind!r} is not one of {', '.join(WORKLOAD_KINDS)}")
    if not isinstance(name, str) or not name:
        raise ObjectError(f"{describe(obj)}: metadata.name is missing")
    spec, status = _dict(obj.get("spec")), _dict(obj.get("status"))
    annotations = _str_map(meta.get("annotations"))
    container = annotations.get(ANN_CONTAINER) or DEFAULT_CONTAINER
    containers = _dict(_dict(spec.get("template")).get("spec")).get("containers")
    index, image, problem = None, None, None
    if isinstance(containers, list):
        for i, c in enumerate(containers):
            if isinstance(c, dict) and c.get("name") == container:
                index, image = i, c.get("image") if isinstance(c.get("image"), str) else None
                break
    if index is None:
        problem = f"no container named {container!r} in the pod template (annotation {ANN_CONTAINER})"
    elif not image:
        problem = f"container {container!r} has no image"
    strategy_field = "updateStrategy" if kind in ("DaemonSet", "StatefulSet") else "strategy"
    strategy = _dict(spec.get(strategy_field)).get("type") or "RollingUpdate"
    if kind == "DaemonSet":
        desired = _int(status.get("desiredNumberScheduled"))
    else:
        desired = _int(spec.get("replicas"))
        desired = 1 if desired is None and "replicas" not in spec else desired
    exceeded = any(
        _dict(c).get("type") == "Progressing" and _dict(c).get("reason") == "ProgressDeadlineExceeded"
        for c in status.get("conditions") or []
    )
    workload = Workload(
        kind=kind,
        namespace=namespace,
        name=name,
        labels=_str_map(meta.get("labels")),
        annotations=annotations,
        selector=_dict(spec.get("selector")),
        container=container,
        container_index=index,
        image=image,
        strategy=str(strategy),
        desired=desired,
        progress_deadline_exceeded=exceeded and kind == "Deployment",
        resource_version=meta.get("resourceVersion")
        if isinstance(meta.get("resourceVersion"), str)
        else None,
        problem=problem,
    )
    if problem is None:
        try:
            workload.max_unavailable()
        except ObjectError as exc:
            workload = _with_problem(workload, str(exc))
    return workload


def _with_problem(w: Workload, problem: str) -> Workload:
    return replace(w, problem=problem)


def workload_agent_id(cluster: str, namespace: str, kind: str, name: str) -> str:
    """``k8s/<cluster>/<namespace>/<kind>/<name>`` (kind lower case, DESIGN section 10).

    An id longer than the report contract's 128 characters keeps its head and ends in ``+`` and
    12 hex digits of its SHA-256, so it stays unique and stable.
    """
    full = f"k8s/{cluster}/{namespace}/{kind.lower()}/{name}"
    if len(full) <= 128:
        return full
    return full[:115] + "+" + hashlib.sha256(full.encode()).hexdigest()[:12]


def check_cluster_id(cluster: str) -> str:
    """A cluster id fit for agent ids: 1-40 of ``A-Z a-z 0-9 . _ : @ + = -`` (no ``/``)."""
    if not _CLUSTER_RE.fullmatch(cluster) or not valid_agent_id(f"k8s/{cluster}/"):
        raise ObjectError(f"cluster id {cluster!r} must be 1-40 characters of A-Z a-z 0-9 . _ : @ + = -")
    return cluster


# ---------------------------------------------------------------- pods and nodes


@dataclass(frozen=True)
class Pod:
    """One pod, seen through the managed container (``container``)."""

    namespace: str
    name: str
    uid: str | None
    node: str | None
    labels: Mapping[str, str]
    image: str | None
    ready: bool
    started_at: datetime | None
    restarts: int
    waiting: str | None  # the container's waiting reason (CrashLoopBackOff, ImagePullBackOff, ...)
    message: str | None
    terminating: bool
    created: datetime | None
    owners: tuple[str, ...] = field(default=())

    def unhealthy_reason(self) -> str | None:
        return self.waiting if self.waiting in UNHEALTHY_REASONS else None

    def healthy_since(self, now: datetime) -> float | None:
        """Seconds it has been Ready without a restart (None when not Ready and running)."""
        if not self.ready or self.started_at is None or self.terminating:
            return None
        return max(0.0, (now - self.started_at).total_seconds())


def parse_pod(obj: Mapping[str, Any], container: str) -> Pod:
    meta, spec, status = _dict(obj.get("metadata")), _dict(obj.get("spec")), _dict(obj.get("status"))
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ObjectError(f"{describe(obj)}: metadata.name is missing")
    image = next(
        (c.get("image") for c in spec.get("containers") or [] if _dict(c).get("name") == container), None
    )
    ready = any(
        _dict(c).get("type") == "Ready" and _dict(c).get("status") == "True"
        for c in status.get("conditions") or []
    )
    cs = next(
        (_dict(c) for c in status.get("containerStatuses") or [] if _dict(c).get("name") == container), {}
    )
    state = _dict(cs.get("state"))
    waiting = _dict(state.get("waiting"))
    started = timestamp(_dict(state.get("running")).get("startedAt"))
    return Pod(
        namespace=meta.get("namespace") or "default",
        name=name,
        uid=meta.get("uid") if isinstance(meta.get("uid"), str) else None,
        node=spec.get("nodeName") if isinstance(spec.get("nodeName"), str) else None,
        labels=_str_map(meta.get("labels")),
        image=image if isinstance(image, str) else None,
        ready=ready and bool(cs.get("ready", True)),
        started_at=started,
        restarts=_int(cs.get("restartCount")) or 0,
        waiting=waiting.get("reason") if isinstance(waiting.get("reason"), str) else None,
        message=waiting.get("message") if isinstance(waiting.get("message"), str) else None,
        terminating=bool(meta.get("deletionTimestamp")),
        created=timestamp(meta.get("creationTimestamp")),
        owners=tuple(
            f"{_dict(o).get('kind')}/{_dict(o).get('name')}" for o in meta.get("ownerReferences") or []
        ),
    )


@dataclass(frozen=True)
class Node:
    name: str
    ready: bool


def parse_node(obj: Mapping[str, Any]) -> Node:
    meta, status = _dict(obj.get("metadata")), _dict(obj.get("status"))
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ObjectError(f"{describe(obj)}: metadata.name is missing")
    conditions = [_dict(c) for c in status.get("conditions") or []]
    ready = next((c.get("status") == "True" for c in conditions if c.get("type") == "Ready"), True)
    return Node(name=name, ready=ready)


def pods_of(workload: Workload, pods: Iterable[Mapping[str, Any]]) -> list[Pod]:
    """The pods of ``workload``: same namespace, labels matching its selector (checked here)."""
    out = []
    for obj in pods:
        meta = _dict(obj.get("metadata"))
        if (meta.get("namespace") or "default") != workload.namespace:
            continue
        if not selector_matches(workload.selector, _str_map(meta.get("labels"))):
            continue
        out.append(parse_pod(obj, workload.container))
    return sorted(out, key=lambda p: (p.node or "", p.name))


def items(doc: Any, what: str) -> list[dict[str, Any]]:
    """The objects in a ``kubectl get -o json`` document: a ``List`` (``items``) or one object."""
    if isinstance(doc, dict) and isinstance(doc.get("items"), list):
        found = doc["items"]
    elif isinstance(doc, dict) and doc.get("kind"):
        found = [doc]
    elif isinstance(doc, list):
        found = doc
    else:
        raise ObjectError(f"{what}: not a Kubernetes List or object (kubectl get ... -o json)")
    for i, obj in enumerate(found):
        if not isinstance(obj, dict):
            raise ObjectError(f"{what}: item {i} is not an object")
    return found
