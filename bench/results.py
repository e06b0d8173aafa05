"""What every benchmark shares: the machine's details, its printed lines, its section of RESULTS.md.

The benchmarks are run as ``.venv/bin/python bench/X.py``, so ``bench/`` is ``sys.path[0]`` and
they import this module as ``results``. A run prints its figures as it goes (:class:`Report`) and,
unless given ``--no-results``, appends them with :func:`append` as one section::

    ## bench/X.py — 2026-01-31 12:00 UTC

    Machine: 2 CPUs (nproc 2), <CPU model>, Python 3.11.7, Linux 6.1.0, 2026-01-31 12:00 UTC[; extra]
    Command: `.venv/bin/python bench/X.py --option`

    <the lines the run printed>
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"


def stamp() -> str:
    """The current time as every section shows it: ``2026-01-31 12:00 UTC``."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def machine(extra: Iterable[str] = ()) -> str:
    """CPUs (and the ones this process may use), CPU model, Python, kernel, date; then ``extra``
    (the versions of the other tools a benchmark compares against), ``; ``-separated."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = (
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}, {stamp()}"
    )
    return "; ".join([text, *extra])


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine shows in every figure."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def command_line() -> str:
    """How this benchmark was started, as the README says to run it (from the repository root)."""
    return " ".join([".venv/bin/python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def heading(*, title: str, command: str, machine_line: str | None = None) -> list[str]:
    """The lines that open a section: title and date, machine, command."""
    return [
        f"## {title} — {stamp()}",
        "",
        f"Machine: {machine_line if machine_line is not None else machine()}",
        f"Command: `{command}`",
        "",
    ]


class Report:
    """Print each line as it comes (flushed: a long run shows progress) and keep it for RESULTS.md."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """A markdown table, columns padded to their widest cell."""
        cells = [[str(c) for c in row] for row in rows]
        widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]
        self("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
        self("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in cells:
            self("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def append(lines: Iterable[str], *, title: str, command: str, machine_line: str | None = None) -> None:
    """Append one section to ``bench/RESULTS.md``: :func:`heading`, then ``lines``.

    ``machine_line`` is a :func:`machine` result taken earlier (with ``extra``, or at the start
    of the run); by default the machine is described now.
    """
    text = "\n".join([*heading(title=title, command=command, machine_line=machine_line), *lines])
    with RESULTS.open("a", encoding="utf-8") as fh:
        fh.write(text.rstrip("\n") + "\n\n")
    print(f"\nappended to {RESULTS.relative_to(ROOT)}", flush=True)
