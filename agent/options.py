"""What every ``avika-agent`` command shares: the ``--config`` option, config loading, JSON output,
and the one mapping from an error to its code and exit code (DESIGN section 7).

Declared once here (pip-tools' ``scripts/options.py``), so :mod:`agent.cli` and
:mod:`agent.commands` both import it and neither imports the other's internals: either may be
imported first. Exit codes as the publisher's: 0 ok, 1 operational failure (network, disk),
2 usage or invalid config, 3 verification failed.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from agent import config, manifest

log = logging.getLogger("agent")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_VERIFY = 0, 1, 2, 3


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


config_option: Callable[[Callable[..., Any]], Callable[..., Any]] = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"Config file (default {config.DEFAULT_CONFIG_PATH}; a missing default file means defaults "
    "+ environment, a missing explicit file is an error).",
)
