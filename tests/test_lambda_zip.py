"""``make lambda-zip`` (packaging/build_lambda.py): the Lambda's code in one zip that stands alone.

Built offline from this interpreter's packages (``--from-this-python``), extracted as Lambda
extracts it (``/var/task``), then run by a clean interpreter (``-I -S``: no site-packages, no
environment, nothing from this checkout): the reports route answers 202, the console route
answers 200 with a JWT principal, and cryptography's native code signs and verifies. boto3 is not
in the zip (the Lambda runtime provides it) and the reports route never needs it for SQLite.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.publisher_fixtures import REPO

pytestmark = pytest.mark.slow

CHECK = r"""
import json, sys, time, uuid
sys.path.insert(0, sys.argv[1])
import os
os.environ["AVIKA_REPORTS"] = "sqlite:///" + sys.argv[2]
os.environ["AVIKA_FLEET_SECRET"] = "zip-test-fleet-secret-0123456789"
from infra.reports import handler
from infra.reports.auth import make_token
stream = "%013x0123456789abcdef" % int(time.time() * 1000)
event = {"event_id": str(uuid.uuid4()), "agent_id": "a1", "stream": stream, "seq": 1,
         "time": "2026-02-15T20:00:00Z", "state": "downloading", "version": "0.1.43", "mode": "vm",
         "platform": "linux-amd64", "target_version": "0.1.44", "manifest_serial": 1}
reports = {"rawPath": "/v1/reports", "requestContext": {"http": {"method": "POST", "path": "/v1/reports"}},
           "headers": {"authorization": "Bearer " + make_token("zip-test-fleet-secret-0123456789", "a1")},
           "body": json.dumps({"events": [event]}), "isBase64Encoded": False}
first = handler.handler(reports, None)["statusCode"]
console_loaded_by_reports = "infra.reports.console_api" in sys.modules
claims = {"sub": "ops", "scope": "avika/read"}
context = {"http": {"method": "GET", "path": "/v1/fleet"}, "authorizer": {"jwt": {"claims": claims}}}
fleet = {"rawPath": "/v1/fleet", "rawQueryString": "", "headers": {}, "requestContext": context}
answer = handler.handler(fleet, None)
from agent.manifest import LocalSigner, generate_private_key, sign_envelope, verify_envelope
signer = LocalSigner(generate_private_key())
verify_envelope(sign_envelope(b"{}", [signer]), [signer.public_key])
import cryptography
agents = [a["agent_id"] for a in json.loads(answer["body"])["agents"]]
print(json.dumps({"reports": first, "console_loaded_by_reports": console_loaded_by_reports,
                  "fleet": answer["statusCode"], "agents": agents,
                  "cryptography_from": cryptography.__file__, "boto3": "boto3" in sys.modules}))
"""


def test_the_zip_runs_in_a_clean_interpreter(tmp_path: Path) -> None:
    out = tmp_path / "avika-reports-lambda.zip"
    built = subprocess.run(
        [
            sys.executable,
            str(REPO / "packaging" / "build_lambda.py"),
            "--out",
            str(out),
            "--from-this-python",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    names = zipfile.ZipFile(out).namelist()
    assert (
        "infra/reports/handler.py" in names and "publisher/fleet.py" in names and "agent/manifest.py" in names
    )
    assert any(n.startswith("cryptography/") for n in names) and any(
        n.startswith("packaging/") for n in names
    )
    assert not any(n.split("/")[0] in ("boto3", "botocore", "tests", "demo") for n in names)
    assert not any("__pycache__" in n or n.startswith("publisher/console/") for n in names)
    task = tmp_path / "var-task"
    zipfile.ZipFile(out).extractall(task)

    ran = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CHECK, str(task), str(tmp_path / "reports.db")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # not the checkout: nothing may come from it
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    assert result["reports"] == 202 and result["console_loaded_by_reports"] is False
    assert (result["fleet"], result["agents"]) == (200, ["a1"])
    assert result["cryptography_from"].startswith(str(task)) and result["boto3"] is False


def test_the_zip_is_reproducible(tmp_path: Path) -> None:
    outs = [tmp_path / "a.zip", tmp_path / "b.zip"]
    for out in outs:
        subprocess.run(
            [
                sys.executable,
                str(REPO / "packaging" / "build_lambda.py"),
                "--out",
                str(out),
                "--from-this-python",
            ],
            capture_output=True,
            timeout=300,
            check=True,
        )
    assert outs[0].read_bytes() == outs[1].read_bytes()
