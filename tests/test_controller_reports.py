"""The controller's reports: one agent id per workload, through the agent's durable queue, to a real
reports endpoint (the handler core over SQLite, behind an HTTP server on 127.0.0.1).

A report token is an HMAC of one agent id, so each workload needs its own (``UPDATE_REPORT_TOKEN``
holds ``AGENT_ID=TOKEN`` entries); a batch carries one agent id only. Events are checked against the
endpoint's vocabulary before they are queued; undelivered events stay on disk for the next process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from controller.config import ReportTokens, parse_tokens
from controller.reports import WorkloadReporter, build_event
from infra.reports.auth import make_token
from infra.reports.core import ReportsEndpoint
from infra.reports.store import SQLiteStore
from infra.reports.validation import validate_event

SECRET = "controller-test-fleet-secret-0123"
DS = "k8s/prod-eu/avika/daemonset/avika-agent"
GW = "k8s/prod-eu/avika/deployment/avika-gateway"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Endpoint:
    """``POST /v1/reports`` served by the real handler core into a real SQLite file."""

    def __init__(self, db: Path) -> None:
        self.store = SQLiteStore(str(db))
        self.endpoint = ReportsEndpoint(self.store, [SECRET.encode()])
        self.statuses: list[int] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, headers, data = owner.endpoint.handle("POST", dict(self.headers.items()), body)
                owner.statuses.append(status)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/reports"

    def events(self, agent_id: str) -> list[dict[str, Any]]:
        return sorted(self.store.agent_events(agent_id), key=lambda e: (e["stream"], e["seq"]))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.store.close()


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[Endpoint]:
    ep = Endpoint(tmp_path / "reports.db")
    yield ep
    ep.close()


def reporter(tmp_path: Path, tokens: ReportTokens, url: str | None) -> WorkloadReporter:
    return WorkloadReporter(tmp_path / "state", tokens, url, clock=lambda: NOW)


def emit_rollout(r: WorkloadReporter, agent_id: str) -> None:
    r.emit(
        agent_id,
        "restarting",
        version="1.0.0",
        target_version="1.1.0",
        serial=7,
        image="reg/a:1.1.0",
        in_wave=True,
    )
    r.emit(agent_id, "committed", version="1.1.0", target_version="1.1.0", serial=7, in_wave=True)


def test_each_workload_reports_as_its_own_agent_with_its_own_token(
    tmp_path: Path, endpoint: Endpoint
) -> None:
    tokens = parse_tokens(f"{DS}={make_token(SECRET, DS)},{GW}={make_token(SECRET, GW)}")
    r = reporter(tmp_path, tokens, endpoint.url)
    emit_rollout(r, DS)
    emit_rollout(r, GW)
    assert r.flush(10)
    for agent_id in (DS, GW):
        events = endpoint.events(agent_id)
        assert [e["state"] for e in events] == ["restarting", "committed"]
        assert {(e["mode"], e["platform"]) for e in events} == {("container", "kubernetes")}
        assert [e["seq"] for e in events] == [1, 2]
    assert set(endpoint.statuses) == {202}
    r.close()


def test_a_workload_without_a_token_is_warned_about_once_and_not_queued(
    tmp_path: Path, endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    r = reporter(tmp_path, parse_tokens(f"{DS}={make_token(SECRET, DS)}"), endpoint.url)
    emit_rollout(r, GW)
    emit_rollout(r, DS)
    assert r.flush(10)
    assert endpoint.events(GW) == [] and len(endpoint.events(DS)) == 2
    warnings = [rec.message for rec in caplog.records if "no report token" in rec.message]
    assert warnings == [f"no report token for {GW}: its reports are not sent (add AGENT_ID=TOKEN to "
                        f"UPDATE_REPORT_TOKEN; avika-publish enroll {GW})"]  # fmt: skip
    r.close()


def test_a_bare_token_serves_a_cluster_with_one_workload(tmp_path: Path, endpoint: Endpoint) -> None:
    r = reporter(tmp_path, parse_tokens(make_token(SECRET, DS)), endpoint.url)
    emit_rollout(r, DS)
    assert r.flush(10)
    assert len(endpoint.events(DS)) == 2
    r.close()


def test_refused_reports_stay_on_disk_for_the_next_process(tmp_path: Path, endpoint: Endpoint) -> None:
    wrong = reporter(
        tmp_path, parse_tokens(f"{DS}={make_token('another-secret-0123456789abcdef', DS)}"), endpoint.url
    )
    emit_rollout(wrong, DS)
    assert wrong.flush(1) is False
    assert endpoint.statuses and set(endpoint.statuses) == {401}
    assert wrong.pending() == 2
    wrong.close()
    # A new process (the pod restarted with the right Secret) finds the queue and sends it, in order.
    right = reporter(tmp_path, parse_tokens(f"{DS}={make_token(SECRET, DS)}"), endpoint.url)
    assert right.pending() == 2
    assert right.flush(10)
    assert [e["state"] for e in endpoint.events(DS)] == ["restarting", "committed"]
    right.close()


def test_a_heartbeat_carries_the_last_result_and_the_uptime(tmp_path: Path, endpoint: Endpoint) -> None:
    r = reporter(tmp_path, parse_tokens(f"{DS}={make_token(SECRET, DS)}"), endpoint.url)
    r.emit(
        DS,
        "heartbeat",
        version="1.1.0",
        target_version=None,
        serial=7,
        last_result="bad_version",
        uptime_s=42,
    )
    assert r.flush(10)
    assert endpoint.statuses == [202]
    r.close()


def test_built_events_are_what_the_endpoint_accepts() -> None:
    event = build_event(
        DS, "rolled_back", version="1.1.0", target_version="1.2.0", serial=9, now=NOW,
        failed_state="watching", error="CrashLoopBackOff: pod x\x00 on node-1" + "!" * 600, in_wave=True,
    )  # fmt: skip
    checked = validate_event({**event, "stream": "0" * 29, "seq": 1}, 0)
    assert checked["error"].startswith("CrashLoopBackOff: pod x  on node-1") and len(checked["error"]) == 512
    with pytest.raises(ValueError):
        build_event(DS, "rolling", version="1", target_version=None, serial=None, now=NOW)


def test_disabled_reports_queue_nothing(tmp_path: Path) -> None:
    r = reporter(tmp_path, parse_tokens(f"{DS}={make_token(SECRET, DS)}"), "disabled")
    assert r.emit(DS, "committed", version="1.1.0", target_version="1.1.0", serial=7) is None
    assert not (tmp_path / "state" / "reports").exists()
    r.close()


def test_the_token_never_goes_over_plain_http_to_another_host(tmp_path: Path) -> None:
    r = reporter(
        tmp_path, parse_tokens(f"{DS}={make_token(SECRET, DS)}"), "http://reports.example.com/v1/reports"
    )
    emit_rollout(r, DS)
    assert r.flush(0.5) is False
    assert r.pending() == 2
    r.close()
