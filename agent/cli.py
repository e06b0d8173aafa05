"""``avika-agent``: the agent's command line (DESIGN section 7, contract).

Commands are thin: load the config, call one workflow module, print, map the error to an exit
code once (:func:`agent.options.exit_code_for`). Exit codes as the publisher's: 0 ok, 1 operational
failure (network, disk), 2 usage or invalid config, 3 verification failed. Logs go to stderr;
stdout carries only the command's output. The shared options live in :mod:`agent.options`; the
update commands in :mod:`agent.commands`.

Every module the agent needs is imported here, at start-up: a running agent's own file is
replaced during an update, so nothing may be imported lazily afterwards (DESIGN section 4).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NoReturn

import click

from agent import buildinfo, check, commands, config, environment, fetch, manifest
from agent.logs import log_to_stderr
from agent.options import config_option, fail, load_config, print_json
from agent.quick_exit import finish

log = logging.getLogger("agent")

LOG_LEVELS = ("debug", "info", "warning", "error")


def deployment_override(path: Path | None) -> str | None:
    """``DEPLOYMENT_MODE`` alone, validated: detection works on a host whose other settings are
    missing or wrong (that is when an operator runs ``detect``)."""
    try:
        value = config.read_values(path).get("DEPLOYMENT_MODE", "")
        # UPDATE_MODE=disabled: validate this one key without requiring a server or keys.
        return config.from_values({"DEPLOYMENT_MODE": value, "UPDATE_MODE": "disabled"}).deployment_mode
    except config.ConfigError as exc:
        fail(exc, json_error=False)


def print_version(ctx: click.Context) -> None:
    if not ctx.resilient_parsing:
        click.echo(buildinfo.VERSION)
        ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=lambda ctx, _param, value: print_version(ctx) if value else None,
    help="Print the version and exit (as `version` does).",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS),
    default="info",
    show_default=True,
    help="Logging threshold (logs go to stderr).",
)
def main(log_level: str) -> None:
    """Avika agent updates: check, verify and apply signed releases."""
    log_to_stderr(getattr(logging, log_level.upper()))


@main.command()
@config_option
def version(config_path: Path | None) -> None:
    """Print the running agent's version and nothing else."""
    click.echo(buildinfo.VERSION)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help='Print {"mode", "signals", "override"}.')
def detect(config_path: Path | None, as_json: bool) -> None:
    """Print the deployment mode (vm or container) and the signals behind it."""
    detection = environment.detect(deployment_override(config_path))
    if as_json:
        print_json(detection.to_dict())
        return
    click.echo(f"mode: {detection.mode}")
    click.echo(f"signals: {', '.join(detection.signals) or 'none'}")
    click.echo(f"override: {detection.override or 'none'} (DEPLOYMENT_MODE)")


@main.command(name="check")
@config_option
def check_command(config_path: Path | None) -> None:
    """Fetch and verify the manifest, record the trust state, print the decision as JSON."""
    cfg = load_config(config_path, json_error=True)
    try:
        result = check.check(cfg)
    except (manifest.ManifestError, fetch.DownloadError, environment.UnsupportedPlatform, OSError) as exc:
        fail(exc, json_error=True)
    print_json(result.to_dict())


main.add_command(commands.run_command)
main.add_command(commands.update_command)
main.add_command(commands.rollback_command)
main.add_command(commands.status_command)


def entry(args: list[str] | None = None) -> NoReturn:
    """The process's way in (agent file, console script): the CLI, then :func:`quick_exit.finish`."""
    try:
        main(args=args)
    except SystemExit as exc:
        finish(exc.code)
    finish(0)


if __name__ == "__main__":
    entry()
