"""The in-cluster loop: Lease, manifest, plan, apply, report (DESIGN section 10).

One pass (:meth:`Controller.step`), every ``AVIKA_RECONCILE_INTERVAL``:

1. hold the Lease (create, renew or take it; :mod:`controller.lease`); a replica that does not hold
   it does nothing else;
2. read the state ConfigMap; an unreadable one stops the pass (it holds the bad versions: acting
   without them could re-apply a release this cluster rolled back);
3. every ``UPDATE_INTERVAL``, fetch and verify the manifest (:mod:`controller.manifests`) and
   record the new highest serial; between fetches, and after a failed one, the last verified
   envelope stays in force until it expires;
4. list the managed workloads, their pods and the nodes; :func:`controller.plan.reconcile`;
5. per workload, in this order: record a bad version (before the rollback that it causes, so a
   crash in between never re-applies it), patch the image (a JSON patch that tests the image it
   read), delete pods; a conflict skips the rest of that workload until the next pass reads again;
6. report what changed (one agent id per workload; :mod:`controller.reports`), and heartbeats.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from agent.fetch import DownloadError
from agent.manifest import Manifest, ManifestError
from controller.changes import image_patch, state_configmap, state_patch
from controller.config import ControllerConfig
from controller.kube import Conflict, Kube, KubeError, LightkubeKube
from controller.lease import CREATE, RENEW, TAKE, WAIT, lease_step, release_ops
from controller.manifests import ManifestSource
from controller.objects import ObjectError, parse_workload
from controller.plan import DELETE_POD, NONE, Plan, Settings, Status, WorkloadPlan, reconcile
from controller.reports import WorkloadReporter
from controller.state import STATE_KEY, ControllerState, Reported, StateError, parse_state

log = logging.getLogger("controller")

SAVE_ATTEMPTS = 3
# What a pass ended with (``run --once`` exits with its code).
OK, NOT_LEADER, FAILED, REFUSED = "ok", "not_leader", "failed", "refused"
EXIT_CODES = {OK: 0, NOT_LEADER: 0, FAILED: 1, REFUSED: 3}


class Controller:
    def __init__(
        self,
        config: ControllerConfig,
        kube: Kube,
        source: ManifestSource,
        reporter: WorkloadReporter,
        *,
        clock: Callable[[], datetime] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.kube = kube
        self.source = source
        self.reporter = reporter
        self.clock = clock or (lambda: datetime.now(UTC))
        self.monotonic = monotonic
        self.settings = Settings(config.cluster, config.health_window, config.progress_deadline)
        self.started = monotonic()
        self.leader = False
        self.manifest: Manifest | None = None
        self.next_fetch = 0.0
        self.check_error: tuple[str, str] | None = None  # (code, message) of the last refused fetch
        self.last_event: dict[str, float] = {}
        self.last_outcome: dict[str, tuple[str, str]] = {}  # what was last logged per workload
        self._waiting_for: str | None = None

    # -- 1. the Lease

    def hold_lease(self, now: datetime) -> bool:
        cfg = self.config
        lease = self.kube.get("Lease", cfg.namespace, cfg.lease_name)
        step = lease_step(
            lease, cfg.identity, now, cfg.lease_duration, namespace=cfg.namespace, name=cfg.lease_name
        )
        if step.kind == WAIT:
            if self.leader or self._waiting_for != step.holder:
                log.info("standing by: Lease %s is held by %s", cfg.lease_name, step.holder)
            self.leader, self._waiting_for = False, step.holder
            return False
        try:
            if step.kind == CREATE:
                assert step.body is not None
                self.kube.create("Lease", step.body)
            else:
                assert step.ops is not None
                self.kube.patch("Lease", cfg.namespace, cfg.lease_name, step.ops)
        except Conflict as exc:
            if self.leader:
                log.warning("lost Lease %s: %s", cfg.lease_name, exc.message)
            self.leader = False
            return False
        if not self.leader:
            how = {CREATE: "created", TAKE: f"took it over from {step.holder or 'nobody'}", RENEW: "renewed"}
            log.info("leading: Lease %s %s (identity %s)", cfg.lease_name, how[step.kind], cfg.identity)
        self.leader, self._waiting_for = True, None
        return True

    def release_lease(self) -> None:
        if not self.leader:
            return
        cfg = self.config
        try:
            lease = self.kube.get("Lease", cfg.namespace, cfg.lease_name)
            ops = release_ops(lease, cfg.identity) if lease else None
            if ops:
                self.kube.patch("Lease", cfg.namespace, cfg.lease_name, ops)
                log.info("released Lease %s", cfg.lease_name)
        except KubeError as exc:
            log.warning("could not release Lease %s: %s", cfg.lease_name, exc)
        self.leader = False

    # -- 2. the state ConfigMap

    def read_state(self) -> tuple[dict[str, Any] | None, ControllerState]:
        cm = self.kube.get("ConfigMap", self.config.namespace, self.config.state_configmap)
        data = (cm or {}).get("data") or {}
        return cm, parse_state(data.get(STATE_KEY) if isinstance(data, dict) else None)

    def save_state(self, change: Callable[[ControllerState], ControllerState]) -> ControllerState:
        """Read, change, write with a test of what was read; on a conflict, read again."""
        cfg = self.config
        for _ in range(SAVE_ATTEMPTS):
            cm, state = self.read_state()
            new = change(state)
            if new == state:
                return state
            try:
                if cm is None:
                    self.kube.create(
                        "ConfigMap", state_configmap(cfg.namespace, cfg.state_configmap, new.to_text())
                    )
                else:
                    self.kube.patch(
                        "ConfigMap", cfg.namespace, cfg.state_configmap, state_patch(cm, new.to_text())
                    )
            except Conflict:
                continue
            return new
        raise KubeError(
            409, f"ConfigMap {cfg.state_configmap} kept changing under us ({SAVE_ATTEMPTS} attempts)"
        )

    # -- 3. the manifest

    def current_manifest(self, state: ControllerState, now: datetime) -> Manifest | None:
        due = self.monotonic() >= self.next_fetch
        if due:
            self.next_fetch = self.monotonic() + self.config.interval
            try:
                manifest = self.source.fetch(state.trust, now)
            except (ManifestError, DownloadError) as exc:
                code = getattr(exc, "code", "fetch_failed")
                if self.check_error != (code, exc.message):
                    log.error("manifest %s refused: %s: %s", self.source.url, code, exc.message)
                self.check_error = (code, exc.message)
            else:
                self.check_error = None
                if (manifest.serial, manifest.digest) != (state.highest_serial, state.digest):
                    self.save_state(lambda s: s.with_trust(manifest.serial, manifest.digest))
                    log.info(
                        "manifest serial %d verified: %s at %d %%, image %s",
                        manifest.serial,
                        manifest.version,
                        manifest.rollout.percent,
                        manifest.container_image,
                    )
                self.reporter.set_manifest_reports_url(manifest.reports_url)
                self.manifest = manifest
                return manifest
        if self.manifest is None:
            return None
        try:  # the last verified envelope, again: it may have expired since
            self.manifest = self.source.cached(state.trust, now)
        except ManifestError as exc:
            log.error("the last verified manifest no longer holds: %s: %s", exc.code, exc.message)
            self.check_error = (exc.code, exc.message)
            self.manifest = None
        return self.manifest

    # -- the pass

    def step(self) -> str:
        now = self.clock()
        if not self.hold_lease(now):
            return NOT_LEADER
        try:
            _, state = self.read_state()
        except StateError as exc:
            log.error("state ConfigMap %s is unreadable, doing nothing: %s", self.config.state_configmap, exc)
            return FAILED
        manifest = self.current_manifest(state, now)
        workloads = self.kube.list_workloads(self.config.namespaces)
        if manifest is None:
            self.report_check_failure(workloads, state)
            return REFUSED if self.check_error and self.check_error[0] != "fetch_failed" else FAILED
        pods = self.kube.list_pods(workloads)
        nodes = self.kube.list_nodes()
        _, state = self.read_state()  # again: the trust state may have moved just now
        try:
            plan = reconcile(manifest, workloads, pods, nodes, state, self.settings, now)
        except ObjectError as exc:
            log.error("the API server returned an object the plan cannot read: %s", exc)
            return FAILED
        applied = [wp for wp in plan.workloads if self.apply(wp)]
        self.report(plan, applied, state)
        return OK

    def apply(self, wp: WorkloadPlan) -> bool:
        """Act on one workload; False when it must wait for the next pass (conflict, API error)."""
        w, action = wp.workload, wp.action
        try:
            if wp.bad is not None:
                bad = wp.bad
                self.save_state(lambda s: s.with_bad(bad))
                log.warning(
                    "%s: %s (%s) recorded as bad in this cluster: %s",
                    w.ref,
                    bad.version,
                    bad.image,
                    bad.reason,
                )
            if wp.change is not None:
                self.kube.patch(w.kind, w.namespace, w.name, image_patch(wp.change))
                log.info("%s: %s %s: %s", w.ref, action.action, action.reason, action.detail)
            elif action.action != NONE or self.last_outcome.get(w.ref) != (NONE, action.reason):
                log.info(
                    "%s: %s %s%s",
                    w.ref,
                    action.action,
                    action.reason,
                    f": {action.detail}" if action.detail else "",
                )
            self.last_outcome[w.ref] = (action.action, action.reason)
            for pod in wp.pods:
                if pod.action == DELETE_POD:
                    gone = self.kube.delete("Pod", pod.namespace, pod.name)
                    log.info(
                        "%s: deleted pod %s on %s (%s)%s",
                        w.ref,
                        pod.name,
                        pod.node,
                        pod.reason,
                        "" if gone else ": it was already gone",
                    )
        except Conflict as exc:
            log.info("%s changed since it was read (%s): reading it again next pass", w.ref, exc.message)
            return False
        except KubeError as exc:
            log.error("%s: %s failed: %s", w.ref, action.action, exc)
            return False
        return True

    # -- 6. reports

    def report(self, plan: Plan, applied: list[WorkloadPlan], state: ControllerState) -> None:
        reported: dict[str, Reported] = {}
        for wp in applied:
            status = wp.status
            if status is None:
                continue
            if status.state is not None and self._changed(status, state):
                self.emit(status, plan.serial, status.state)
                reported[status.agent_id] = Reported(
                    status.state, status.version, status.target_version, status.error
                )
            elif self._heartbeat_due(status.agent_id):
                self.emit(status, plan.serial, "heartbeat")
        for wp in plan.workloads:  # not applied this pass: still alive
            if wp not in applied and wp.status is not None and self._heartbeat_due(wp.status.agent_id):
                self.emit(wp.status, plan.serial, "heartbeat")
        if reported:
            self.save_state(lambda s: _with_all(s, reported))

    def _changed(self, status: Status, state: ControllerState) -> bool:
        before = state.reported.get(status.agent_id)
        now = Reported(status.state or "", status.version, status.target_version, status.error)
        return before != now

    def _heartbeat_due(self, agent_id: str) -> bool:
        interval = self.config.heartbeat_interval
        if interval <= 0:
            return False
        last = self.last_event.get(agent_id)
        return last is None or self.monotonic() - last >= interval

    def emit(self, status: Status, serial: int | None, state: str) -> None:
        self.last_event[status.agent_id] = self.monotonic()
        if state == "heartbeat":
            self.reporter.emit(
                status.agent_id,
                "heartbeat",
                version=status.version,
                target_version=None,
                serial=serial,
                last_result=status.last_result or None,
                uptime_s=int(self.monotonic() - self.started),
            )
            return
        log.info(
            "report %s: %s %s -> %s%s",
            status.agent_id,
            state,
            status.version,
            status.target_version,
            f" ({status.error})" if status.error else "",
        )
        self.reporter.emit(
            status.agent_id,
            state,
            version=status.version,
            target_version=status.target_version,
            serial=serial,
            image=status.image,
            in_wave=status.in_wave,
            failed_state=status.failed_state,
            error=status.error,
        )

    def report_check_failure(self, workloads: list[dict[str, Any]], state: ControllerState) -> None:
        """No usable manifest: each workload reports ``failed`` (in ``checking``) once per error code."""
        if self.check_error is None:
            return
        code, message = self.check_error
        reported: dict[str, Reported] = {}
        for obj in workloads:
            try:
                w = parse_workload(obj)
            except ObjectError:
                continue
            agent_id = w.agent_id(self.config.cluster)
            status = Status(
                agent_id,
                "failed",
                w.version_of(w.image) or "unknown",
                None,
                failed_state="checking",
                error=f"{code}: {message}",
                last_result=code,
            )
            record = Reported("failed", status.version, None, status.error)
            if state.reported.get(agent_id) != record:
                self.emit(status, state.highest_serial, "failed")
                reported[agent_id] = record
            elif self._heartbeat_due(agent_id):
                self.emit(status, state.highest_serial, "heartbeat")
        if reported:
            self.save_state(lambda s: _with_all(s, reported))


def _with_all(state: ControllerState, reported: dict[str, Reported]) -> ControllerState:
    for agent_id, record in reported.items():
        state = state.with_reported(agent_id, record)
    return state


# ---------------------------------------------------------------- the process


def run_controller(config: ControllerConfig, *, once: bool = False, kube: Kube | None = None) -> int:
    """``avika-controller run``: loop until SIGTERM/SIGINT (or one pass with ``once``)."""
    if kube is None:
        try:
            kube = LightkubeKube.from_kubeconfig()
        except Exception as exc:  # lightkube's own config errors: no service account, no kubeconfig
            log.error("no Kubernetes API to talk to (in-cluster service account or KUBECONFIG): %s", exc)
            return 1
    source = ManifestSource(
        config.manifest_url,
        config.public_keys,
        threshold=config.threshold,
        binary_origins=config.binary_origins,
    )
    reporter = WorkloadReporter(config.state_dir, config.tokens, config.report_url)
    controller = Controller(config, kube, source, reporter)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    log.info(
        "avika-controller for cluster %s: manifest %s, namespaces %s, health window %ss",
        config.cluster,
        config.manifest_url,
        ", ".join(config.namespaces) if config.namespaces else "all",
        config.health_window,
    )
    reporter.start()
    result = OK
    try:
        while True:
            try:
                result = controller.step()
            except KubeError as exc:
                log.error("Kubernetes API: %s", exc)
                result = FAILED
            except StateError as exc:
                log.error("state ConfigMap: %s", exc)
                result = FAILED
            except Exception:  # one bad pass must not end the loop; the next reads everything again
                log.exception("reconcile pass failed")
                result = FAILED
            if once or stop.wait(config.reconcile_interval):
                break
    finally:
        controller.release_lease()
        if not reporter.flush(10.0 if once else 5.0):
            log.warning("%d report(s) not delivered yet (kept in %s)", reporter.pending(), reporter.root)
        reporter.close()
        source.close()
        kube.close()
    return EXIT_CODES[result] if once else 0
