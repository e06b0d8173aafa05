"""Every GitHub Actions workflow in .github/workflows/ is valid and hardened.

- It validates against the GitHub workflow schema (check-jsonschema's vendored copy, no network).
- zizmor (offline audits) finds nothing: no template injection, no persisted checkout credentials,
  no excessive permissions, no unpinned actions.
- Every `uses:` names a full 40-hex commit SHA with a `# vX` comment saying which release it is.
- No `run:` script contains `${{ }}`: values reach scripts through `env:` only, so a tag or branch
  name can never become shell code.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

WORKFLOW_DIR = Path(__file__).resolve().parent.parent / ".github" / "workflows"
WORKFLOWS = sorted([*WORKFLOW_DIR.glob("*.yml"), *WORKFLOW_DIR.glob("*.yaml")])
PINNED = re.compile(r"^[^@\s]+@[0-9a-f]{40}$")
USES_LINE = re.compile(r"^\s*(?:-\s+)?uses:\s*(?P<ref>\S+)(?P<rest>.*)$")


def venv_tool(name: str) -> str:
    """The tool installed beside this interpreter (the project venv), else on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is not installed (pip install -e '.[dev]')"
    return found


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def steps_and_jobs(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    """Every job and every step: the places `uses:` and `run:` may appear."""
    found = []
    for job in workflow["jobs"].values():
        found.append(job)
        found += job.get("steps", [])
    return found


def ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_there_are_workflows_to_check() -> None:
    assert WORKFLOWS, "no workflow files found under .github/workflows"


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids(WORKFLOWS))
def test_workflow_matches_the_github_schema(path: Path) -> None:
    result = subprocess.run(
        [venv_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_finds_nothing() -> None:
    result = subprocess.run(
        [venv_tool("zizmor"), "--offline", "--no-progress", "--color", "never", *map(str, WORKFLOWS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids(WORKFLOWS))
def test_every_action_is_pinned_to_a_commit(path: Path) -> None:
    uses = [item["uses"] for item in steps_and_jobs(load(path)) if "uses" in item]
    unpinned = [ref for ref in uses if not ref.startswith("./") and not PINNED.match(ref)]
    assert unpinned == [], f"{path.name}: pin these by full commit SHA: {unpinned}"
    # The comment tells a reviewer (and Dependabot) which release the SHA is.
    for line in path.read_text().splitlines():
        match = USES_LINE.match(line)
        if match and not match["ref"].startswith("./"):
            assert re.search(r"#\s*v\d", match["rest"]), f"{path.name}: no '# vX' comment on: {line.strip()}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids(WORKFLOWS))
def test_no_expression_is_expanded_inside_a_script(path: Path) -> None:
    scripts = [item["run"] for item in steps_and_jobs(load(path)) if "run" in item]
    injected = [script for script in scripts if "${{" in script]
    assert injected == [], f"{path.name}: pass values through env:, not ${{{{ }}}} in run: {injected}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=ids(WORKFLOWS))
def test_checkout_never_persists_credentials(path: Path) -> None:
    for item in steps_and_jobs(load(path)):
        if str(item.get("uses", "")).startswith("actions/checkout@"):
            assert item.get("with", {}).get("persist-credentials") is False, path.name
