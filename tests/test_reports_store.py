"""Store specifics the handler tests do not reach: URLs, threads, pagination, SQL injection."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
import reports_fixtures
from reports_fixtures import NOW, create_table, make_event

from infra.reports.auth import make_token
from infra.reports.core import ReportsEndpoint
from infra.reports.dynamodb import STATE_SHARDS, DynamoDBStore, state_shard
from infra.reports.store import ReportStore, SQLiteStore, from_url
from infra.reports.validation import validate_event

SECRET = "store-test-secret-0123456789"

# Fixtures shared through the helper module (tests/ has no conftest of ours).
aws = reports_fixtures.aws


def test_sqlite_urls_follow_sqlalchemy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = from_url("sqlite:///rel/reports.db")
    absolute = ReportStore.from_url(f"sqlite:///{tmp_path}/abs.db")  # -> sqlite:////tmp/...
    assert isinstance(relative, SQLiteStore) and Path(relative.path) == Path("rel/reports.db")
    assert (tmp_path / "rel" / "reports.db").exists() and (tmp_path / "abs.db").exists()
    relative.close()
    absolute.close()


def test_dynamodb_url_names_the_table() -> None:
    store = from_url("dynamodb://avika-reports")
    assert isinstance(store, DynamoDBStore) and store.table == "avika-reports"


@pytest.mark.parametrize(
    "url", ["sqlite://", "sqlite:///", "postgres://x", "dynamodb://", "dynamodb://a/b", "x.db"]
)
def test_unsupported_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        from_url(url)


def test_sqlite_uses_wal(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "r.db")
    assert store._query("PRAGMA journal_mode") == [("wal",)]
    store.close()


def test_concurrent_posts_from_a_threaded_server(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "r.db")
    endpoint = ReportsEndpoint(store, [SECRET.encode()], clock=lambda: NOW)
    statuses: list[int] = []

    def agent(n: int) -> None:
        agent_id = f"agent-{n}"
        headers = {"Authorization": f"Bearer {make_token(SECRET, agent_id)}"}
        for seq in range(1, 11):
            body = f'{{"events": [{_json(make_event(agent_id=agent_id, seq=seq))}]}}'.encode()
            statuses.append(endpoint.handle("POST", headers, body)[0])

    threads = [threading.Thread(target=agent, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert statuses == [202] * 80
    assert sorted((a["agent_id"], a["seq"]) for a in store.agents()) == [(f"agent-{n}", 10) for n in range(8)]
    store.close()


def _json(obj: dict) -> str:
    import json

    return json.dumps(obj)


def test_injection_strings_are_stored_as_data(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "r.db")
    hostile = "x'); DROP TABLE events; --"
    event = validate_event(make_event(error=hostile, version="1'--", target_version="0.1.44' OR '1'='1"), 0)
    store.put_events([event], NOW)
    assert store.agent(event["agent_id"])["error"] == hostile
    assert store.version_outcomes("0.1.44' OR '1'='1")[0]["version"] == "1'--"
    assert store.version_outcomes("0.1.44") == []
    assert len(store.agent_events(event["agent_id"])) == 1
    store.close()


def test_sqlite_purges_expired_events_by_receive_time(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "r.db", ttl_seconds=60)
    old = validate_event(make_event(agent_id="old"), 0)
    store.put_events([old], NOW)
    store.put_events([validate_event(make_event(agent_id="new"), 0)], NOW + 61)
    assert store.agent_events("old") == []
    assert store.agent("old") is not None  # STATE never expires
    store.close()


def test_state_shards_are_stable_and_spread() -> None:
    assert state_shard("host-01.example.com") == state_shard("host-01.example.com")
    assert {state_shard(f"agent-{i}") for i in range(200)} == set(range(STATE_SHARDS))


def test_dynamodb_fleet_view_pages_through_every_shard(aws: None) -> None:
    create_table("t")
    store = DynamoDBStore("t")
    ids = sorted(f"a-{uuid.uuid4().hex[:8]}" for _ in range(30))
    for agent_id in ids:
        store.put_events([validate_event(make_event(agent_id=agent_id), 0)], NOW)

    calls: list[dict] = []
    query = store.client.query

    def small_pages(**kwargs: object) -> dict:
        calls.append(kwargs)
        return query(**kwargs, Limit=1)  # force pagination

    store.client.query = small_pages
    assert sorted(a["agent_id"] for a in store.agents()) == ids
    assert all(c["IndexName"] == "state-index" for c in calls)  # never the events, never a Scan
    assert len(calls) >= len(ids)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("ProvisionedThroughputExceededException", 429),
        ("ThrottlingException", 429),
        ("InternalServerError", 503),
    ],
)
def test_dynamodb_errors_map_to_retryable_statuses(code: str, status: int) -> None:
    import boto3
    from botocore.config import Config
    from botocore.stub import Stubber

    client = boto3.client(
        "dynamodb",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"total_max_attempts": 1}),
    )
    endpoint = ReportsEndpoint(DynamoDBStore("t", client=client), [SECRET.encode()], clock=lambda: NOW)
    event = make_event(agent_id="a1")
    with Stubber(client) as stub:
        stub.add_client_error("put_item", service_error_code=code, http_status_code=400)
        answer = endpoint.handle(
            "POST",
            {"Authorization": f"Bearer {make_token(SECRET, 'a1')}"},
            _json({"events": [event]}).encode(),
        )
    assert answer[0] == status
    assert (answer[1].get("Retry-After") is not None) is (status == 429)
