"""`make demo` runs as a test: the newcomer's first command must keep working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_publishes_serves_and_agents_decide(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "demo" / "run_demo.py"), "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    out = result.stdout
    assert "published 0.1.43 as serial 1" in out
    assert "published 0.1.44 as serial 2, rollout 50 %" in out
    assert "update (newer_version)" in out and "not_in_wave" in out and "report (container)" in out
    assert "avika-agent check  -> exit 3" in out and "signature_invalid" in out
    assert (tmp_path / "demo" / "updates" / "manifests" / "2.json").is_file()
