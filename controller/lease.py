"""One replica acts: leader election over a ``coordination.k8s.io/v1`` Lease, decided on data.

:func:`lease_step` looks at the Lease as read and says what to send: ``create`` it (none yet),
``renew`` it (ours), ``take`` it (its holder stopped renewing for ``leaseDurationSeconds``), or
``wait`` (another replica holds it). Each write is a JSON patch that tests the holder it read
(and ``resourceVersion`` when the server keeps one), so of two replicas that race for an expired
Lease, exactly one wins; the other's patch is refused (422) and it waits. Times are never tested:
a client may rewrite their format (lightkube drops zero microseconds).
A leader that cannot renew stops acting at once (the runner checks before every pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from controller.changes import JsonPatch
from controller.objects import timestamp

CREATE, RENEW, TAKE, WAIT = "create", "renew", "take", "wait"


def micro_time(moment: datetime) -> str:
    """A Kubernetes ``MicroTime``: RFC 3339 with microseconds, in UTC."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class LeaseStep:
    kind: str  # create | renew | take | wait
    holder: str | None  # who holds it now (as read)
    body: dict[str, Any] | None = None  # create
    ops: JsonPatch | None = None  # renew, take
    expires: datetime | None = None  # when the current holder's claim runs out (wait)


def _spec(lease: dict[str, Any] | None) -> dict[str, Any]:
    spec = (lease or {}).get("spec")
    return spec if isinstance(spec, dict) else {}


def lease_step(
    lease: dict[str, Any] | None, me: str, now: datetime, duration: int, *, namespace: str, name: str
) -> LeaseStep:
    stamp = micro_time(now)
    if lease is None:
        return LeaseStep(
            CREATE,
            None,
            body={
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {
                    "holderIdentity": me,
                    "leaseDurationSeconds": duration,
                    "acquireTime": stamp,
                    "renewTime": stamp,
                    "leaseTransitions": 0,
                },
            },
        )
    spec = _spec(lease)
    holder = spec.get("holderIdentity") or None
    renewed = timestamp(spec.get("renewTime"))
    held_for = spec.get("leaseDurationSeconds")
    held_for = held_for if isinstance(held_for, int) and held_for > 0 else duration
    rv = ((lease.get("metadata") or {}).get("resourceVersion")) or None
    guard: JsonPatch = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv}] if rv else []
    if "holderIdentity" in spec:
        # The holder as read ("" after a release included): of two replicas taking the Lease, the
        # second one's test fails. Times are not tested: a client may rewrite their format.
        guard.append({"op": "test", "path": "/spec/holderIdentity", "value": spec["holderIdentity"]})
    if holder == me:
        return LeaseStep(
            RENEW,
            holder,
            ops=[
                *guard,
                {"op": "add", "path": "/spec/renewTime", "value": stamp},
                {"op": "add", "path": "/spec/leaseDurationSeconds", "value": duration},
            ],
        )
    expires = renewed + timedelta(seconds=held_for) if renewed else None
    if holder is None or expires is None or expires < now:
        transitions = spec.get("leaseTransitions")
        transitions = transitions if isinstance(transitions, int) and transitions >= 0 else 0
        return LeaseStep(
            TAKE,
            holder,
            ops=[
                *guard,
                {"op": "add", "path": "/spec/holderIdentity", "value": me},
                {"op": "add", "path": "/spec/acquireTime", "value": stamp},
                {"op": "add", "path": "/spec/renewTime", "value": stamp},
                {"op": "add", "path": "/spec/leaseDurationSeconds", "value": duration},
                {"op": "add", "path": "/spec/leaseTransitions", "value": transitions + (holder is not None)},
            ],
        )
    return LeaseStep(WAIT, holder, expires=expires)


def release_ops(lease: dict[str, Any], me: str) -> JsonPatch | None:
    """On a clean stop: give the Lease up (holder emptied) so another replica takes over at once."""
    spec = _spec(lease)
    if spec.get("holderIdentity") != me:
        return None
    return [
        {"op": "test", "path": "/spec/holderIdentity", "value": me},
        {"op": "add", "path": "/spec/holderIdentity", "value": ""},
    ]
