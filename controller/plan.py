"""The reconcile core: manifest + workloads + pods + nodes + state + now -> actions (DESIGN section 10).

Pure, like :mod:`agent.decide`: ``avika-controller plan`` prints what this returns for
``kubectl get -o json`` files, and ``run`` applies it to the cluster. One action per workload and
one per pod, each with one reason.

A workload's action, the first rule that applies (``T`` = the manifest's image, pinned as
``repository@sha256:...`` when it names a digest; ``V`` = its version):

1. no ``container_image`` in the manifest, or a workload without the named container:
   ``none`` (``no_container_image``, ``invalid_workload``);
2. the template already runs ``T``:
   a. a pod on ``T`` in CrashLoopBackOff or ImagePullBackOff (or ErrImagePull, InvalidImageName),
      a Deployment past its progress deadline, or a pod on ``T`` not Ready ``progress_deadline``
      after it was created: ``rollback`` to ``avika.io/previous-image`` (``unhealthy``) and
      (V, T) is recorded as bad; GitOps-managed: ``report_only`` (revert it in git);
   b. (V, T) is bad (and its pods are healthy): ``none`` (``bad_version``): nothing moves to it;
   c. otherwise the rollout goes on: ``none`` with ``rolling``, ``watching`` (Ready, inside the
      health window), ``halted`` (percent 0: nothing new starts) or ``up_to_date``;
3. the template runs another image:
   a. percent 0 and no ``min_version`` forcing: ``none`` (``halted``);
   b. the template's version equals V (``up_to_date``) or is newer without ``downgrade``
      (``older_than_running``): ``none``;
   c. (V, T) is bad in this cluster: ``none`` (``bad_version``): the rollback sticks;
   d. outside the wave: ``none`` (``not_in_wave``); a DaemonSet with ``OnDelete`` is in the wave
      when one of its nodes is (``fnv1a32(salt + node) % 100 < percent``), any other workload when
      ``fnv1a32(salt + cluster + "/" + namespace + "/" + name) % 100 < percent``; a workload below
      ``min_version`` is always in (``below_min_version``);
   e. managed by Argo CD, Flux or Helm without ``avika.io/allow-patch: "true"``: ``report_only``
      (``gitops_managed``, with the image change to make in git);
   f. ``patch_image`` (``in_wave``).

Pods of an ``OnDelete`` workload (DaemonSet per node; StatefulSet whole) move when deleted: a pod
not on the template's image is deleted when its node is in the wave (``in_wave``), or at once
when it runs an image recorded as bad (``rollback``), at most ``avika.io/max-unavailable`` pods
down at a time: a pod not Ready, terminating, or not yet replaced counts as down, so each
replacement is Ready before the next pod goes (``wave_full`` until then). A pod that is already
down costs nothing to replace. Other pods: ``none`` with ``up_to_date``, ``starting``,
``watching``, ``not_in_wave``, ``halted``, ``node_not_ready``, ``terminating``, ``rolling``
(Kubernetes' own rolling update moves it) or ``bad_version``.

Each workload also gets a :class:`Status`: the lifecycle report it owes (``update_available``,
``restarting``, ``watching``, ``committed``, ``rolled_back``, ``failed``), or none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from packaging.version import InvalidVersion

from agent.manifest import Manifest, format_time, parse_version, rollout_bucket
from controller.objects import (
    ANN_IMAGE,
    ANN_PREVIOUS_IMAGE,
    ANN_PREVIOUS_VERSION,
    ANN_VERSION,
    Node,
    Pod,
    Workload,
    parse_node,
    parse_workload,
    pinned_image,
    pods_of,
)
from controller.state import BadVersion, ControllerState

PATCH_IMAGE, DELETE_POD, REPORT_ONLY, ROLLBACK, NONE = (
    "patch_image",
    "delete_pod",
    "report_only",
    "rollback",
    "none",
)
ACTIONS = (PATCH_IMAGE, DELETE_POD, REPORT_ONLY, ROLLBACK, NONE)
# States of DESIGN section 5 a workload reports; "watching" and "restarting" as a VM agent's.
UPDATE_AVAILABLE, RESTARTING, WATCHING = "update_available", "restarting", "watching"
COMMITTED, ROLLED_BACK, FAILED = "committed", "rolled_back", "failed"


@dataclass(frozen=True)
class Settings:
    cluster: str
    health_window: int = 300  # AVIKA_HEALTH_WINDOW, seconds
    progress_deadline: int = 600  # AVIKA_PROGRESS_DEADLINE: a new pod not Ready by then is unhealthy


@dataclass(frozen=True)
class Action:
    kind: str
    namespace: str
    name: str
    action: str
    image: str | None
    reason: str
    node: str | None = None
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "action": self.action,
            "image": self.image,
            "reason": self.reason,
            "node": self.node,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class ImageChange:
    """What ``patch_image`` and ``rollback`` change: the adapter turns it into a JSON patch that
    tests ``from_image`` first, so a concurrent change is never overwritten."""

    kind: str
    namespace: str
    name: str
    container: str
    container_index: int
    from_image: str
    to_image: str
    annotations: Mapping[str, str]
    has_annotations: bool
    resource_version: str | None


@dataclass(frozen=True)
class Status:
    """The report a workload owes: ``state`` None means nothing new (a heartbeat at most)."""

    agent_id: str
    state: str | None
    version: str
    target_version: str | None
    in_wave: bool | None = None
    image: str | None = None
    failed_state: str | None = None
    error: str | None = None
    last_result: str = ""


@dataclass(frozen=True)
class WorkloadPlan:
    workload: Workload
    action: Action
    pods: tuple[Action, ...] = ()
    change: ImageChange | None = None
    bad: BadVersion | None = None
    status: Status | None = None


@dataclass(frozen=True)
class Plan:
    serial: int
    version: str
    image: str | None
    percent: int
    workloads: tuple[WorkloadPlan, ...]
    skipped: tuple[str, ...] = field(default=())  # workloads without avika.io/updates=enabled

    def actions(self) -> list[Action]:
        return [a for wp in self.workloads for a in (wp.action, *wp.pods)]

    def to_dict(self) -> dict[str, Any]:
        """``plan --json`` (DESIGN section 10)."""
        return {
            "serial": self.serial,
            "version": self.version,
            "image": self.image,
            "percent": self.percent,
            "actions": [a.to_dict() for a in self.actions()],
            "bad_versions": [
                {"version": wp.bad.version, "image": wp.bad.image} for wp in self.workloads if wp.bad
            ],
            "skipped": list(self.skipped),
        }


# ---------------------------------------------------------------- context


def _version(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return parse_version(text)
    except InvalidVersion:
        return None


@dataclass(frozen=True)
class _Context:
    manifest: Manifest
    target: str | None
    state: ControllerState
    settings: Settings
    now: datetime
    nodes: Mapping[str, Node]

    @property
    def version(self) -> str:
        return self.manifest.version

    def forced(self, current: str | None) -> bool:
        """``min_version`` forces a workload below it, as it forces an agent (DESIGN section 2)."""
        m, cur = self.manifest, _version(current)
        if not m.min_version or cur is None:
            return False
        floor = parse_version(m.min_version)
        return cur < floor <= m.parsed_version

    def node_in_wave(self, node: str) -> bool:
        return rollout_bucket(node, self.manifest.rollout.salt) < self.manifest.rollout.percent

    def workload_in_wave(self, w: Workload) -> bool:
        bucket_id = f"{self.settings.cluster}/{w.namespace}/{w.name}"
        return rollout_bucket(bucket_id, self.manifest.rollout.salt) < self.manifest.rollout.percent

    def node_ready(self, name: str | None) -> bool:
        node = self.nodes.get(name or "")
        return node is None or node.ready  # a node we were not shown is taken as ready


# ---------------------------------------------------------------- health


def unhealthy(ctx: _Context, w: Workload, pods: Sequence[Pod], image: str) -> tuple[str, str] | None:
    """(reason code, detail) when the pods on ``image`` show it will not run, else None."""
    for pod in pods:
        if pod.image != image or pod.terminating:
            continue
        reason = pod.unhealthy_reason()
        if reason:
            where = f" on {pod.node}" if pod.node else ""
            why = f" ({pod.message})" if pod.message else ""
            return reason, f"{reason}: pod {pod.name}{where} runs {image}{why}"
    if w.progress_deadline_exceeded:
        return "ProgressDeadlineExceeded", f"ProgressDeadlineExceeded: {w.ref} stopped progressing on {image}"
    if w.kind == "Deployment":
        return None  # a Deployment has its own progress deadline (above)
    deadline = timedelta(seconds=ctx.settings.progress_deadline)
    for pod in pods:
        # Not on a NotReady node: there the pod waits for the node, not for the release.
        stuck = not pod.ready and not pod.terminating and pod.created is not None and ctx.node_ready(pod.node)
        if pod.image == image and stuck and ctx.now - pod.created > deadline:  # type: ignore[operator]
            return "NotReady", (
                f"NotReady: pod {pod.name} on {pod.node or '?'} is not Ready "
                f"{ctx.settings.progress_deadline} s after it was created"
            )
    return None


def _pod_settled(ctx: _Context, pod: Pod) -> str:
    """For a pod on the desired image: ``starting``, ``watching`` or ``up_to_date``."""
    healthy = pod.healthy_since(ctx.now)
    if healthy is None:
        return "starting"
    return "watching" if healthy < ctx.settings.health_window else "up_to_date"


def _unavailable(w: Workload, pods: Sequence[Pod]) -> int:
    """Pods down now: not Ready, terminating, or not there yet (fewer live pods than desired)."""
    live = [p for p in pods if not p.terminating]
    missing = max(0, (w.desired if w.desired is not None else len(live)) - len(live))
    return missing + sum(1 for p in pods if p.terminating or not p.ready)


# ---------------------------------------------------------------- pods


def stage_pods(
    ctx: _Context,
    w: Workload,
    pods: Sequence[Pod],
    desired: str,
    in_scope: Callable[[Pod], bool],
    *,
    halted: bool,
    returning: frozenset[str],
    hold_reason: str | None = None,
) -> list[Action]:
    """Pod actions of an ``OnDelete`` workload moving to ``desired`` (see the module docstring).

    ``returning``: images whose pods go back to ``desired`` whatever the wave (rolled-back releases).
    ``hold_reason``: no pod moves toward ``desired`` (its pods on bad images still return).
    """
    budget = w.max_unavailable()
    down = _unavailable(w, pods)
    # Pods that are down already go first: replacing them costs nothing.
    order = sorted(pods, key=lambda p: (p.ready, p.node or "", p.name))
    decided: dict[str, Action] = {}
    for pod in order:

        def act(action: str, reason: str, detail: str | None = None, pod: Pod = pod) -> None:
            image = desired if action == DELETE_POD else pod.image
            decided[pod.name] = Action(
                "Pod", pod.namespace, pod.name, action, image, reason, pod.node, detail
            )

        if pod.terminating:
            act(NONE, "terminating")
            continue
        if pod.image == desired:
            act(NONE, _pod_settled(ctx, pod))
            continue
        back = pod.image in returning
        if not back and hold_reason:
            act(NONE, hold_reason)
        elif not back and halted:
            act(NONE, "halted")
        elif not back and not in_scope(pod):
            act(NONE, "not_in_wave")
        elif not ctx.node_ready(pod.node):
            act(NONE, "node_not_ready")
        elif not pod.ready:
            act(DELETE_POD, "rollback" if back else "in_wave", "not Ready: replaced at no cost")
        elif down < budget:
            down += 1
            act(DELETE_POD, "rollback" if back else "in_wave")
        else:
            act(NONE, "wave_full", f"{down} of at most {budget} pod(s) down (avika.io/max-unavailable)")
    return [decided[p.name] for p in pods]


def rolling_pods(ctx: _Context, pods: Sequence[Pod], desired: str | None, reason_other: str) -> list[Action]:
    """Pods of a workload Kubernetes rolls itself: information only."""
    out = []
    for pod in pods:
        if pod.terminating:
            reason = "terminating"
        elif pod.image == desired:
            reason = _pod_settled(ctx, pod)
        else:
            reason = reason_other
        out.append(Action("Pod", pod.namespace, pod.name, NONE, pod.image, reason, pod.node))
    return out


def progress(
    ctx: _Context, w: Workload, pods: Sequence[Pod], image: str, in_scope: Callable[[Pod], bool]
) -> str:
    """``rolling``, ``watching`` or ``up_to_date`` for a workload whose template runs ``image``."""
    live = [p for p in pods if not p.terminating]
    scoped = [p for p in live if in_scope(p)]
    if w.on_delete:
        missing = max(0, (w.desired if w.desired is not None else len(live)) - len(live))
    else:
        missing = max(0, (w.desired or 0) - sum(1 for p in live if p.image == image))
    if missing or any(p.image != image or not p.ready for p in scoped):
        return "rolling"
    if any(_pod_settled(ctx, p) != "up_to_date" for p in scoped):
        return "watching"
    return "up_to_date"


# ---------------------------------------------------------------- one workload


def _action(w: Workload, action: str, image: str | None, reason: str, detail: str | None = None) -> Action:
    return Action(w.kind, w.namespace, w.name, action, image, reason, None, detail)


def _change(w: Workload, to_image: str, annotations: Mapping[str, str]) -> ImageChange:
    assert w.container_index is not None and w.image is not None  # a workload with a problem never moves
    return ImageChange(
        kind=w.kind,
        namespace=w.namespace,
        name=w.name,
        container=w.container,
        container_index=w.container_index,
        from_image=w.image,
        to_image=to_image,
        annotations=dict(annotations),
        has_annotations=bool(w.annotations),
        resource_version=w.resource_version,
    )


def plan_workload(ctx: _Context, w: Workload, pods: Sequence[Pod]) -> WorkloadPlan:
    agent_id = w.agent_id(ctx.settings.cluster)
    current = w.version_of(w.image)
    shown_version = current or "unknown"

    def status(state: str | None, reason: str, **kw: Any) -> Status:
        kw.setdefault("version", shown_version)
        kw.setdefault("target_version", ctx.version)
        return Status(agent_id, state, last_result=reason, **kw)

    def informational(reason: str) -> list[Action]:
        return rolling_pods(ctx, pods, w.image, reason)

    if w.problem is not None:
        return WorkloadPlan(
            w,
            _action(w, NONE, w.image, "invalid_workload", w.problem),
            status=status(None, "invalid_workload"),
        )
    target = ctx.target
    if target is None:
        detail = f"manifest serial {ctx.manifest.serial} names no container_image"
        return WorkloadPlan(
            w,
            _action(w, NONE, None, "no_container_image", detail),
            tuple(informational("up_to_date")),
            status=status(None, "no_container_image", target_version=None),
        )
    rollout = ctx.manifest.rollout
    forced = ctx.forced(current)
    halted = rollout.halted and not forced
    bad_images = ctx.state.bad_images()
    manager = w.manager

    if w.kind == "DaemonSet" and w.on_delete:
        nodes = set(ctx.nodes) | {p.node for p in pods if p.node}
        wave_nodes = {n for n in nodes if forced or ctx.node_in_wave(n)}
        in_wave = bool(wave_nodes)

        def in_scope(p: Pod) -> bool:
            return p.node in wave_nodes
    else:
        in_wave = forced or ctx.workload_in_wave(w)

        def in_scope(p: Pod) -> bool:
            return True

    # 2. the template already runs the target
    if w.image == target:
        trouble = unhealthy(ctx, w, pods, target)
        if trouble is not None:
            return _roll_back(ctx, w, pods, trouble, manager, status)
        if ctx.state.is_bad(ctx.version, target):
            hold = stage_pods(
                ctx, w, pods, target, in_scope, halted=True, returning=frozenset(), hold_reason="bad_version"
            )
            return WorkloadPlan(
                w,
                _action(
                    w,
                    NONE,
                    target,
                    "bad_version",
                    f"{ctx.version} ({target}) was rolled back in this cluster",
                ),
                tuple(hold if w.on_delete else informational("bad_version")),
                status=status(None, "bad_version"),
            )
        if w.on_delete:
            pod_actions = stage_pods(ctx, w, pods, target, in_scope, halted=halted, returning=bad_images)
        else:
            pod_actions = rolling_pods(ctx, pods, target, "rolling")
        state = progress(ctx, w, pods, target, in_scope)
        if halted and any(a.reason == "halted" for a in pod_actions):
            return WorkloadPlan(
                w, _action(w, NONE, target, "halted"), tuple(pod_actions), status=status(None, "halted")
            )
        report = {"rolling": RESTARTING, "watching": WATCHING, "up_to_date": COMMITTED}[state]
        previous = ctx.state.reported.get(agent_id)
        if report == COMMITTED and not (
            previous is not None
            and previous.state in (RESTARTING, WATCHING)
            and previous.target_version == ctx.version
        ):
            report = None  # nothing of ours to commit: it was there before we came
        # While pods move, the workload reports as a VM agent does: restarting from the old version.
        from_version = w.annotations.get(ANN_PREVIOUS_VERSION) or ctx.version
        return WorkloadPlan(
            w,
            _action(w, NONE, target, state),
            tuple(pod_actions),
            status=status(
                report, state, version=from_version if report == RESTARTING else ctx.version, in_wave=in_wave
            ),
        )

    # 3. the template runs another image
    def held(
        reason: str, detail: str | None = None, report: str | None = None, action: str = NONE, **kw: Any
    ) -> WorkloadPlan:
        if w.on_delete:
            assert w.image is not None
            pod_actions = stage_pods(
                ctx, w, pods, w.image, lambda p: False, halted=True, returning=bad_images, hold_reason=reason
            )
        else:
            pod_actions = informational(reason)
        return WorkloadPlan(
            w,
            _action(w, action, target, reason, detail),
            tuple(pod_actions),
            status=status(report, reason, **kw),
        )

    if halted:
        return held("halted", f"{ctx.version} is halted (rollout 0 %)")
    cur, new = _version(current), ctx.manifest.parsed_version
    if cur is not None and cur == new:
        return held("up_to_date", f"the template runs {ctx.version} as {w.image}")
    if cur is not None and cur > new and not ctx.manifest.downgrade:
        return held("older_than_running", f"the template runs {current}, newer than {ctx.version}")
    if ctx.state.is_bad(ctx.version, target):
        return held(
            "bad_version", f"{ctx.version} ({target}) was rolled back in this cluster; not applied again"
        )
    if not in_wave:
        return held("not_in_wave", None, UPDATE_AVAILABLE, in_wave=False, image=target)
    if manager is not None:
        detail = (
            f"managed by {manager}: set the image of container {w.container!r} in {w.ref} to {target} "
            f'in git (a patch would be undone by the next sync; annotate avika.io/allow-patch: "true" '
            f"to let the controller patch it)"
        )
        return held("gitops_managed", detail, UPDATE_AVAILABLE, REPORT_ONLY, in_wave=True, image=target)

    reason = "below_min_version" if forced else "in_wave"
    change = _change(
        w,
        target,
        {
            ANN_PREVIOUS_IMAGE: w.image or "",
            ANN_PREVIOUS_VERSION: current or "",
            ANN_IMAGE: target,
            ANN_VERSION: ctx.version,
        },
    )
    if w.on_delete:
        pod_actions = stage_pods(ctx, w, pods, target, in_scope, halted=False, returning=bad_images)
    else:
        pod_actions = rolling_pods(ctx, pods, target, "rolling")
    return WorkloadPlan(
        w,
        _action(w, PATCH_IMAGE, target, reason, f"{w.image} -> {target}"),
        tuple(pod_actions),
        change=change,
        status=status(RESTARTING, reason, in_wave=True, image=target),
    )


def _roll_back(
    ctx: _Context,
    w: Workload,
    pods: Sequence[Pod],
    trouble: tuple[str, str],
    manager: str | None,
    status: Callable[..., Status],
) -> WorkloadPlan:
    """Rule 2a: the new image will not run; put the previous one back and remember the pair as bad."""
    code, detail = trouble
    target = ctx.target
    assert target is not None
    bad = BadVersion(ctx.version, target, w.agent_id(ctx.settings.cluster), code, format_time(ctx.now))
    previous = w.previous_image
    if previous is None or previous == target:
        detail += f"; no {ANN_PREVIOUS_IMAGE} to roll back to"
        return WorkloadPlan(
            w,
            _action(w, NONE, target, "unhealthy", detail),
            tuple(rolling_pods(ctx, pods, target, "unhealthy")),
            bad=bad,
            status=status(FAILED, "unhealthy", version=ctx.version, failed_state=WATCHING, error=detail),
        )
    previous_version = w.version_of(previous) or "unknown"
    if manager is not None:
        detail += f"; managed by {manager}: revert the image to {previous} in git"
        return WorkloadPlan(
            w,
            _action(w, REPORT_ONLY, previous, "unhealthy", detail),
            tuple(rolling_pods(ctx, pods, target, "unhealthy")),
            bad=bad,
            status=status(FAILED, "unhealthy", version=ctx.version, failed_state=WATCHING, error=detail),
        )
    change = _change(w, previous, {ANN_IMAGE: previous, ANN_VERSION: previous_version})
    if w.on_delete:
        pod_actions = stage_pods(
            ctx, w, pods, previous, lambda p: False, halted=True, returning=ctx.state.bad_images() | {target}
        )
    else:
        pod_actions = rolling_pods(ctx, pods, previous, "rolling")
    return WorkloadPlan(
        w,
        _action(w, ROLLBACK, previous, "unhealthy", detail),
        tuple(pod_actions),
        change=change,
        bad=bad,
        status=status(
            ROLLED_BACK, "unhealthy", version=previous_version, failed_state=WATCHING, error=detail
        ),
    )


# ---------------------------------------------------------------- the whole cluster


def reconcile(
    manifest: Manifest,
    workloads: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    nodes: Iterable[Mapping[str, Any]],
    state: ControllerState,
    settings: Settings,
    now: datetime,
) -> Plan:
    """Every managed workload's plan. ``ObjectError`` for input that is not Kubernetes objects."""
    pod_list = list(pods)
    node_map = {n.name: n for n in (parse_node(obj) for obj in nodes)}
    target = (
        pinned_image(manifest.container_image, manifest.container_digest)
        if manifest.container_image
        else None
    )
    ctx = _Context(manifest, target, state, settings, now, node_map)
    plans, skipped, seen = [], [], set()
    for obj in workloads:
        w = parse_workload(obj)
        key = (w.kind, w.namespace, w.name)
        if key in seen:
            continue
        seen.add(key)
        if not w.enabled:
            skipped.append(w.ref)
            continue
        plans.append(plan_workload(ctx, w, pods_of(w, pod_list)))
    plans.sort(key=lambda p: (p.workload.kind, p.workload.namespace, p.workload.name))
    return Plan(
        manifest.serial,
        manifest.version,
        target,
        manifest.rollout.percent,
        tuple(plans),
        tuple(sorted(skipped)),
    )
