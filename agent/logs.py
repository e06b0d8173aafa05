"""Log lines on stderr for the command-line tools (the agent's and the controller's).

The handler looks ``sys.stderr`` up at each record, so click's test runner (which swaps it) sees the
lines, and flushes each one, so a stream that is not line-buffered keeps nothing back.
"""

from __future__ import annotations

import logging
import sys

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time of the record."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(TEXT_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def log_to_stderr(level: int) -> logging.Logger:
    """Set the root logger's level and give it one :class:`StderrHandler` (never a second)."""
    root = logging.getLogger()
    root.setLevel(level)
    if not any(isinstance(h, StderrHandler) for h in root.handlers):
        root.addHandler(StderrHandler())
    return root
