"""Just enough of GitHub Actions to test what our workflows decide: expressions, step conditions, scripts.

- ``evaluate(expr, context)`` evaluates a GitHub expression (``${{ }}`` optional) the way the runner does:
  literals, context paths (``inputs.rollout``, ``steps.canary.outcome``), ``!``, ``&&``, ``||`` (returning an
  operand, as in JavaScript), ``==``/``!=``/``<``/``>``/``<=``/``>=`` (strings compared case-insensitively,
  mixed types coerced to numbers), parentheses, and the functions the workflows use. Anything else raises
  ``ValueError``, so an unmodelled expression fails a test instead of passing it.
- ``run_job(job, outcomes, ...)`` walks a job's steps as the runner does: a step's ``if:`` without a status
  function gets an implicit ``success() &&``; a step that runs takes its outcome from ``outcomes`` (default
  success) and a failure fails the job. It returns which steps ran.
- ``run_step_script(job, step, vars_, ...)`` runs a step's ``run:`` script with ``bash -eo pipefail`` (the
  runner's default shell) and the job's and step's ``env:`` expanded, for guard scripts that must fail early.

Reference: docs.github.com/en/actions/learn-github-actions/expressions and "Using conditions to control job
execution" (status check functions).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUS_FUNCTIONS = ("success", "failure", "cancelled", "always")
_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<num>-?\d+(?:\.\d+)?)|(?P<op>&&|\|\||==|!=|<=|>=|<|>|!|\(|\)|,|\[|\]|\.)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_-]*))"
)
WRAPPED = re.compile(r"^\s*\$\{\{(.*)\}\}\s*$", re.S)
EMBEDDED = re.compile(r"\$\{\{(.*?)\}\}", re.S)


@dataclass
class Status:
    """The job's state as the status functions see it."""

    failed: bool = False
    cancelled: bool = False


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise ValueError(f"cannot read expression at {text[pos:]!r}")
        kind = match.lastgroup
        assert kind is not None
        out.append((kind, match.group(kind)))
        pos = match.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, float) and math.isnan(value))


def _number(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip()) if value.strip() else 0.0
        except ValueError:
            return math.nan
    return math.nan


def _compare(left: Any, right: Any, op: str) -> bool:
    if isinstance(left, str) and isinstance(right, str):
        a: Any = left.lower()
        b: Any = right.lower()
    elif type(left) is type(right) and not isinstance(left, dict | list):
        a, b = left, right
    else:
        a, b = _number(left), _number(right)
        if math.isnan(a) or math.isnan(b):
            return op == "!="
    return {
        "==": a == b,
        "!=": a != b,
        "<": a < b,
        ">": a > b,
        "<=": a <= b,
        ">=": a >= b,
    }[op]


class _Parser:
    def __init__(self, text: str, context: dict[str, Any], status: Status) -> None:
        self.tokens = _tokens(text)
        self.pos = 0
        self.context = context
        self.status = status
        self.used_status_function = False

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None or (value is not None and token[1] != value):
            raise ValueError(f"expected {value!r}, got {token!r}")
        self.pos += 1
        return token

    def parse(self) -> Any:
        value = self.or_()
        if self.peek() is not None:
            raise ValueError(f"unexpected {self.peek()!r}")
        return value

    def or_(self) -> Any:
        value = self.and_()
        while self.peek() == ("op", "||"):
            self.take()
            right = self.and_()
            value = value if _truthy(value) else right
        return value

    def and_(self) -> Any:
        value = self.comparison()
        while self.peek() == ("op", "&&"):
            self.take()
            right = self.comparison()
            value = right if _truthy(value) else value
        return value

    def comparison(self) -> Any:
        value = self.unary()
        token = self.peek()
        if token and token[0] == "op" and token[1] in ("==", "!=", "<", ">", "<=", ">="):
            self.take()
            return _compare(value, self.unary(), token[1])
        return value

    def unary(self) -> Any:
        if self.peek() == ("op", "!"):
            self.take()
            return not _truthy(self.unary())
        return self.primary()

    def primary(self) -> Any:
        kind, text = self.take()
        if kind == "str":
            return text[1:-1].replace("''", "'")
        if kind == "num":
            return float(text) if "." in text else int(text)
        if (kind, text) == ("op", "("):
            value = self.or_()
            self.take(")")
            return value
        if kind != "name":
            raise ValueError(f"unexpected {text!r}")
        if text in ("true", "false"):
            return text == "true"
        if text == "null":
            return None
        if self.peek() == ("op", "("):
            return self.call(text)
        value: Any = self.context.get(text)
        while self.peek() in (("op", "."), ("op", "[")):
            if self.take()[1] == ".":
                key = self.take()[1]
            else:
                key = self.or_()
                self.take("]")
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def call(self, name: str) -> Any:
        self.take("(")
        args = []
        while self.peek() != ("op", ")"):
            args.append(self.or_())
            if self.peek() == ("op", ","):
                self.take()
        self.take(")")
        if name in STATUS_FUNCTIONS:
            self.used_status_function = True
            return {
                "success": not self.status.failed and not self.status.cancelled,
                "failure": self.status.failed,
                "cancelled": self.status.cancelled,
                "always": True,
            }[name]
        if name == "contains" and len(args) == 2:
            haystack, needle = args
            if isinstance(haystack, list):
                return any(_compare(item, needle, "==") for item in haystack)
            return str(needle).lower() in str(haystack).lower()
        if name == "startsWith" and len(args) == 2:
            return str(args[0]).lower().startswith(str(args[1]).lower())
        raise ValueError(f"the simulator does not model {name}() with {len(args)} arguments")


def evaluate(expression: Any, context: dict[str, Any], status: Status | None = None) -> Any:
    """The value of one expression (a bare ``if:`` or a ``${{ }}`` string)."""
    if not isinstance(expression, str):
        return expression
    match = WRAPPED.match(expression)
    return _Parser(match.group(1) if match else expression, context, status or Status()).parse()


def condition_holds(condition: Any, context: dict[str, Any], status: Status) -> bool:
    """A step's ``if:``, with the runner's implicit ``success() &&`` when it names no status function."""
    if condition is None:
        return not status.failed and not status.cancelled
    if isinstance(condition, bool):
        return condition and not status.failed and not status.cancelled
    match = WRAPPED.match(condition)
    parser = _Parser(match.group(1) if match else condition, context, status)
    value = _truthy(parser.parse())
    if not parser.used_status_function:
        value = value and not status.failed and not status.cancelled
    return value


def expand(text: Any, context: dict[str, Any]) -> str:
    """A value with ``${{ }}`` parts, as the runner renders it into a string (null -> '')."""
    if not isinstance(text, str):
        return "" if text is None else str(text).lower() if isinstance(text, bool) else str(text)

    def render(match: re.Match[str]) -> str:
        value = evaluate(match.group(1), context)
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    return EMBEDDED.sub(render, text)


def step_key(step: dict[str, Any]) -> str:
    return step.get("id") or step.get("name") or step.get("uses", "?")


@dataclass
class JobRun:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: bool = False


def run_job(
    job: dict[str, Any],
    outcomes: dict[str, str] | None = None,
    *,
    inputs: dict[str, Any] | None = None,
    event_name: str = "schedule",
    cancel_after: str | None = None,
) -> JobRun:
    """Which steps run when the steps named in ``outcomes`` end with that outcome ('failure')."""
    outcomes = outcomes or {}
    status = Status()
    steps_context: dict[str, Any] = {}
    context: dict[str, Any] = {
        "inputs": inputs or {},
        "github": {"event_name": event_name},
        "steps": steps_context,
        "vars": {},
        "env": {},
    }
    result = JobRun()
    known = {step_key(s) for s in job["steps"]}
    unknown = set(outcomes) - known
    if unknown:
        raise ValueError(f"no such steps: {sorted(unknown)}")
    for step in job["steps"]:
        key = step_key(step)
        if condition_holds(step.get("if"), context, status):
            outcome = outcomes.get(key, "success")
            result.ran.append(key)
            if outcome == "failure" and not step.get("continue-on-error"):
                status.failed = True
        else:
            outcome = "skipped"
            result.skipped.append(key)
        if "id" in step:
            steps_context[step["id"]] = {"outcome": outcome, "conclusion": outcome, "outputs": {}}
        if cancel_after == key:
            status.cancelled = True
    result.failed = status.failed
    return result


def run_step_script(
    job: dict[str, Any],
    step: dict[str, Any],
    vars_: dict[str, str],
    *,
    cwd: Path,
    github: dict[str, Any] | None = None,
    inputs: dict[str, Any] | None = None,
    extra_env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run one step's script as the runner would: bash -eo pipefail, env from the job and the step."""
    context = {"vars": vars_, "github": github or {}, "inputs": inputs or {}, "matrix": {}, "steps": {}}
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd), "LANG": "C.UTF-8", **(extra_env or {})}
    for mapping in (job.get("env", {}), step.get("env", {})):
        for name, value in mapping.items():
            env[name] = expand(value, context)
    script = cwd / "step.sh"
    script.write_text(step["run"])
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
