"""The controller's Kubernetes I/O behind one small interface (DESIGN section 10).

:class:`Kube` does the work every client shares (python-tuf's fetcher shape): it filters lists by
label itself (a server, or a fake of one, may ignore ``labelSelector``), restarts a list that
expired mid-way (410 Gone: a ``continue`` token too old), and maps every failure to
:class:`KubeError` with the HTTP status. An implementation writes five methods: ``_list``,
``_get``, ``_create``, ``_patch`` (JSON patch, RFC 6902), ``_delete``. :class:`LightkubeKube` is
the real one, over lightkube (in-cluster service account, or ``KUBECONFIG``).

Writes are JSON patches that ``test`` what was read (:mod:`controller.changes`): the API server
answers 422 when a test fails, 409 on a conflicting write or an existing name; both are
:class:`Conflict`, which the runner answers by reading again on its next pass, never by
overwriting.

Objects come and go as plain dicts in the shape ``kubectl get -o json`` prints, so the plan reads
the same thing from the cluster as from an operator's files.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import httpx2 as httpx
import lightkube
import msgspec
from lightkube.core.exceptions import ApiError
from lightkube.resources import apps_v1, coordination_v1, core_v1
from lightkube.types import PatchType

from controller.objects import LABEL_UPDATES, WORKLOAD_KINDS

log = logging.getLogger(__name__)

KINDS = (*WORKLOAD_KINDS, "Pod", "Node", "ConfigMap", "Lease")
CLUSTER_SCOPED = frozenset({"Node"})
LIST_ATTEMPTS = 3


class KubeError(Exception):
    """A request failed; ``status`` is the HTTP status (None: no answer, e.g. connection refused)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    """409, or 422 from a failed JSON-patch ``test``: someone changed it since we read it."""


class Gone(KubeError):
    """410: a list's ``continue`` token (or a watch's resourceVersion) expired; read again."""


class Forbidden(KubeError):
    pass


def error_for(status: int | None, message: str) -> KubeError:
    cls = {404: NotFound, 409: Conflict, 422: Conflict, 410: Gone, 403: Forbidden}.get(status or 0, KubeError)
    return cls(status, message)


def labels_match(obj: Mapping[str, Any], labels: Mapping[str, str] | None) -> bool:
    if not labels:
        return True
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


class Kube(abc.ABC):
    """Shared work over one client; see the module docstring."""

    # -- what an implementation provides

    @abc.abstractmethod
    def _list(
        self, kind: str, namespace: str | None, labels: Mapping[str, str] | None
    ) -> list[dict[str, Any]]:
        """Every ``kind`` in ``namespace`` (None: all namespaces), ``labels`` as a selector hint."""

    @abc.abstractmethod
    def _get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any]: ...

    @abc.abstractmethod
    def _create(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]: ...

    @abc.abstractmethod
    def _patch(
        self, kind: str, namespace: str | None, name: str, ops: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """A JSON patch (``application/json-patch+json``)."""

    @abc.abstractmethod
    def _delete(self, kind: str, namespace: str | None, name: str) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    # -- the interface the runner uses

    def list(
        self, kind: str, namespace: str | None = None, labels: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """Objects of ``kind``, filtered by ``labels`` here whatever the server did with the selector."""
        for attempt in range(1, LIST_ATTEMPTS + 1):
            try:
                found = self._list(kind, namespace, labels)
            except Gone as exc:
                log.info("listing %s expired (%s); listing again (%d/%d)", kind, exc, attempt, LIST_ATTEMPTS)
                continue
            return [obj for obj in found if labels_match(obj, labels)]
        raise Gone(410, f"listing {kind} expired {LIST_ATTEMPTS} times in a row")

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self._get(kind, namespace, name)
        except NotFound:
            return None

    def create(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        return self._create(kind, obj)

    def patch(self, kind: str, namespace: str | None, name: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        return self._patch(kind, namespace, name, ops)

    def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        """True when deleted now, False when it was already gone."""
        try:
            self._delete(kind, namespace, name)
        except NotFound:
            return False
        return True

    def list_workloads(self, namespaces: Sequence[str] | None) -> list[dict[str, Any]]:
        """DaemonSets, Deployments and StatefulSets labelled ``avika.io/updates=enabled``."""
        out: list[dict[str, Any]] = []
        for kind in WORKLOAD_KINDS:
            for ns in namespaces or (None,):
                out += [_with_kind(o, kind) for o in self.list(kind, ns, {LABEL_UPDATES: "enabled"})]
        return out

    def list_pods(self, workloads: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The pods the workloads' selectors may match (narrowed by ``matchLabels`` per namespace)."""
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for w in workloads:
            meta, spec = w.get("metadata") or {}, w.get("spec") or {}
            # matchLabels narrow the list; matchExpressions are matched by the plan (selector_matches).
            labels = (spec.get("selector") or {}).get("matchLabels") or None
            for pod in self.list("Pod", meta.get("namespace") or "default", labels):
                pmeta = pod.get("metadata") or {}
                out[(pmeta.get("namespace") or "", pmeta.get("name") or "")] = _with_kind(pod, "Pod")
        return list(out.values())

    def list_nodes(self) -> list[dict[str, Any]]:
        """Nodes, for their readiness; without RBAC for nodes, none (every node is taken as ready)."""
        try:
            return [_with_kind(n, "Node") for n in self.list("Node")]
        except KubeError as exc:  # Forbidden without the ClusterRole; readiness is a refinement
            log.warning("cannot list nodes (%s): node readiness is not checked", exc)
            return []


def _with_kind(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    """List items may come without ``kind``/``apiVersion``; the plan needs the kind."""
    if obj.get("kind") != kind:
        obj = {**obj, "kind": kind}
    if "apiVersion" not in obj:
        obj["apiVersion"] = WORKLOAD_KINDS.get(kind, ("v1", ""))[0]
    return obj


# ---------------------------------------------------------------- lightkube


class LightkubeKube(Kube):
    """The real client: lightkube, typed resources, JSON patches; errors mapped by status."""

    def __init__(self, client: Any | None = None) -> None:
        self._client = client or lightkube.Client(field_manager="avika-controller")
        self._resources = {
            "DaemonSet": apps_v1.DaemonSet,
            "Deployment": apps_v1.Deployment,
            "StatefulSet": apps_v1.StatefulSet,
            "Pod": core_v1.Pod,
            "Node": core_v1.Node,
            "ConfigMap": core_v1.ConfigMap,
            "Lease": coordination_v1.Lease,
        }

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, context: str | None = None) -> LightkubeKube:
        config = lightkube.KubeConfig.from_file(path) if path else lightkube.KubeConfig.from_env()
        return cls(
            lightkube.Client(config=config.get(context_name=context), field_manager="avika-controller")
        )

    def close(self) -> None:
        self._client.close()

    def _call(self, what: str, fn: Any) -> Any:
        try:
            return fn()
        except ApiError as exc:
            text = f"{what}: {exc.status.reason or ''} {exc.status.message or ''}".strip()
            raise error_for(exc.status.code, text) from None
        except httpx.HTTPStatusError as exc:
            # lightkube raises ApiError only for "application/json" exactly; anything else lands here.
            raise error_for(exc.response.status_code, f"{what}: {_status_text(exc.response)}") from None
        except httpx.HTTPError as exc:
            raise KubeError(None, f"{what}: {type(exc).__name__}: {exc}") from None
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise KubeError(
                None, f"{what}: the answer does not decode as a {what.split()[1]}: {exc}"
            ) from None

    def _ns(self, kind: str, namespace: str | None) -> dict[str, Any]:
        return {} if kind in CLUSTER_SCOPED else {"namespace": namespace or "*"}

    def _list(
        self, kind: str, namespace: str | None, labels: Mapping[str, str] | None
    ) -> list[dict[str, Any]]:
        res = self._resources[kind]
        return self._call(
            f"list {kind}",
            lambda: [
                o.to_dict()
                for o in self._client.list(res, labels=dict(labels or {}), **self._ns(kind, namespace))
            ],
        )

    def _get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        res = self._resources[kind]
        return self._call(
            f"get {kind} {name}", lambda: self._client.get(res, name, **self._one(kind, namespace)).to_dict()
        )

    def _create(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        res = self._resources[kind]
        return self._call(f"create {kind}", lambda: self._client.create(res.from_dict(obj)).to_dict())

    def _patch(
        self, kind: str, namespace: str | None, name: str, ops: list[dict[str, Any]]
    ) -> dict[str, Any]:
        res = self._resources[kind]
        return self._call(
            f"patch {kind} {name}",
            lambda: self._client.patch(
                res, name, ops, patch_type=PatchType.JSON, **self._one(kind, namespace)
            ).to_dict(),
        )

    def _delete(self, kind: str, namespace: str | None, name: str) -> None:
        res = self._resources[kind]
        self._call(
            f"delete {kind} {name}", lambda: self._client.delete(res, name, **self._one(kind, namespace))
        )

    def _one(self, kind: str, namespace: str | None) -> dict[str, Any]:
        return {} if kind in CLUSTER_SCOPED else {"namespace": namespace or "default"}


def _status_text(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    if isinstance(body, dict):
        return f"{body.get('reason') or ''} {body.get('message') or ''}".strip()[:300]
    return f"HTTP {response.status_code}"
