"""``avika-controller``: the Kubernetes controller's command line (DESIGN section 10).

- ``run``: the in-cluster loop (configuration from the environment, :mod:`controller.config`);
- ``plan``: the pure decision over ``kubectl get -o json`` files: what ``run`` would do now;
- ``version``.

Exit codes as the agent's: 0 ok, 1 operational failure (network, API server), 2 usage or invalid
input or configuration, 3 the manifest does not verify (``{"error": CODE, "message"}`` with the
agent's codes: ``signature_invalid``, ``expired``, ``serial_rollback``, ...). Logs go to stderr;
stdout carries only the command's output.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from agent.fetch import DownloadError
from agent.logs import log_to_stderr
from agent.manifest import ManifestError, PublicKey, parse_duration, parse_time
from controller import buildinfo, config, manifests
from controller.config import ConfigError, trusted_keys
from controller.objects import ObjectError, check_cluster_id, items
from controller.plan import NONE, Plan, Settings, reconcile
from controller.state import ControllerState, StateError, state_from_document

log = logging.getLogger("controller")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_VERIFY = 0, 1, 2, 3
LOG_LEVELS = ("debug", "info", "warning", "error")


class InvalidInput(Exception):
    code = "invalid_input"


def exit_code_for(exc: BaseException) -> int:
    """The one mapping from error class to exit code."""
    if isinstance(exc, ManifestError):
        return EXIT_VERIFY
    if isinstance(exc, (ConfigError, InvalidInput, ObjectError, StateError)):
        return EXIT_USAGE
    return EXIT_FAILURE


def error_code_for(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, str):
        return code
    if isinstance(exc, (ObjectError, StateError)):
        return "invalid_input"
    return "io_error" if isinstance(exc, OSError) else "internal_error"


def fail(exc: BaseException, *, as_json: bool) -> NoReturn:
    """``exc`` on stderr (and as ``{"error", "message"}`` on stdout with ``--json``), then exit."""
    message = getattr(exc, "message", None) or str(exc)
    click.echo(f"avika-controller: {error_code_for(exc)}: {message}", err=True)
    if as_json:
        click.echo(json.dumps({"error": error_code_for(exc), "message": message}))
    sys.exit(exit_code_for(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True, help="Logs go to stderr."
)
def main(log_level: str) -> None:
    """Roll the Avika agent's pods in waves from the signed manifest (DESIGN section 10)."""
    root = log_to_stderr(getattr(logging, log_level.upper()))
    for chatty in ("httpx", "httpx2", "httpcore", "httpcore2"):  # one INFO line per request otherwise
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))


@main.command()
def version() -> None:
    """Print the controller's version."""
    click.echo(buildinfo.VERSION)


# ---------------------------------------------------------------- plan


def _load_json(path: str, what: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"{what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"{what} {path}: not UTF-8 text") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"{what} {path}: not JSON ({exc}); use kubectl get ... -o json") from None


def _objects(paths: tuple[str, ...], what: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in paths:
        out += items(_load_json(path, what), f"{what} {path}")
    return out


def _duration_option(value: str, name: str) -> int:
    try:
        return parse_duration(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a duration like 30s, 5m or 1h30m", param_hint=name
        ) from None


def _keys(values: tuple[str, ...]) -> tuple[PublicKey, ...]:
    text = ",".join(values) if values else os.environ.get("AVIKA_PUBLIC_KEYS")
    return trusted_keys(text, where="--public-key" if values else "AVIKA_PUBLIC_KEYS")


def format_plan(plan: Plan) -> str:
    halted = " (halted)" if plan.percent == 0 else ""
    lines = [
        f"manifest serial {plan.serial}: {plan.version} at {plan.percent} %{halted}, "
        f"image {plan.image or '-'}",
    ]
    rows = [("KIND", "NAMESPACE", "NAME", "NODE", "ACTION", "REASON", "IMAGE")]
    notes = []
    for a in plan.actions():
        rows.append((a.kind, a.namespace, a.name, a.node or "-", a.action, a.reason, a.image or "-"))
        if a.detail and a.kind != "Pod":
            notes.append(f"{a.kind} {a.namespace}/{a.name}: {a.detail}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if not plan.workloads:
        lines.append("no workload labelled avika.io/updates=enabled")
    lines += notes
    for wp in plan.workloads:
        if wp.bad:
            lines.append(
                f"records {wp.bad.version} ({wp.bad.image}) as bad in this cluster: never applied again"
            )
    if plan.skipped:
        lines.append(f"ignored (no avika.io/updates=enabled label): {', '.join(plan.skipped)}")
    moving = sum(1 for a in plan.actions() if a.action != NONE)
    lines.append(f"{moving} action(s) to take")
    return "\n".join(lines) + "\n"


@main.command()
@click.option(
    "--manifest", "source", required=True, help="manifest.json: a file, or the update server's URL."
)
@click.option(
    "--workloads",
    "workload_files",
    multiple=True,
    required=True,
    help="kubectl get daemonsets,deployments,statefulsets -A -o json "
    "(a List or one object; - = stdin; repeatable).",
)
@click.option("--pods", "pod_files", multiple=True, help="kubectl get pods -A -o json (repeatable).")
@click.option("--nodes", "node_files", multiple=True, help="kubectl get nodes -o json (node readiness).")
@click.option(
    "--cluster", envvar="AVIKA_CLUSTER_ID", required=True, help="Cluster id [env AVIKA_CLUSTER_ID]."
)
@click.option(
    "--public-key",
    "public_keys",
    multiple=True,
    help="Trusted key, base64 (repeatable) [default: AVIKA_PUBLIC_KEYS, else the embedded keys].",
)
@click.option(
    "--threshold", type=click.IntRange(1, 16), default=1, show_default=True, help="Keys that must sign."
)
@click.option(
    "--state",
    "state_file",
    help="The state ConfigMap (kubectl get configmap avika-controller-state -o json) or its state.json.",
)
@click.option("--health-window", default="5m", show_default=True, help="AVIKA_HEALTH_WINDOW.")
@click.option("--progress-deadline", default="10m", show_default=True, help="AVIKA_PROGRESS_DEADLINE.")
@click.option("--now", "now_text", help="Decide as of this RFC 3339 time (default: now).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (DESIGN section 10).")
def plan(
    source: str,
    workload_files: tuple[str, ...],
    pod_files: tuple[str, ...],
    node_files: tuple[str, ...],
    cluster: str,
    public_keys: tuple[str, ...],
    threshold: int,
    state_file: str | None,
    health_window: str,
    progress_deadline: str,
    now_text: str | None,
    as_json: bool,
) -> None:
    """Print what `run` would do now, from `kubectl get -o json` files. Changes nothing."""
    window = _duration_option(health_window, "--health-window")
    deadline = _duration_option(progress_deadline, "--progress-deadline")
    try:
        now = parse_time(now_text) if now_text else datetime.now(UTC)
    except ValueError:
        raise click.BadParameter(f"{now_text!r} is not an RFC 3339 time", param_hint="--now") from None
    try:
        check_cluster_id(cluster)
        keys = _keys(public_keys)
        state = state_from_document(_load_json(state_file, "--state")) if state_file else ControllerState()
        workloads = _objects(workload_files, "--workloads")
        pods = _objects(pod_files, "--pods")
        nodes = _objects(node_files, "--nodes")
        data, url = manifests.read_source(source)
        manifest = manifests.verify(
            data, keys, threshold=threshold, trust=state.trust, now=now, manifest_url=url
        )
        result = reconcile(manifest, workloads, pods, nodes, state, Settings(cluster, window, deadline), now)
    except (ManifestError, ConfigError, InvalidInput, ObjectError, StateError, DownloadError, OSError) as exc:
        fail(exc, as_json=as_json)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=1))
    else:
        click.echo(format_plan(result), nl=False)


# ---------------------------------------------------------------- run


@main.command()
@click.option("--once", is_flag=True, help="One reconcile pass (take the Lease, act, report), then exit.")
def run(once: bool) -> None:
    """The in-cluster loop: follow the signed manifest and roll the agent's pods in waves.

    Configured by the environment (docs/kubernetes.md, section 4): AVIKA_UPDATE_SERVER and
    AVIKA_CLUSTER_ID are required; AVIKA_PUBLIC_KEYS, AVIKA_NAMESPACES, AVIKA_HEALTH_WINDOW,
    UPDATE_REPORT_TOKEN and the others have defaults. The API server is the pod's service account,
    else KUBECONFIG. Exits 2 on an invalid setting; with --once, 1 when the pass failed and 3 when
    the manifest did not verify.
    """
    # Imported here: `plan` works without the Kubernetes client (the `controller` extra).
    from controller.run import run_controller

    try:
        cfg = config.load()
    except ConfigError as exc:
        fail(exc, as_json=False)
    sys.exit(run_controller(cfg, once=once))


if __name__ == "__main__":
    main()
