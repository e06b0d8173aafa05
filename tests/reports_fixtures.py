"""Shared helpers for the reports tests: valid events, API Gateway v2.0 events, both real stores.

`backend` runs a test against the SQLite store (a file in tmp_path) and the DynamoDB store (moto's
`mock_aws`, table built as the CloudFormation template builds it), through the real Lambda handler.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from infra.reports import handler as lambda_handler
from infra.reports.auth import make_token
from infra.reports.dynamodb import GSI_NAME, GSI_PK, GSI_SK, PK, SK, TTL_ATTRIBUTE, DynamoDBStore
from infra.reports.store import ReportStore, SQLiteStore

SECRET = "current-fleet-secret-0123456789"
PREVIOUS = "previous-fleet-secret-987654321"
NOW = 1_771_185_600.0  # 2026-02-15T20:00:00Z
AGENT = "host-01.example.com"


def stream_at(epoch: float, rand: str = "0123456789abcdef") -> str:
    """A stream id created at `epoch` (13 hex digits of ms, 16 random hex digits)."""
    return f"{int(epoch * 1000):013x}{rand}"


STREAM = stream_at(NOW - 3600)


def make_event(**overrides: Any) -> dict[str, Any]:
    """A valid event (DESIGN §5); `overrides` replace fields, a value of `...` removes one."""
    event: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "agent_id": AGENT,
        "stream": STREAM,
        "seq": 1,
        "time": "2026-02-15T19:59:58.123Z",
        "state": "downloading",
        "version": "0.1.43",
        "mode": "vm",
        "platform": "linux-amd64",
        "target_version": "0.1.44",
        "manifest_serial": 42,
    }
    for name, value in overrides.items():
        if value is ...:
            event.pop(name, None)
        else:
            event[name] = value
    return event


def bearer(agent_id: str = AGENT, secret: str = SECRET) -> dict[str, str]:
    return {"authorization": f"Bearer {make_token(secret, agent_id)}"}


def api_event(
    body: bytes | str | dict[str, Any] | None,
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    base64_encoded: bool = False,
) -> dict[str, Any]:
    """An API Gateway HTTP API payload-2.0 event, as the Lambda receives it."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, bytes) or base64_encoded:
        raw = body.encode() if isinstance(body, str) else body
        text, encoded = base64.b64encode(raw or b"").decode(), True
    else:
        text, encoded = body, False
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "POST /v1/reports",
        "rawPath": "/v1/reports",
        "rawQueryString": "",
        "headers": {"content-type": "application/json", "host": "reports.example.com", **(headers or {})},
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "abc123",
            "domainName": "reports.example.com",
            "http": {
                "method": method,
                "path": "/v1/reports",
                "protocol": "HTTP/1.1",
                "sourceIp": "198.51.100.7",
                "userAgent": "avika-agent/0.1.43",
            },
            "requestId": "req-1",
            "routeKey": "POST /v1/reports",
            "stage": "$default",
            "time": "15/Feb/2026:20:00:00 +0000",
            "timeEpoch": int(NOW * 1000),
        },
        "isBase64Encoded": encoded,
    }
    if text is not None:
        event["body"] = text
    return event


class LambdaContext:
    aws_request_id = "11111111-2222-3333-4444-555555555555"
    function_name = "avika-reports"


@dataclass
class Clock:
    now: float = NOW

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """The Lambda handler wired to one real store, plus a second store object to read back with."""

    name: str
    store: ReportStore
    clock: Clock = field(default_factory=Clock)

    def invoke(self, event: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        endpoint = lambda_handler.endpoint()  # configure (or reuse) the container's endpoint
        endpoint.clock = self.clock
        answer = lambda_handler.handler(event, LambdaContext())
        return answer["statusCode"], json.loads(answer["body"]), answer["headers"]

    def post(
        self, events: list[dict[str, Any]], agent_id: str = AGENT, secret: str = SECRET
    ) -> tuple[int, dict[str, Any]]:
        """POST `{"events": events}` with `agent_id`'s token made from `secret`."""
        status, body, _ = self.invoke(api_event({"events": events}, headers=bearer(agent_id, secret)))
        return status, body


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def create_table(name: str) -> None:
    """The table as `infra/template.yaml` declares it: pk/sk, sparse `state-index`, TTL."""
    import boto3

    client = boto3.client("dynamodb")
    client.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": n, "AttributeType": "S"} for n in (PK, SK, GSI_PK, GSI_SK)],
        KeySchema=[{"AttributeName": PK, "KeyType": "HASH"}, {"AttributeName": SK, "KeyType": "RANGE"}],
        GlobalSecondaryIndexes=[
            {
                "IndexName": GSI_NAME,
                "KeySchema": [
                    {"AttributeName": GSI_PK, "KeyType": "HASH"},
                    {"AttributeName": GSI_SK, "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            }
        ],
    )
    client.update_time_to_live(
        TableName=name, TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE}
    )


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """moto's in-process AWS with fake credentials (never the real account)."""
    import boto3
    from moto import mock_aws

    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws():
        boto3.setup_default_session(botocore_session=_botocore_session())
        yield
    boto3.DEFAULT_SESSION = None


_LOADER: list[Any] = []


def _botocore_session() -> Any:
    """A fresh botocore session sharing one model loader: parsing the service JSON once, not per test."""
    import botocore.loaders
    import botocore.session

    if not _LOADER:
        _LOADER.append(botocore.loaders.create_loader())
    session = botocore.session.get_session()
    session.register_component("data_loader", _LOADER[0])
    return session


@pytest.fixture
def clean_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No inherited configuration, and no endpoint cached from another test."""
    for name in (
        "AVIKA_REPORTS_TABLE",
        "AVIKA_REPORTS",
        "AVIKA_FLEET_SECRET_ID",
        "AVIKA_FLEET_SECRET_PARAMETER",
        "AVIKA_FLEET_SECRET",
        "AVIKA_REPORTS_TTL_DAYS",
    ):
        monkeypatch.delenv(name, raising=False)
    lambda_handler.reset()
    yield
    lambda_handler.reset()


@pytest.fixture(params=["sqlite", "dynamodb"])
def backend(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, clean_config: None
) -> Iterator[Backend]:
    monkeypatch.setenv("AVIKA_FLEET_SECRET", f"{SECRET},{PREVIOUS}")
    if request.param == "sqlite":
        path = tmp_path / "reports.db"
        monkeypatch.setenv("AVIKA_REPORTS", f"sqlite:///{path}")
        store = SQLiteStore(path)
        yield Backend("sqlite", store)
        store.close()
    else:
        request.getfixturevalue("aws")
        create_table("avika-reports")
        monkeypatch.setenv("AVIKA_REPORTS_TABLE", "avika-reports")
        yield Backend("dynamodb", DynamoDBStore("avika-reports"))
