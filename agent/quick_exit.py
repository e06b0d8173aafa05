"""Ending the agent's process without the interpreter's teardown.

A normal exit tears every module down and frees every object one by one: about 30 ms for the
agent's imports (cryptography, click, http.client, ...), paid by the ``update`` process and again
by the smoke test's ``<staged> version``, and by every command an operator or a timer runs. Nothing
the agent keeps lives in that teardown: state, pending records and queued reports are written with
fsync before they count, so the process may end with ``os._exit`` once what a normal exit does that
matters has been done, in the same order: wait for non-daemon threads, run ``atexit`` callbacks
(``logging.shutdown`` among them), flush stdout and stderr.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn

# What CPython returns when flushing stdout fails at exit (a closed pipe, a full disk).
FLUSH_FAILED = 120


def status_of(code: object) -> int:
    """The exit status ``sys.exit(code)`` gives; a message is printed on stderr, as Python does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"{code}\n")
    return 1


def _flushed(stream: object) -> bool:
    flush = getattr(stream, "flush", None)
    if flush is None:
        return True
    try:
        flush()
    except (OSError, ValueError):
        return False
    return True


def finish(code: object) -> NoReturn:
    """Exit with ``code`` (what ``sys.exit`` takes) as a normal exit would, minus the teardown."""
    status = status_of(code)
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    stdout_ok = _flushed(sys.stdout)
    _flushed(sys.stderr)
    if not stdout_ok and status == 0:
        status = FLUSH_FAILED
    os._exit(status)
