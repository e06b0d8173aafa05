"""Test-wide settings: no core files; process-global state kept from leaking between in-process CLI runs."""

from __future__ import annotations

import logging
import resource
from collections.abc import Iterator

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Every process a test starts inherits a soft core limit of 0: agent variants crash on purpose
    (SIGSEGV), and a runner whose limit allows cores would write one per crash into a host's dir,
    which shifts the timing of what the test watches."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    """The agent's and the controller's CLIs add a stderr handler to the root logger at INFO.

    Run in-process (click's CliRunner), that handler would outlive the test and put third-party INFO
    lines (botocore's "Found credentials") on the stderr of a later test's command.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
