"""Shared helpers for the ``progress`` tests: a store with a key, agents' reports, waves, soaks.

Everything is real: releases go through the real CLI (``tests.publisher_fixtures.cli``) into a
directory or an S3 bucket (moto), reports through the real reports endpoint into SQLite or
DynamoDB (moto), and the live manifest is read back through the agent's own verifier.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.manifest import Manifest, parse_time, rollout_bucket, verify_manifest
from infra.reports.auth import make_token
from infra.reports.core import ReportsEndpoint
from infra.reports.store import ReportStore
from publisher.store_url import open_store
from tests.publisher_fixtures import KeyFile, cli, make_binary

SECRET = "progress-test-fleet-secret-0123456789"
VERSION = "0.1.44"


def agents_in_wave(count: int, percent: int, salt: str = VERSION, start: int = 0) -> list[str]:
    """``count`` agent ids whose bucket for ``salt`` is below ``percent``."""
    found = [f"host-{i}" for i in range(start, 100_000) if rollout_bucket(f"host-{i}", salt) < percent]
    return found[:count]


class Reporter:
    """Agents' reports into a real reports store, through the real endpoint (fleet secret ``SECRET``)."""

    def __init__(self, report_store: ReportStore) -> None:
        self.report_store = report_store
        self.endpoint = ReportsEndpoint(report_store, [SECRET.encode()])
        self.stream = f"{int(time.time() * 1000) - 60_000:013x}{uuid.uuid4().hex[:16]}"
        self.seqs: dict[str, int] = {}

    def report(self, agent_id: str, *states: str, version: str = VERSION, mode: str = "vm") -> None:
        """Report an attempt at ``version`` through the real endpoint."""
        events = []
        for state in states:
            seq = self.seqs[agent_id] = self.seqs.get(agent_id, 0) + 1
            running = version if state == "committed" else "0.1.43"
            events.append(
                {
                    "event_id": str(uuid.uuid4()),
                    "agent_id": agent_id,
                    "stream": self.stream,
                    "seq": seq,
                    "time": "2026-02-15T19:59:00Z",
                    "state": state,
                    "version": running,
                    "mode": mode,
                    "platform": "linux-amd64",
                    "target_version": version,
                    "manifest_serial": 1,
                }
            )
        headers = {"Authorization": f"Bearer {make_token(SECRET, agent_id)}"}
        answer = self.endpoint.respond("POST", headers, json.dumps({"events": events}).encode())
        assert answer.status == 202, answer.body

    def committed(self, *agent_ids: str) -> None:
        for agent_id in agent_ids:
            self.report(agent_id, "downloading", "restarting", "watching", "committed")

    def rolled_back(self, *agent_ids: str) -> None:
        for agent_id in agent_ids:
            self.report(agent_id, "downloading", "restarting", "rolled_back")

    def known(self, *agent_ids: str) -> None:
        """Agents the reports know, still on the old version with nothing attempted yet."""
        for agent_id in agent_ids:
            self.report(agent_id, "checking", version="0.1.43")


class Site(Reporter):
    """A store (directory or S3), a signing key and a reports store (SQLite or DynamoDB)."""

    def __init__(self, tmp: Path, store: str, reports: str, key: KeyFile, report_store: ReportStore) -> None:
        super().__init__(report_store)
        self.tmp, self.store, self.reports, self.key = tmp, store, reports, key

    @property
    def signing(self) -> tuple[str, ...]:
        return ("--key", str(self.key.path), "--store", self.store)

    def release(self, *args: str, version: str = VERSION, code: int = 0) -> Any:
        binary = self.tmp / "dist" / version / "avika-agent"
        if not binary.exists():
            make_binary(binary, 2048, version)
        done = cli(
            "release", version, "--binary", f"linux-amd64={binary}", "--init", "--no-inspect", *self.signing,
            "--json", *args,
        )  # fmt: skip
        assert done.exit_code == code, done.stderr
        return json.loads(done.stdout) if code == 0 else done

    def progress(self, *args: str) -> tuple[int, dict[str, Any], str]:
        done = cli("progress", "--reports", self.reports, *self.signing, "--json", *args)
        assert done.exit_code in (0, 4, 5), done.stderr
        out = json.loads(done.stdout)
        return done.exit_code, out, done.stderr

    def live(self) -> Manifest:
        """The live manifest, through the agent's own verifier."""
        data = open_store(self.store).read("manifest.json")
        assert data is not None
        return verify_manifest(data, trusted=[self.key.public], now=datetime.now(UTC))

    def state(self) -> dict[str, bytes | None]:
        """``manifest.json`` and every archived serial, to prove that nothing was signed."""
        target = open_store(self.store)
        keys = ["manifest.json", *target.list("manifests/")]
        return {k: target.read(k) for k in keys}


def soak_over(manifest_or_time: Manifest | str, soak: float) -> None:
    """Sleep until the soak that began at the step's ``signed_at`` is over (whole seconds)."""
    began = parse_time(manifest_or_time) if isinstance(manifest_or_time, str) else manifest_or_time.signed_at
    assert began is not None
    due = began + timedelta(seconds=soak)
    while (left := (due - datetime.now(UTC)).total_seconds()) > -0.05:
        time.sleep(max(left + 0.1, 0.05))
