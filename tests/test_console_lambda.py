"""The operator API in the Lambda (DESIGN section 9): the real handler, payload-2.0 events with the
JWT authorizer's claims, DynamoDB and S3 under moto, signing with a key file or "KMS".

Rules enforced here:
- the handler dispatches by route: console routes to the operator API, ``/v1/reports`` as before;
  the reports route never imports the console (publisher, cryptography): cold start unchanged;
- no claims (no authorizer on the route, or an agent's report token in the header): 401; claims
  without ``sub``, or from another issuer / audience when those are configured: 401;
- scopes ``avika/read`` / ``avika/operate`` in ``scope`` (space-separated) or ``scp`` (a list, as
  API Gateway renders it: ``[a b]``); a missing scope is 403;
- actions: 428 without ``If-Match``, 412 when the serial moved; a halt re-signs the S3 store's
  manifest (verifiable, rollout 0) and is audited in DynamoDB (``pk=AUDIT``) with the JWT ``sub``;
- with ``AVIKA_KMS_KEY_ID`` the halt is signed through KMS's API (``MessageType=RAW``,
  ``ED25519_SHA_512``; moto has no Ed25519, so a botocore hook answers with a real local key);
- heartbeats move ``last_seen`` in DynamoDB; the whole-fleet summary is read once per minute, not
  on every poll.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
import reports_fixtures
from reports_fixtures import LambdaContext, bearer, create_table

from agent.manifest import LocalSigner, verify_manifest
from infra.reports import console_lambda
from infra.reports import handler as lambda_handler
from infra.reports.dynamodb import AUDIT_PK
from publisher.signing import load_private_key_pem
from publisher.store_url import open_store
from tests.publisher_fixtures import REPO, KeyFile, cli, make_binary, new_key_file

aws = reports_fixtures.aws
clean_config = reports_fixtures.clean_config

BUCKET = "avika-updates"
STORE = f"s3://{BUCKET}/updates"
TABLE = "avika-reports"
SECRET = "lambda-console-fleet-secret-0123"
READER = {"sub": "alice@example.com", "scope": "openid avika/read"}
OPERATOR = {"sub": "bob@example.com", "scp": "[avika/read avika/operate]"}


def console_event(
    method: str,
    path: str,
    *,
    claims: dict[str, Any] | None = None,
    query: str = "",
    headers: dict[str, str] | None = None,
    body: Any = None,
) -> dict[str, Any]:
    """A payload-2.0 event as the HTTP API sends it to the Lambda after its JWT authorizer."""
    context: dict[str, Any] = {
        "accountId": "123456789012",
        "apiId": "abc123",
        "domainName": "updates.example.com",
        "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "198.51.100.7"},
        "requestId": str(uuid.uuid4()),
        "routeKey": f"{method} {path}",
        "stage": "$default",
    }
    if claims is not None:
        context["authorizer"] = {"jwt": {"claims": claims, "scopes": None}}
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": f"{method} {path}",
        "rawPath": path,
        "rawQueryString": query,
        "headers": {"host": "updates.example.com", **(headers or {})},
        "requestContext": context,
        "isBase64Encoded": False,
    }
    if body is not None:
        event["body"] = json.dumps(body)
    return event


def invoke(event: dict[str, Any]) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
    answer = lambda_handler.handler(event, LambdaContext())
    body = json.loads(answer["body"]) if answer["body"] else None
    return answer["statusCode"], body, answer["headers"]


def report(agent_id: str, state: str, seq: int, **fields: Any) -> None:
    event = {
        "event_id": str(uuid.uuid4()),
        "agent_id": agent_id,
        "stream": f"{int(datetime.now(UTC).timestamp() * 1000) - 60_000:013x}0123456789abcdef",
        "seq": seq,
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "state": state,
        "version": "0.1.43",
        "mode": "vm",
        "platform": "linux-amd64",
        "target_version": "0.1.44",
        "manifest_serial": 1,
        **fields,
    }
    answer = lambda_handler.handler(
        reports_fixtures.api_event({"events": [event]}, headers=bearer(agent_id, SECRET)), LambdaContext()
    )
    assert answer["statusCode"] == 202, answer


class Cloud:
    def __init__(self, key: KeyFile) -> None:
        self.key = key

    def live(self) -> Any:
        data = open_store(STORE).read("manifest.json")
        return verify_manifest(data, trusted=[self.key.public], now=datetime.now(UTC))


@pytest.fixture
def cloud(aws: None, clean_config: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Cloud]:
    create_table(TABLE)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    key = new_key_file(tmp_path)
    binary = tmp_path / "avika-agent"
    make_binary(binary, 4096, "0.1.44")
    done = cli(
        "release", "0.1.44", "--binary", f"linux-amd64={binary}", "--rollout", "25", "--init",
        "--key", str(key.path), "--store", STORE, "--no-inspect",
    )  # fmt: skip
    assert done.exit_code == 0, done.stderr
    for name in ("AVIKA_KMS_KEY_ID", "AVIKA_PUBLIC_KEYS", "AVIKA_CLOUDFRONT_DISTRIBUTION_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AVIKA_CONSOLE_JWT_ISSUER", raising=False)
    monkeypatch.delenv("AVIKA_CONSOLE_JWT_AUDIENCE", raising=False)
    monkeypatch.setenv("AVIKA_REPORTS_TABLE", TABLE)
    monkeypatch.setenv("AVIKA_FLEET_SECRET", SECRET)
    monkeypatch.setenv("AVIKA_STORE", STORE)
    monkeypatch.setenv("AVIKA_SIGNING_KEY", str(key.path))
    yield Cloud(key)


# ---------------------------------------------------------------- auth


@pytest.mark.parametrize(
    ("claims", "headers"),
    [
        (None, {}),  # a route without the authorizer: fail closed
        (None, {"authorization": f"Bearer {'ab' * 32}"}),  # a report-token-shaped header is not a claim
        ({"scope": "avika/operate"}, {}),  # no sub
        ({"sub": "", "scope": "avika/operate"}, {}),
        ("not-claims", {}),
    ],
)
@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v1/fleet"), ("POST", "/v1/halt"), ("GET", "/v1/agents/a")]
)
def test_without_valid_claims_it_is_401(
    cloud: Cloud, claims: Any, headers: dict, method: str, path: str
) -> None:
    status, body, answer_headers = invoke(
        console_event(method, path, claims=claims, headers={"if-match": '"1"', **headers})
    )
    assert status == 401 and body["error"] == "unauthorized"
    assert answer_headers["Cache-Control"] == "no-store"
    assert cloud.live().serial == 1


def test_an_agents_report_token_never_opens_the_console(cloud: Cloud) -> None:
    report("vm-1", "downloading", 1)
    status, _, _ = invoke(console_event("GET", "/v1/fleet", headers=bearer("vm-1", SECRET)))
    assert status == 401


@pytest.mark.parametrize(
    ("claims", "method", "path", "expected"),
    [
        ({"sub": "x", "scope": "openid email"}, "GET", "/v1/fleet", 403),
        (READER, "GET", "/v1/fleet", 200),
        (READER, "POST", "/v1/halt", 403),
        ({"sub": "x", "scp": ["avika/operate"]}, "GET", "/v1/releases", 200),  # operate includes read
        ({"sub": "x", "scope": "avika/read avika/operate"}, "POST", "/v1/halt", 428),
        (OPERATOR, "POST", "/v1/halt", 428),
    ],
)
def test_scopes_from_scope_or_scp(cloud: Cloud, claims: dict, method: str, path: str, expected: int) -> None:
    status, body, _ = invoke(console_event(method, path, claims=claims))
    assert status == expected, body
    assert cloud.live().serial == 1


def test_issuer_and_audience_are_enforced_when_configured(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AVIKA_CONSOLE_JWT_ISSUER", "https://idp.example.com/")
    monkeypatch.setenv("AVIKA_CONSOLE_JWT_AUDIENCE", "avika-console")
    good = {**READER, "iss": "https://idp.example.com/", "aud": "avika-console"}
    assert invoke(console_event("GET", "/v1/fleet", claims=good))[0] == 200
    assert (
        invoke(console_event("GET", "/v1/fleet", claims={**good, "iss": "https://evil.example/"}))[0] == 401
    )
    assert invoke(console_event("GET", "/v1/fleet", claims={**good, "aud": "[other]"}))[0] == 401
    cognito = {**READER, "iss": "https://idp.example.com/", "client_id": "avika-console"}  # access tokens
    assert invoke(console_event("GET", "/v1/fleet", claims=cognito))[0] == 200


# ---------------------------------------------------------------- actions


def test_halt_through_the_lambda_resigns_the_s3_store_and_is_audited(cloud: Cloud) -> None:
    missing = invoke(console_event("POST", "/v1/halt", claims=OPERATOR))
    assert missing[0] == 428
    moved = invoke(console_event("POST", "/v1/halt", claims=OPERATOR, headers={"if-match": '"7"'}))
    assert moved[0] == 412 and moved[1]["live_serial"] == 1
    assert cloud.live().serial == 1

    status, body, _ = invoke(console_event("POST", "/v1/halt", claims=OPERATOR, headers={"if-match": '"1"'}))
    assert status == 200, body
    assert body == {
        "serial": 2,
        "version": "0.1.44",
        "percent": 0,
        "status": "published",
        "previous_serial": 1,
    }
    live = cloud.live()
    assert (live.serial, live.rollout.percent) == (2, 0)

    items = boto3.client("dynamodb").query(
        TableName=TABLE,
        KeyConditionExpression="pk = :p",
        ExpressionAttributeValues={":p": {"S": AUDIT_PK}},
    )["Items"]
    assert [
        (i["who"]["S"], i["action"]["S"], i["serial_before"]["N"], i["serial_after"]["N"]) for i in items
    ] == [("bob@example.com", "halt", "1", "2")]
    status, releases, _ = invoke(console_event("GET", "/v1/releases", claims=READER))
    assert status == 200 and releases["audit"][0]["who"] == "bob@example.com"
    assert releases["live"]["halted"] is True and [h["serial"] for h in releases["history"]] == [2, 1]
    assert releases["session"] == {"who": "alice@example.com", "scopes": ["read"], "can_sign": True}


def test_rollout_through_kms(cloud: Cloud, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """AVIKA_KMS_KEY_ID: the Lambda signs through KMS's API; a botocore hook plays KMS with a real key."""
    from cryptography.hazmat.primitives import serialization

    monkeypatch.delenv("AVIKA_SIGNING_KEY")
    monkeypatch.setenv("AVIKA_KMS_KEY_ID", "alias/avika-signing")
    private = load_private_key_pem(cloud.key.path.read_bytes())
    local = LocalSigner(private)
    calls: list[str] = []

    from botocore.awsrequest import AWSResponse

    ok = AWSResponse("https://kms.us-east-1.amazonaws.com/", 200, {}, None)

    def play_kms(params: dict[str, Any], model: Any, **_: Any) -> Any:
        calls.append(model.name)
        params = json.loads(params["body"])  # the JSON request KMS would receive
        if model.name == "GetPublicKey":
            der = private.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            return ok, {"KeyId": params["KeyId"], "PublicKey": der, "KeySpec": "ECC_NIST_EDWARDS25519"}
        assert (params["MessageType"], params["SigningAlgorithm"]) == ("RAW", "ED25519_SHA_512")
        signature = local.sign(base64.b64decode(params["Message"]))
        return ok, {"KeyId": params["KeyId"], "Signature": signature}

    api = console_lambda.api()
    [signer] = api.releases.signing()
    signer.client.meta.events.register("before-call.kms.*", play_kms)
    status, body, _ = invoke(
        console_event(
            "POST", "/v1/rollout", claims=OPERATOR, headers={"if-match": '"1"'}, body={"percent": 60}
        )
    )
    assert status == 200, body
    assert (cloud.live().serial, cloud.live().rollout.percent) == (2, 60)
    assert "Sign" in calls


# ---------------------------------------------------------------- reads


def test_fleet_from_dynamodb_with_heartbeats_and_a_cached_summary(cloud: Cloud) -> None:
    for n, state in enumerate(("downloading", "verifying", "staged", "restarting"), 1):
        report("vm-1", state, n)
    report("vm-1", "rolled_back", 5, failed_state="watching", error="died_before_commit: exit 1")
    report("ctr-1", "update_available", 1, mode="container", image="ghcr.io/avika/agent:0.1.44")
    report("vm-2", "heartbeat", 1, target_version=None, manifest_serial=None, last_result="up_to_date")

    status, body, headers = invoke(console_event("GET", "/v1/fleet", claims=READER))
    assert status == 200, body
    rows = {a["agent_id"]: a for a in body["agents"]}
    assert rows["vm-1"]["last_error"] == "watching: died_before_commit: exit 1"
    assert rows["vm-2"]["last_result"] == "up_to_date" and rows["vm-2"]["stale"] is False
    assert (
        body["summary"]["total"] == 3 and body["summary"]["update_available"] == 1
    )  # ctr-1; vm-1 rolled back
    assert body["release"]["serial"] == 1
    tag = headers["ETag"]
    assert invoke(console_event("GET", "/v1/fleet", claims=READER, headers={"if-none-match": tag}))[0] == 304

    api = console_lambda.api()
    assert api.summaries.passes == 1  # two polls, one whole-fleet read
    clock = [datetime.now(UTC).timestamp()]
    api.summaries.clock = lambda: clock[0]
    report("vm-3", "downloading", 1)
    invoke(console_event("GET", "/v1/fleet", claims=READER))
    passes_now = api.summaries.passes
    clock[0] += 30
    _, cached, _ = invoke(console_event("GET", "/v1/fleet", claims=READER))
    assert api.summaries.passes == passes_now  # within the minute: the cached summary
    assert len(cached["agents"]) == 4  # while the page itself is read fresh
    clock[0] += 31
    _, fresh, _ = invoke(console_event("GET", "/v1/fleet", claims=READER))
    assert api.summaries.passes == passes_now + 1 and fresh["summary"]["total"] == 4

    status, history, _ = invoke(console_event("GET", "/v1/agents/vm-1", claims=READER))
    assert status == 200 and [e["state"] for e in history["events"]][-1] == "rolled_back"


def test_fleet_pages_through_dynamodb_shards(cloud: Cloud) -> None:
    ids = sorted(f"agent-{n:02d}" for n in range(23))
    for agent_id in ids:
        report(agent_id, "downloading", 1)
    seen: list[str] = []
    query = "limit=5"
    while True:
        status, body, _ = invoke(console_event("GET", "/v1/fleet", claims=READER, query=query))
        assert status == 200, body
        seen += [a["agent_id"] for a in body["agents"]]
        if "next" not in body:
            break
        query = f"limit=5&cursor={body['next']}"
    assert sorted(seen) == ids and len(seen) == len(set(seen))
    bad = base64.urlsafe_b64encode(b"99:agent-01").decode().rstrip("=")
    assert invoke(console_event("GET", "/v1/fleet", claims=READER, query=f"cursor={bad}"))[0] == 400


def test_the_reports_route_never_imports_the_console(tmp_path: Path) -> None:
    """Cold start: /v1/reports loads neither the console nor the publisher nor cryptography."""
    code = f"""
import json, sys, os
os.environ["AVIKA_REPORTS"] = "sqlite:///{tmp_path}/r.db"
os.environ["AVIKA_FLEET_SECRET"] = "{SECRET}"
sys.path.insert(0, {str(REPO / "tests")!r})
from infra.reports import handler
from reports_fixtures import api_event, bearer, make_event, LambdaContext
event = api_event({{"events": [make_event(agent_id="a1")]}}, headers=bearer("a1", "{SECRET}"))
answer = handler.handler(event, LambdaContext())
top = ("publisher", "cryptography", "packaging", "boto3")
console = ("infra.reports.console_api", "infra.reports.console_lambda")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in top or m in console)
print(json.dumps({{"status": answer["statusCode"], "heavy": heavy}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"status": 202, "heavy": []}
