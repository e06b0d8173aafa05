"""What the controller remembers between loops and replicas: the state ConfigMap's ``state.json``.

Pure: JSON text in, a :class:`ControllerState` out, and back. The runner keeps it in the
ConfigMap ``AVIKA_STATE_CONFIGMAP`` (default ``avika-controller-state``, in the controller's own
namespace) and changes it only with a JSON patch that tests the text it read, so two writers never
lose each other's change.

- ``highest_serial`` / ``digest``: the trust state of DESIGN section 2, as an agent keeps it (the
  serial rule: never below the highest accepted; an equal serial only with identical bytes).
- ``bad``: (version, image) pairs rolled back in this cluster, with the workload and reason. A
  pair here is never applied again (DESIGN section 10, "the rollback that sticks"): a re-sign of
  the same release does not clear it; only a manifest naming another image (another digest) moves.
- ``reported``: per workload agent id, the last lifecycle state reported, so a restart or a new
  leader does not report a rollout twice.

A file that does not parse is refused (:class:`StateError`), never replaced by an empty state:
an empty state would forget the bad versions and re-apply a release that was rolled back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from agent.manifest import TrustState

STATE_KEY = "state.json"
FORMAT = 1
MAX_BAD = 200  # oldest forgotten first; a cluster that rolled back 200 releases has other problems
MAX_ERROR = 300


class StateError(ValueError):
    """The stored state is unreadable: the controller stops acting until an operator looks."""


@dataclass(frozen=True)
class BadVersion:
    version: str
    image: str
    workload: str
    reason: str
    time: str

    def to_dict(self) -> dict[str, str]:
        return {
            "version": self.version,
            "image": self.image,
            "workload": self.workload,
            "reason": self.reason,
            "time": self.time,
        }


@dataclass(frozen=True)
class Reported:
    """The last lifecycle report of one workload (what ``plan`` compares a new status against)."""

    state: str
    version: str
    target_version: str | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "version": self.version,
            "target_version": self.target_version,
            "error": self.error,
        }


@dataclass(frozen=True)
class ControllerState:
    highest_serial: int | None = None
    digest: str | None = None
    bad: tuple[BadVersion, ...] = ()
    reported: Mapping[str, Reported] = field(default_factory=dict)

    @property
    def trust(self) -> TrustState:
        return TrustState(self.highest_serial, self.digest)

    def is_bad(self, version: str, image: str | None) -> bool:
        return image is not None and any(b.version == version and b.image == image for b in self.bad)

    def bad_images(self) -> frozenset[str]:
        return frozenset(b.image for b in self.bad)

    def with_trust(self, serial: int, digest: str) -> ControllerState:
        return replace(self, highest_serial=serial, digest=digest)

    def with_bad(self, bad: BadVersion) -> ControllerState:
        if self.is_bad(bad.version, bad.image):
            return self
        return replace(self, bad=(*self.bad, bad)[-MAX_BAD:])

    def with_reported(self, agent_id: str, reported: Reported) -> ControllerState:
        return replace(self, reported={**self.reported, agent_id: reported})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "highest_serial": self.highest_serial,
            "digest": self.digest,
            "bad": [b.to_dict() for b in self.bad],
            "reported": {k: v.to_dict() for k, v in sorted(self.reported.items())},
        }

    def to_text(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"


def _str(obj: Mapping[str, Any], name: str, where: str, *, optional: bool = False) -> str | None:
    value = obj.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise StateError(f"{where}: field {name!r} must be a string")
    return value


def parse_state(text: str | None) -> ControllerState:
    """``state.json`` as stored; None or "" (no ConfigMap yet) is the empty state."""
    if not text:
        return ControllerState()
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise StateError(f"{STATE_KEY} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateError(f"{STATE_KEY} is not a format-{FORMAT} controller state")
    serial = doc.get("highest_serial")
    if serial is not None and (not isinstance(serial, int) or isinstance(serial, bool) or serial < 1):
        raise StateError(f"{STATE_KEY}: highest_serial must be a positive integer")
    digest = _str(doc, "digest", STATE_KEY, optional=True)
    bad_list = doc.get("bad") or []
    if not isinstance(bad_list, list):
        raise StateError(f"{STATE_KEY}: bad must be a list")
    bad = []
    for i, entry in enumerate(bad_list):
        where = f"{STATE_KEY}: bad[{i}]"
        if not isinstance(entry, dict):
            raise StateError(f"{where} must be an object")
        bad.append(
            BadVersion(
                version=_str(entry, "version", where) or "",
                image=_str(entry, "image", where) or "",
                workload=_str(entry, "workload", where, optional=True) or "",
                reason=_str(entry, "reason", where, optional=True) or "",
                time=_str(entry, "time", where, optional=True) or "",
            )
        )
    reported_doc = doc.get("reported") or {}
    if not isinstance(reported_doc, dict):
        raise StateError(f"{STATE_KEY}: reported must be an object")
    reported = {}
    for agent_id, entry in reported_doc.items():
        where = f"{STATE_KEY}: reported[{agent_id!r}]"
        if not isinstance(entry, dict):
            raise StateError(f"{where} must be an object")
        reported[agent_id] = Reported(
            state=_str(entry, "state", where) or "",
            version=_str(entry, "version", where) or "",
            target_version=_str(entry, "target_version", where, optional=True),
            error=_str(entry, "error", where, optional=True),
        )
    return ControllerState(serial, digest, tuple(bad), reported)


def state_from_document(doc: Any) -> ControllerState:
    """``plan --state FILE``: the ConfigMap as ``kubectl get configmap -o json`` prints it, or its
    ``state.json`` alone."""
    if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
        data = doc.get("data") or {}
        return parse_state(data.get(STATE_KEY) if isinstance(data, dict) else None)
    return parse_state(json.dumps(doc))
