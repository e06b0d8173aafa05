"""``avika-agent``: the agent's command line (DESIGN section 7, contract).

Commands are thin: load the config, call one workflow module, print, map the error to an exit
code once (:func:`exit_code_for`). Exit codes as the publisher's: 0 ok, 1 operational failure
(network, disk), 2 usage or invalid config, 3 verification failed. Logs go to stderr; stdout
carries only the command's output.

Every module the agent needs is imported here, at start-up: a running agent's own file is
replaced during an update, so nothing may be imported lazily afterwards (DESIGN section 4).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from agent import buildinfo, check, config, environment, fetch, manifest

log = logging.getLogger("agent")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_VERIFY = 0, 1, 2, 3
LOG_LEVELS = ("debug", "info", "warning", "error")


def exit_code_for(exc: BaseException) -> int:
    """The one mapping from error class to exit code."""
    if isinstance(exc, config.ConfigError):
        return EXIT_USAGE
    if isinstance(exc, manifest.ManifestError):
        return EXIT_VERIFY
    return EXIT_FAILURE


def error_code_for(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, str):
        return code
    return "io_error" if isinstance(exc, OSError) else "internal_error"


def print_json(obj: Any) -> None:
    click.echo(json.dumps(obj))


def fail(exc: BaseException, *, json_error: bool) -> NoReturn:
    """Report ``exc`` on stderr (and as ``{"error", "message"}`` on stdout) and exit."""
    message = getattr(exc, "message", None) or str(exc)
    if isinstance(exc, config.ConfigError):
        click.echo(f"avika-agent: invalid config: {message}", err=True)
    else:
        log.error("%s: %s", error_code_for(exc), message)
    if json_error:
        print_json({"error": error_code_for(exc), "message": message})
    sys.exit(exit_code_for(exc))


def load_config(path: Path | None, *, json_error: bool = False) -> config.AgentConfig:
    try:
        return config.load(path)
    except config.ConfigError as exc:
        fail(exc, json_error=json_error)


def deployment_override(path: Path | None) -> str | None:
    """``DEPLOYMENT_MODE`` alone, validated: detection works on a host whose other settings are
    missing or wrong (that is when an operator runs ``detect``)."""
    try:
        value = config.read_values(path).get("DEPLOYMENT_MODE", "")
        # UPDATE_MODE=disabled: validate this one key without requiring a server or keys.
        return config.from_values({"DEPLOYMENT_MODE": value, "UPDATE_MODE": "disabled"}).deployment_mode
    except config.ConfigError as exc:
        fail(exc, json_error=False)


class StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (click's test runner swaps it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def setup_logging(level: int) -> None:
    root = logging.getLogger()
    root.setLevel(level)
    if not any(isinstance(h, StderrHandler) for h in root.handlers):
        root.addHandler(StderrHandler())


config_option: Callable[[Callable[..., Any]], Callable[..., Any]] = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"Config file (default {config.DEFAULT_CONFIG_PATH}; a missing default file means defaults "
    "+ environment, a missing explicit file is an error).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS),
    default="info",
    show_default=True,
    help="Logging threshold (logs go to stderr).",
)
def main(log_level: str) -> None:
    """Avika agent updates: check, verify and apply signed releases."""
    setup_logging(getattr(logging, log_level.upper()))


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


# The update commands live in agent/commands.py, which takes this module's shared options.
from agent import commands  # noqa: E402

main.add_command(commands.run_command)
main.add_command(commands.update_command)
main.add_command(commands.rollback_command)
main.add_command(commands.status_command)


if __name__ == "__main__":
    main()
