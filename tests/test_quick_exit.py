"""agent/quick_exit.py: a process that skips the interpreter's teardown loses nothing a normal exit keeps.

Each case runs a real interpreter (the one running the tests: 3.9 and 3.13 too, in `make test`)
with stdout on a pipe, so its output is block-buffered: only a flush at exit gets it out.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from agent import buildinfo
from agent.quick_exit import FLUSH_FAILED, status_of

ROOT = Path(__file__).resolve().parents[1]
# Buffered output is the point: without PYTHONUNBUFFERED (set on some machines), stdout on a pipe
# keeps what is printed until something flushes it.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def script(code: str) -> list[str]:
    """A fresh interpreter running ``code`` with this tree importable."""
    return [sys.executable, "-c", f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n" + textwrap.dedent(code)]


def run(code: str, tmp_path: Path, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        script(code),
        cwd=tmp_path,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        env=ENV,
    )


@pytest.mark.parametrize(
    "code,status",
    [(None, 0), (0, 0), (3, 3), (True, 1), (False, 0), (261, 5), (-1, 255), ("a message", 1)],
)
def test_the_status_is_what_sys_exit_gives(code, status, tmp_path):
    assert status_of(code) == status
    normal = run(f"sys.exit({code!r})", tmp_path)
    quick = run(f"from agent.quick_exit import finish\nfinish({code!r})", tmp_path)
    assert quick.returncode == normal.returncode == status
    assert quick.stderr == normal.stderr  # a message is printed as Python prints it


def test_output_atexit_callbacks_and_threads_are_finished_first(tmp_path):
    done = run(
        """
        import atexit, logging, threading, time
        from pathlib import Path
        from agent.quick_exit import finish

        logging.basicConfig(filename="log.txt", level=logging.INFO)
        logging.getLogger("x").info("logged")
        atexit.register(lambda: Path("atexit.txt").write_text("ran"))
        threading.Thread(target=lambda: (time.sleep(0.3), Path("thread.txt").write_text("joined"))).start()
        print("buffered, no newline", end="")
        finish(7)
        print("never")
        """,
        tmp_path,
    )
    assert done.returncode == 7, done.stderr
    assert done.stdout == "buffered, no newline"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "thread.txt").read_text() == "joined"
    assert "INFO:x:logged" in (tmp_path / "log.txt").read_text()  # logging.shutdown flushed it


def closed_pipe_exit(code: str) -> int:
    """The status of ``code`` run with stdout on a pipe nobody reads any more (EPIPE at the flush)."""
    command = script(f"import time\ntime.sleep(0.2)\n{code}")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV)
    proc.stdout.close()  # type: ignore[union-attr]
    return proc.wait(timeout=60)


def test_a_stdout_that_cannot_take_the_output_fails_the_exit():
    normal = closed_pipe_exit("print('x' * 100, end='')")
    quick = closed_pipe_exit("from agent.quick_exit import finish\nprint('x' * 100, end='')\nfinish(0)")
    assert quick == normal == FLUSH_FAILED


def test_the_agent_command_line_ends_through_it(tmp_path):
    printed = run("from agent.cli import entry\nentry(['version'])", tmp_path)
    assert (printed.returncode, printed.stdout) == (0, f"{buildinfo.VERSION}\n")
    usage = run("from agent.cli import entry\nentry(['no-such-command'])", tmp_path)
    assert usage.returncode == 2 and "No such command" in usage.stderr
