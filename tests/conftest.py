"""Test-wide fixtures: keep process-global state from leaking between in-process CLI runs."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


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
