"""An HTTP fake of the Kubernetes API on 127.0.0.1, and a test that plays the kubelet.

:class:`FakeApiServer` is kmock's ``KubernetesEmulator`` (a real aiohttp server in a thread of its
own), made closer to a real API server where the controller's correctness depends on it:

- a JSON patch whose ``test`` fails (or that points nowhere) answers 422, as the API server does
  (kmock would answer 500);
- errors are ``Content-Type: application/json`` exactly (kmock adds ``; charset=utf-8``, which
  makes lightkube treat a 404 as a transport error);
- faults can be injected per request (``fail``) and code can run inside the server just before a
  request is handled (``before``), e.g. a concurrent ``kubectl set image``.

What it still does not do, and how the tests keep that from hiding a bug: it ignores label
selectors (the controller filters by label itself, and the fixtures hold pods of other workloads
that a selector-trusting controller would touch); it keeps no ``resourceVersion`` (image changes are
guarded by a ``test`` of the image itself, which the fake does apply); a strategic-merge patch
would replace whole lists (the controller sends JSON patches only, and :attr:`FakeApiServer.patches`
records every content type so a test can assert it); pods are deleted at once, with no graceful
termination.

:class:`Kubelet` plays the DaemonSet controller and the kubelets of ``nodes`` over HTTP: when a
node has no pod of a DaemonSet, it creates one from the template (ContainerCreating), then makes it
Running and Ready, or crash-looping, or failing to pull, as ``behaviour(image)`` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonpatch
import jsonpointer
import kmock
import requests

RESOURCES = {
    "DaemonSet": ("apps/v1", "daemonsets"),
    "Deployment": ("apps/v1", "deployments"),
    "StatefulSet": ("apps/v1", "statefulsets"),
    "Pod": ("v1", "pods"),
    "Node": ("v1", "nodes"),
    "ConfigMap": ("v1", "configmaps"),
    "Lease": ("coordination.k8s.io/v1", "leases"),
}
CLUSTER_SCOPED = {"Node"}


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Fault:
    method: str
    plural: str
    status: int
    times: int
    name: str | None = None
    message: str = "injected by the test"


@dataclass
class Hook:
    method: str
    plural: str
    fn: Callable[[Any, Any], None]  # (emulator, request) -> None
    times: int = 1


class _Emulator(kmock.KubernetesEmulator):
    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.faults: list[Fault] = []
        self.hooks: list[Hook] = []
        self.seen: list[tuple[str, str, str, str]] = []  # (method, path?query, content type, user agent)

    async def _handle(self, request: Any) -> Any:
        plural = request.resource.plural if request.resource is not None else ""
        method = request.method.upper()
        headers = request.headers
        self.seen.append(
            (
                method,
                str(request.url.raw_path_qs),
                headers.get("Content-Type", ""),
                headers.get("User-Agent", ""),
            )
        )
        for fault in self.faults:
            hit = fault.times > 0 and fault.method == method and fault.plural == plural
            if hit and fault.name in (None, request.name):
                fault.times -= 1
                raise kmock.KubernetesError(status=fault.status, reason="Injected", message=fault.message)
        for hook in self.hooks:
            if hook.times > 0 and hook.method == method and hook.plural == plural:
                hook.times -= 1
                async with self._lock:
                    hook.fn(self, request)
        try:
            return await super()._handle(request)
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
            # The API server: "the server rejected our request due to an error in our request" (422).
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from None

    async def _render_error(self, exc: Exception) -> Any:
        response = await super()._render_error(exc)
        response.charset = None  # "application/json", as a real API server sends it
        return response


class FakeApiServer:
    """kmock on 127.0.0.1 in a thread; ``url`` is the API server's address."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.emulator: _Emulator | None = None
        self.port = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="fake-apiserver", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"the fake API server did not start: {self._error!r}")
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = requests.Session()

    def _serve(self) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            async with _Emulator() as emulator, kmock.Server(emulator) as server:
                for api, plural in RESOURCES.values():
                    emulator.resources[f"{api}/{plural}"] = {}
                self.emulator, self.port, self._loop = emulator, server.port, asyncio.get_running_loop()
                self._ready.set()
                await self._stop.wait()

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by __init__
            self._error = exc
            self._ready.set()

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self.http.close()

    def __enter__(self) -> FakeApiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the test's own access (plain HTTP, as kubectl would)

    def path(self, kind: str, namespace: str | None = None, name: str | None = None) -> str:
        api, plural = RESOURCES[kind]
        base = f"/api/{api}" if "/" not in api else f"/apis/{api}"
        ns = f"/namespaces/{namespace}" if namespace and kind not in CLUSTER_SCOPED else ""
        return f"{self.url}{base}{ns}/{plural}" + (f"/{name}" if name else "")

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", secrets.token_hex(16))
        meta.setdefault("creationTimestamp", now_text())
        r = self.http.post(self.path(obj["kind"], meta.get("namespace")), json=obj, timeout=10)
        r.raise_for_status()
        return r.json()

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        r = self.http.get(self.path(kind, namespace, name), timeout=10)
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return r.json()

    def list(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        r = self.http.get(self.path(kind, namespace), timeout=10)
        r.raise_for_status()
        return r.json()["items"]

    def json_patch(
        self, kind: str, namespace: str | None, name: str, ops: list[dict[str, Any]]
    ) -> dict[str, Any]:
        r = self.http.patch(
            self.path(kind, namespace, name),
            data=json.dumps(ops),
            headers={"Content-Type": "application/json-patch+json"},
            timeout=10,
        )
        r.raise_for_status()
        return r.json()

    def delete(self, kind: str, namespace: str | None, name: str) -> None:
        self.http.delete(self.path(kind, namespace, name), timeout=10)

    # -- faults and concurrent writers

    def fail(self, method: str, kind: str, status: int, *, times: int = 1, name: str | None = None) -> Fault:
        assert self.emulator is not None
        fault = Fault(method.upper(), RESOURCES[kind][1], status, times, name)
        self.emulator.faults.append(fault)
        return fault

    def before(self, method: str, kind: str, fn: Callable[[dict[str, Any]], None], *, times: int = 1) -> Hook:
        """Run ``fn(stored_object)`` inside the server just before the next such request is handled."""

        def hook(emulator: Any, request: Any) -> None:
            obj = emulator.objects[request.resource, request.namespace, request.name]
            raw = json.loads(json.dumps(obj.raw))
            fn(raw)
            obj.create(raw)

        assert self.emulator is not None
        item = Hook(method.upper(), RESOURCES[kind][1], hook, times)
        self.emulator.hooks.append(item)
        return item

    @property
    def seen(self) -> list[tuple[str, str, str, str]]:
        assert self.emulator is not None
        return list(self.emulator.seen)

    @property
    def patches(self) -> list[tuple[str, str]]:
        """(path, content type) of every PATCH the server received."""
        return [(path.split("?")[0], ctype) for method, path, ctype, _ in self.seen if method == "PATCH"]

    def requests_by(self, agent_prefix: str) -> list[tuple[str, str]]:
        """(method, path) of the requests whose User-Agent starts with ``agent_prefix``."""
        return [(m, p.split("?")[0]) for m, p, _, ua in self.seen if ua.startswith(agent_prefix)]

    def kubeconfig(self, path: Path, namespace: str = "avika") -> Path:
        """A kubeconfig for this server (JSON is YAML); no credentials: the fake checks none."""
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "test", "user": {}}],
                    "contexts": [
                        {
                            "name": "fake",
                            "context": {"cluster": "fake", "user": "test", "namespace": namespace},
                        }
                    ],
                    "current-context": "fake",
                }
            )
        )
        return path


# ---------------------------------------------------------------- the kubelet


READY, CRASHLOOP, IMAGEPULL = "ready", "crashloop", "imagepull"


def pod_status(behaviour: str, container: str, image: str, started: str, created: str) -> dict[str, Any]:
    """``status`` of a pod as the kubelet reports it once the container has had its chance."""
    if behaviour == READY:
        state = {"running": {"startedAt": started}}
        ready, restarts, last = True, 0, {}
    elif behaviour == CRASHLOOP:
        state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off 20s restarting failed container={container} pod=...",
            }
        }
        last = {"terminated": {"exitCode": 1, "reason": "Error", "startedAt": started, "finishedAt": started}}
        ready, restarts = False, 2
    else:
        state = {"waiting": {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}"'}}
        ready, restarts, last = False, 0, {}
    flag = "True" if ready else "False"
    return {
        "phase": "Running" if behaviour != IMAGEPULL else "Pending",
        "conditions": [
            {"type": "Initialized", "status": "True", "lastTransitionTime": created},
            {"type": "Ready", "status": flag, "lastTransitionTime": started},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": started},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": created},
        ],
        "containerStatuses": [
            {
                "name": container,
                "image": image,
                "imageID": "",
                "ready": ready,
                "restartCount": restarts,
                "started": ready,
                "state": state,
                "lastState": last,
            }
        ],
        "startTime": created,
    }


def _ready(pod: dict[str, Any] | None) -> bool:
    if pod is None or pod["metadata"].get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


@dataclass
class Kubelet:
    """The DaemonSet controller and the kubelets of ``nodes``, over HTTP (see the module docstring).

    ``down`` records, at every tick, how many nodes had no Ready pod of each DaemonSet: the most
    pods a rollout ever had down at once.
    """

    api: FakeApiServer
    nodes: list[str]
    behaviour: Callable[[str], str] = lambda image: READY
    start_delay: float = 0.3  # ContainerCreating for this long before the container runs
    created: list[tuple[str, str, str]] = field(default_factory=list)  # (node, pod, image)
    errors: list[str] = field(default_factory=list)
    down: dict[str, list[int]] = field(default_factory=dict)
    _pending: dict[tuple[str, str], float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Kubelet:
        self._thread = threading.Thread(target=self._run, name="kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except (requests.RequestException, KeyError, ValueError) as exc:
                self.errors.append(repr(exc))
            self._stop.wait(0.2)

    def tick(self) -> None:
        for ds in self.api.list("DaemonSet"):
            meta, spec = ds["metadata"], ds["spec"]
            ns = meta.get("namespace", "default")
            match = spec["selector"]["matchLabels"]
            template = spec["template"]
            pods = [
                p
                for p in self.api.list("Pod", ns)
                if all((p["metadata"].get("labels") or {}).get(k) == v for k, v in match.items())
            ]
            on_node = {p["spec"].get("nodeName"): p for p in pods}
            down = sum(1 for node in self.nodes if not _ready(on_node.get(node)))
            self.down.setdefault(meta["name"], []).append(down)
            for node in self.nodes:
                pod = on_node.get(node)
                if pod is None:
                    self._schedule(ds, template, node)
                else:
                    self._run_pod(pod)

    def _schedule(self, ds: dict[str, Any], template: dict[str, Any], node: str) -> None:
        meta = ds["metadata"]
        name = f"{meta['name']}-{secrets.token_hex(3)[:5]}"
        containers = json.loads(json.dumps(template["spec"]["containers"]))
        stamp = now_text()
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": meta.get("namespace", "default"),
                "generateName": meta["name"] + "-",
                "labels": dict(template["metadata"]["labels"]),
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "DaemonSet",
                        "name": meta["name"],
                        "uid": meta.get("uid", ""),
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
                "creationTimestamp": stamp,
            },
            "spec": {**template["spec"], "containers": containers, "nodeName": node},
            "status": {
                "phase": "Pending",
                "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": stamp}],
                "containerStatuses": [
                    {
                        "name": c["name"],
                        "image": c["image"],
                        "ready": False,
                        "restartCount": 0,
                        "state": {"waiting": {"reason": "ContainerCreating"}},
                    }
                    for c in containers
                ],
            },
        }
        self.api.create(pod)
        self._pending[(pod["metadata"]["namespace"], name)] = time.monotonic() + self.start_delay
        self.created.append((node, name, containers[0]["image"]))

    def _run_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        key = (meta["namespace"], meta["name"])
        due = self._pending.get(key)
        if due is None or time.monotonic() < due:
            return
        del self._pending[key]
        container = pod["spec"]["containers"][0]
        status = pod_status(
            self.behaviour(container["image"]),
            container["name"],
            container["image"],
            now_text(),
            meta.get("creationTimestamp", now_text()),
        )
        with contextlib.suppress(requests.HTTPError):  # deleted meanwhile
            self.api.json_patch(
                "Pod",
                meta["namespace"],
                meta["name"],
                [{"op": "replace", "path": "/status", "value": status}],
            )

    def pods(self, namespace: str = "avika") -> list[dict[str, Any]]:
        return self.api.list("Pod", namespace)
