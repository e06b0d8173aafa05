"""The JSON patches (RFC 6902) the controller sends, built from data: no I/O.

Every write is a JSON patch that first ``test``\\ s what the controller read, so a concurrent
change (another controller, ``kubectl set image``, a GitOps sync) makes the API server refuse the
patch (422) instead of being overwritten; the controller then reads again. A strategic-merge
patch would not do: it carries no precondition, and its list semantics differ between a real API
server and a fake one.

- :func:`image_patch`: the container (tested by name and image), annotations, the new image;
- :func:`state_patch` / :func:`state_configmap`: the state ConfigMap's ``state.json``.
"""

from __future__ import annotations

from typing import Any

from controller.plan import ImageChange
from controller.state import STATE_KEY

JsonPatch = list[dict[str, Any]]


def pointer(*parts: str | int) -> str:
    """A JSON pointer (RFC 6901): ``~`` and ``/`` inside a part are escaped."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _test_resource_version(resource_version: str | None) -> JsonPatch:
    # The API server compares it to the stored object: any write since our read fails the patch.
    if not resource_version:
        return []
    return [{"op": "test", "path": "/metadata/resourceVersion", "value": resource_version}]


def image_patch(change: ImageChange) -> JsonPatch:
    container = pointer("spec", "template", "spec", "containers", change.container_index)
    ops: JsonPatch = [
        {"op": "test", "path": container + "/name", "value": change.container},
        {"op": "test", "path": container + "/image", "value": change.from_image},
        *_test_resource_version(change.resource_version),
    ]
    if change.has_annotations:
        ops += [
            {"op": "add", "path": pointer("metadata", "annotations", key), "value": value}
            for key, value in sorted(change.annotations.items())
        ]
    else:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": dict(change.annotations)})
    ops.append({"op": "replace", "path": container + "/image", "value": change.to_image})
    return ops


def state_patch(configmap: dict[str, Any], new_text: str) -> JsonPatch:
    """Replace ``state.json`` in ``configmap`` (as read), testing the text that was there."""
    meta = configmap.get("metadata") or {}
    data = configmap.get("data")
    ops = _test_resource_version(meta.get("resourceVersion"))
    if not isinstance(data, dict):
        return [*ops, {"op": "add", "path": "/data", "value": {STATE_KEY: new_text}}]
    if STATE_KEY not in data:
        return [*ops, {"op": "add", "path": pointer("data", STATE_KEY), "value": new_text}]
    return [
        *ops,
        {"op": "test", "path": pointer("data", STATE_KEY), "value": data[STATE_KEY]},
        {"op": "replace", "path": pointer("data", STATE_KEY), "value": new_text},
    ]


def state_configmap(namespace: str, name: str, text: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "avika-controller", "app.kubernetes.io/component": "state"},
        },
        "data": {STATE_KEY: text},
    }
