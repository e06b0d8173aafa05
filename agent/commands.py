"""``run``, ``update [--force]``, ``rollback`` and ``status [--json]`` (DESIGN section 7, contract).

Thin click commands over :mod:`agent.runner` and :mod:`agent.lifecycle`; :mod:`agent.cli`
registers them on its group; errors map to exit codes in :mod:`agent.options` (0 ok, 1
operational, 2 usage or config, 3 verification). ``update`` and ``rollback`` print one JSON object
on stdout; ``status`` reads only the state dir, so it works while ``run`` is running.

``update`` and ``rollback`` report through the durable queue (:func:`agent.runner.make_sink`)
and send what is queued before they exit (:data:`FLUSH_TIMEOUT` at most; the rest stays queued
for the running agent or the next start).
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from agent import buildinfo, check, environment, install, lifecycle, restart, runner
from agent.config import AgentConfig
from agent.decide import REPORT, UPDATE, Decision
from agent.events import EventSink
from agent.options import config_option, fail, load_config, print_json
from agent.state import LockBusy, load_state, state_warnings, update_lock

log = logging.getLogger(__name__)

# How long a one-shot command waits for its reports to be delivered before it exits.
FLUSH_TIMEOUT = 10.0

log_format_option = click.option(
    "--log-format",
    type=click.Choice(runner.LOG_FORMATS),
    default=None,
    help=f"Logs on stderr as text or JSON lines (default: ${runner.LOG_FORMAT_ENV}, else text).",
)


def installed_version(config: AgentConfig) -> str | None:
    """The target's version: this build's when the target is the running executable, else asked."""
    if check.is_running_executable(config.target):
        return buildinfo.VERSION
    return install.binary_version(config.target) or check.target_version(config.target)


# ---------------------------------------------------------------- run


@click.command(name="run")
@config_option
@log_format_option
def run_command(config_path: Path | None, log_format: str | None) -> None:
    """Run the agent: check every UPDATE_INTERVAL, apply, watch the health window, commit."""
    runner.setup_logging(log_format)
    cfg = load_config(config_path)
    try:
        code = runner.Runner(cfg).run()
    except runner.AlreadyRunning as exc:
        fail(exc, json_error=False)
    sys.exit(code)


# ---------------------------------------------------------------- update


@click.command(name="update")
@config_option
@log_format_option
@click.option(
    "--force",
    is_flag=True,
    help="Ignore the rollout wave and the back-off (never the signature, serial or bad-version rules).",
)
def update_command(config_path: Path | None, log_format: str | None, force: bool) -> None:
    """Check now and apply an update if there is one; prints one JSON object."""
    runner.setup_logging(log_format)
    cfg = load_config(config_path, json_error=True)
    mode = environment.detect(cfg.deployment_mode).mode
    try:
        result = check.check(cfg, mode=mode, ignore_backoff=force)
    except runner.CHECK_ERRORS as exc:
        fail(exc, json_error=True)
    out: dict[str, Any] = result.to_dict()
    if result.manifest is None:
        print_json(out)
        return
    decision = runner.effective_decision(result, force=force)
    out.update(action=decision.action, reason=decision.reason)
    sink = runner.make_sink(cfg, mode)
    sink.set_manifest_reports_url(result.manifest.reports_url)
    try:
        _update(cfg, sink, result, decision, out, force=force)
    finally:  # also on the way out through fail(): the events of a failed attempt go too
        sink.flush(timeout=FLUSH_TIMEOUT)
    print_json(out)


def _update(
    cfg: AgentConfig,
    sink: EventSink,
    result: check.CheckResult,
    decision: Decision,
    out: dict[str, Any],
    *,
    force: bool,
) -> None:
    """What ``update`` does about the decision; fills ``out`` (or exits through :func:`fail`)."""
    if decision.action == REPORT:
        runner.report_available(sink, result, decision)
    if decision.action != UPDATE:
        return
    until = runner.backoff_until(result, load_state(cfg.state_dir), datetime.now(timezone.utc))
    if until is not None and not force:
        out.update(action="none", reason="backoff", next_attempt=until.isoformat())
        return
    restarted: list[str] = []
    try:
        pending = runner.apply_locked(
            cfg,
            result,
            decision,
            sink=sink,
            restart_with=lambda p: restarted.append(restart.restart_running_agent(cfg, p, sink.origin)),
        )
    except (LockBusy, lifecycle.UpdateInProgress, lifecycle.UpdateFailed, restart.RestartFailed) as exc:
        fail(exc, json_error=True)  # update_command's finally sends the failure first
    out.update(result="swapped", restart=restarted[0] if restarted else None, pending=pending.to_dict())


# ---------------------------------------------------------------- rollback


@click.command(name="rollback")
@config_option
@log_format_option
def rollback_command(config_path: Path | None, log_format: str | None) -> None:
    """Put <target>.backup back: the update in flight, else the installed version (remembered as bad)."""
    runner.setup_logging(log_format)
    cfg = load_config(config_path, json_error=True)
    sink = runner.make_sink(cfg, environment.detect(cfg.deployment_mode).mode)
    now = datetime.now(timezone.utc)
    out: dict[str, Any]
    try:
        with update_lock(cfg.state_dir):
            pending = lifecycle.read_pending(cfg.state_dir)
            if pending is not None:
                out = _rollback_pending(cfg, sink, pending, now)
            else:
                version = installed_version(cfg)
                rolled = lifecycle.rollback_installed(
                    cfg, sink, version=version, serial=load_state(cfg.state_dir).highest_serial, now=now
                )
                out = {"rolled_back": version, "sha256": rolled, "reason": lifecycle.MANUAL_ROLLBACK}
        out["restart"] = restart.restart_running_agent(cfg, None, sink.origin)
    except (
        LockBusy,
        lifecycle.PendingCorrupt,
        lifecycle.NothingToRollBack,
        install.InstallError,
        restart.RestartFailed,
    ) as exc:
        sink.flush(timeout=FLUSH_TIMEOUT)
        fail(exc, json_error=True)
    sink.flush(timeout=FLUSH_TIMEOUT)
    print_json(out)


def _rollback_pending(
    cfg: AgentConfig, sink: EventSink, pending: lifecycle.Pending, now: datetime
) -> dict[str, Any]:
    target = Path(pending.target)
    if install.sha256_or_none(target) == pending.from_sha256:
        lifecycle.clear_pending(cfg.state_dir)  # never swapped: the old binary is in place
        return {"rolled_back": None, "reason": lifecycle.INTERRUPTED_BEFORE_SWAP}
    # Under systemd the rollback unit runs when the agent unit failed: the new version died.
    alive = restart.running_agent(cfg.state_dir, target) is not None
    reason = lifecycle.MANUAL_ROLLBACK if alive else lifecycle.DIED_BEFORE_COMMIT
    state = lifecycle.State.WATCHING if pending.boots else lifecycle.State.RESTARTING
    if not lifecycle.rollback(cfg, sink, pending, reason, now=now, from_state=state):
        raise install.RestoreFailed(f"could not restore {pending.backup}")
    return {"rolled_back": pending.to_version, "sha256": pending.to_sha256, "reason": reason}


# ---------------------------------------------------------------- status


def collect_status(cfg: AgentConfig) -> dict[str, Any]:
    """Everything ``status`` shows, from the state dir and the target (never written here)."""
    state, problems = state_warnings(cfg.state_dir)
    try:
        pending_record = lifecycle.read_pending(cfg.state_dir, set_aside_corrupt=False)
        pending: dict[str, Any] | None = pending_record.to_dict() if pending_record else None
    except lifecycle.PendingCorrupt as exc:
        pending = {"corrupt": True, "error": exc.message}
    agent = restart.running_agent(cfg.state_dir, cfg.target)
    return {
        "version": installed_version(cfg),
        "running": {"pid": agent["pid"], "version": agent.get("version")} if agent else None,
        "target": str(cfg.target),
        "mode": environment.detect(cfg.deployment_mode).mode,
        "update_mode": cfg.update_mode,
        "updates": "disabled" if cfg.updates_disabled else "enabled",
        "restart_method": cfg.restart_method,
        "last_check": state.last_check,
        "last_result": state.last_result,
        "pending": pending,
        "bad_versions": state.bad_versions,
        "attempts": list(state.attempts.values()),
        "highest_serial": state.highest_serial,
        "last_error": state.last_error,
        # Config mistakes and a corrupt state file: what an operator should fix (DESIGN section 3).
        "warnings": [*cfg.warnings, *problems],
    }


def _status_text(info: dict[str, Any]) -> list[str]:
    running, pending, error = info["running"], info["pending"], info["last_error"]
    if info["updates"] == "disabled":
        updates = f"disabled (UPDATE_MODE={info['update_mode']}): nothing is checked or installed"
    else:
        updates = f"{info['update_mode']}, restart by {info['restart_method']}"
    if pending is None:
        pending_text = "none"
    elif pending.get("corrupt"):
        pending_text = f"corrupt record: {pending['error']}"
    else:
        pending_text = (
            f"{pending['from_version']} -> {pending['to_version']} "
            f"(boots {pending['boots']}, deadline {pending['deadline']})"
        )
    bad = [
        f"{b.get('version')} ({str(b.get('sha256'))[:12]}): {b.get('reason')}" for b in info["bad_versions"]
    ]
    serial = info["highest_serial"]
    return [
        f"version:        {info['version'] or 'unknown'}",
        f"target:         {info['target']}",
        f"running:        {_running_text(running) if running else 'no'}",
        f"mode:           {info['mode']}",
        f"updates:        {updates}",
        f"last check:     {info['last_check'] or 'never'} -> {info['last_result'] or '-'}",
        f"pending:        {pending_text}",
        f"bad versions:   {', '.join(bad) or 'none'}",
        f"highest serial: {serial if serial is not None else 'none'}",
        f"last error:     {_error_text(error) if error else 'none'}",
        *[f"warning:        {warning}" for warning in info["warnings"]],
    ]


def _running_text(running: dict[str, Any]) -> str:
    return f"pid {running['pid']} ({running['version']})"


def _error_text(error: dict[str, Any]) -> str:
    return f"{error.get('code')} in {error.get('state')}: {error.get('message')}"


@click.command(name="status")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (DESIGN section 7 fields).")
def status_command(config_path: Path | None, as_json: bool) -> None:
    """Show the installed version, the running agent, the update in flight and what was remembered."""
    cfg = load_config(config_path, json_error=as_json)
    info = collect_status(cfg)
    if as_json:
        print_json(info)
        return
    for line in _status_text(info):
        click.echo(line)
