"""Lambda configuration: where the fleet secret comes from, caching, and config errors (DESIGN §5)."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
import reports_fixtures
from reports_fixtures import (
    AGENT,
    PREVIOUS,
    SECRET,
    LambdaContext,
    api_event,
    bearer,
    create_table,
    make_event,
)

from infra.reports import handler as lambda_handler
from infra.reports.store import SQLiteStore

# Fixtures shared through the helper module (tests/ has no conftest of ours).
aws = reports_fixtures.aws
clean_config = reports_fixtures.clean_config


def _post(agent_id: str = AGENT, secret: str = SECRET) -> tuple[int, dict]:
    event = api_event({"events": [make_event(agent_id=agent_id)]}, headers=bearer(agent_id, secret))
    answer = lambda_handler.handler(event, LambdaContext())
    return answer["statusCode"], json.loads(answer["body"])


@pytest.fixture
def table(aws: None, clean_config: None, monkeypatch: pytest.MonkeyPatch) -> str:
    create_table("reports")
    monkeypatch.setenv("AVIKA_REPORTS_TABLE", "reports")
    return "reports"


def test_secret_from_secrets_manager_is_read_once(table: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sm = boto3.client("secretsmanager")
    sm.create_secret(Name="avika/fleet", SecretString=f"{SECRET},{PREVIOUS}")
    monkeypatch.setenv("AVIKA_FLEET_SECRET_ID", "avika/fleet")

    assert _post()[0] == 202
    sm.delete_secret(SecretId="avika/fleet", ForceDeleteWithoutRecovery=True)

    # Cached for the container's life: the deleted secret is not read again.
    assert _post(secret=PREVIOUS)[0] == 202
    assert _post(agent_id="host-02")[0] == 202

    lambda_handler.reset()  # a new container must read it, and now cannot
    assert _post() == (500, {"error": "misconfigured", "reason": "the report endpoint is misconfigured"})


def test_secret_from_ssm_securestring_is_decrypted(table: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ssm = boto3.client("ssm")
    ssm.put_parameter(Name="/avika/fleet-secret", Value=SECRET, Type="SecureString")
    monkeypatch.setenv("AVIKA_FLEET_SECRET_PARAMETER", "/avika/fleet-secret")

    assert _post()[0] == 202
    ssm.delete_parameter(Name="/avika/fleet-secret")
    assert _post()[0] == 202
    assert _post(secret=PREVIOUS)[0] == 401  # only the current secret is configured


def test_secrets_manager_wins_over_the_plain_variable(table: str, monkeypatch: pytest.MonkeyPatch) -> None:
    boto3.client("secretsmanager").create_secret(Name="fleet", SecretString=SECRET)
    monkeypatch.setenv("AVIKA_FLEET_SECRET_ID", "fleet")
    monkeypatch.setenv("AVIKA_FLEET_SECRET", PREVIOUS)
    assert _post()[0] == 202
    assert _post(secret=PREVIOUS)[0] == 401


@pytest.mark.parametrize(
    "secret",
    [None, "", "too-short", f"{SECRET},short", f"{SECRET},{PREVIOUS},{SECRET}"],
    ids=["unset", "empty", "short", "short previous", "three"],
)
def test_bad_secret_is_a_logged_500_without_traceback(
    table: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], secret: str | None
) -> None:
    if secret is not None:
        monkeypatch.setenv("AVIKA_FLEET_SECRET", secret)
    capsys.readouterr()

    status, body = _post()

    assert (status, body["error"]) == (500, "misconfigured")
    assert "Traceback" not in json.dumps(body)
    logs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert logs[0]["level"] == "ERROR" and "secret" in logs[0]["error"]
    assert logs[-1]["status"] == 500


def test_missing_secrets_manager_secret_is_500(table: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVIKA_FLEET_SECRET_ID", "does-not-exist")
    assert _post()[0] == 500


def test_missing_table_is_503_so_agents_retry(aws: None, clean_config: None, monkeypatch) -> None:
    monkeypatch.setenv("AVIKA_REPORTS_TABLE", "no-such-table")
    monkeypatch.setenv("AVIKA_FLEET_SECRET", SECRET)
    assert _post() == (503, {"error": "unavailable", "reason": "report store unavailable; retry later"})


def test_one_json_log_line_per_request(
    table: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AVIKA_FLEET_SECRET", SECRET)
    _post()
    _post(secret=PREVIOUS)
    lines = capsys.readouterr().out.splitlines()
    first, second = (json.loads(line) for line in lines)
    assert (first["status"], first["accepted"], first["agent_id"], first["cold_start"]) == (
        202,
        1,
        AGENT,
        True,
    )
    assert first["request_id"] == LambdaContext.aws_request_id
    assert (second["status"], second["level"], second["cold_start"]) == (401, "WARNING", False)
    assert SECRET not in "".join(lines) and "Bearer" not in "".join(lines)


def test_sqlite_url_runs_the_same_handler(
    clean_config: None, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AVIKA_REPORTS", "sqlite:///data/reports.db")  # relative to the working directory
    monkeypatch.setenv("AVIKA_FLEET_SECRET", SECRET)
    assert _post()[0] == 202
    assert SQLiteStore(tmp_path / "data" / "reports.db").agent(AGENT)["agent_id"] == AGENT


def test_ttl_days_is_configurable(clean_config: None, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("AVIKA_REPORTS", f"sqlite:///{tmp_path}/r.db")
    monkeypatch.setenv("AVIKA_FLEET_SECRET", SECRET)
    monkeypatch.setenv("AVIKA_REPORTS_TTL_DAYS", "7")
    assert lambda_handler.endpoint().store.ttl_seconds == 7 * 86400
    lambda_handler.reset()
    monkeypatch.setenv("AVIKA_REPORTS_TTL_DAYS", "soon")
    assert _post()[0] == 500


def test_handler_module_does_not_import_boto3() -> None:
    import subprocess
    import sys

    code = "import sys, infra.reports.handler; print('boto3' in sys.modules, 'sqlite3' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    ).stdout
    assert out.split() == ["False", "False"]
