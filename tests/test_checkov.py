"""checkov (offline, `--skip-download`) finds nothing in the CloudFormation template or the workflows.

- No failed check, and no parsing error, in infra/template.yaml and .github/workflows/*.yml.
- A check that does not apply is skipped where it applies (a resource's `Metadata: checkov: skip:` or an
  inline `# checkov:skip=ID: reason` in a workflow), and every skip says why.
- Both frameworks actually ran: a scan that silently parsed nothing must not pass.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.test_infra_template import TEMPLATE, venv_tool
from tests.test_workflows import WORKFLOWS


@pytest.fixture(scope="module")
def reports() -> dict[str, dict[str, Any]]:
    files = [TEMPLATE, *WORKFLOWS]
    result = subprocess.run(
        [
            venv_tool("checkov"),
            "--skip-download",
            "--framework",
            "cloudformation",
            "github_actions",
            "--output",
            "json",
            *[arg for path in files for arg in ("--file", str(path))],
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(TEMPLATE).parent.parent,
    )
    parsed = json.loads(result.stdout)
    by_type = {report["check_type"]: report for report in (parsed if isinstance(parsed, list) else [parsed])}
    assert result.returncode in (0, 1), result.stderr[-2000:]
    return by_type


def describe(check: dict[str, Any]) -> str:
    return f"{check['check_id']} {check['check_name']} on {check['resource']} ({check['file_path']})"


@pytest.mark.parametrize("framework", ["cloudformation", "github_actions"])
def test_checkov_finds_nothing(framework: str, reports: dict[str, dict[str, Any]]) -> None:
    assert framework in reports, f"checkov did not scan with {framework}: {sorted(reports)}"
    report = reports[framework]
    summary = report["summary"]
    assert summary["parsing_errors"] == 0, summary
    assert summary["passed"] > 0, f"{framework}: no check passed, so nothing was scanned"
    failed = [describe(c) for c in report["results"]["failed_checks"]]
    assert failed == [], "\n".join(failed)


@pytest.mark.parametrize("framework", ["cloudformation", "github_actions"])
def test_every_skip_gives_its_reason(framework: str, reports: dict[str, dict[str, Any]]) -> None:
    skipped = reports[framework]["results"]["skipped_checks"]
    for check in skipped:
        reason = (check.get("check_result") or {}).get("suppress_comment") or ""
        assert len(reason.strip()) >= 20 and reason != "No comment provided", describe(check)
