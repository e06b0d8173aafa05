"""Shared by the console tests: a real ``serve --console`` over a signed store and real reports.

``Site`` is a directory store holding a signed release, an SQLite reports store, and
``avika-publish serve`` (the real server, in a thread, port 0) with the console mounted and local
tokens. Agents report over HTTP with their real report tokens; operators call the API over HTTP
with console tokens. Nothing is faked: what the tests read back is the store and the database.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from agent.manifest import Manifest, verify_manifest
from infra.reports.auth import make_token
from publisher.console_app import make_console
from publisher.serve import UpdateServer, make_server
from tests.publisher_fixtures import KeyFile, cli, make_binary, new_key_file

FLEET_SECRET = "console-test-fleet-secret-0123456789"
OPERATE_SECRET = "operate-secret-0123456789abcdef"
READ_SECRET = "read-secret-0123456789abcdef"
TOKENS = f"ops:operate:{OPERATE_SECRET},viewer:read:{READ_SECRET}"


def release(root: Path, key: KeyFile, version: str, *args: str) -> None:
    binary = root.parent / "dist" / f"avika-agent-{version}"
    make_binary(binary, 4096, version)
    done = cli(
        "release",
        version,
        "--binary",
        f"linux-amd64={binary}",
        "--key",
        str(key.path),
        "--store",
        str(root),
        "--no-inspect",  # stand-in bytes, not an agent build
        *args,
    )
    assert done.exit_code == 0, done.stderr


@dataclass
class Site:
    tmp: Path
    key: KeyFile
    root: Path
    db: Path
    server: UpdateServer
    thread: threading.Thread
    seqs: dict[str, int] = field(default_factory=dict)
    streams: dict[str, str] = field(default_factory=dict)
    session: requests.Session = field(default_factory=requests.Session)

    @property
    def url(self) -> str:
        return self.server.url

    def live(self) -> Manifest:
        """The live manifest, verified as an agent verifies it."""
        data = (self.root / "manifest.json").read_bytes()
        return verify_manifest(data, trusted=[self.key.public], now=datetime.now(UTC))

    def report(self, agent_id: str, state: str, **fields: Any) -> dict[str, Any]:
        """POST one event as ``agent_id`` would (its own report token), over HTTP."""
        seq = self.seqs[agent_id] = self.seqs.get(agent_id, 0) + 1
        stream = self.streams.setdefault(
            agent_id, f"{int(time.time() * 1000) - 60_000:013x}{uuid.uuid4().hex[:16]}"
        )
        event = {
            "event_id": str(uuid.uuid4()),
            "agent_id": agent_id,
            "stream": stream,
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
        answer = self.session.post(
            f"{self.url}/v1/reports",
            json={"events": [event]},
            headers={"Authorization": f"Bearer {make_token(FLEET_SECRET, agent_id)}"},
            timeout=30,
        )
        assert answer.status_code == 202, answer.text
        return event

    def heartbeat(self, agent_id: str, **fields: Any) -> None:
        base = {"target_version": None, "manifest_serial": None, "last_result": "up_to_date", "uptime_s": 60}
        self.report(agent_id, "heartbeat", **{**base, **fields})

    def call(
        self,
        method: str,
        path: str,
        token: str | None = None,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> requests.Response:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        return self.session.request(method, f"{self.url}{path}", data=data, headers=sent, timeout=60)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
        if self.server.reports is not None:
            self.server.reports.store.close()
        if self.server.console is not None:
            self.server.console.api.reports.close()
        self.session.close()


def sign_plan(site: Site, steps: tuple[int, ...], percent: int, *, min_agents: int = 20) -> Manifest:
    """Re-sign the live release with a rollout plan (what ``release --plan`` writes), at ``percent``."""
    from dataclasses import replace

    from agent.manifest import Rollout, RolloutPlan
    from publisher import release as publishing
    from publisher.archive import read_store
    from publisher.signing import load_key_file
    from publisher.stores import DirStore

    store = DirStore(site.root)
    signer = load_key_file(site.key.path)
    view = read_store(store, [signer.public_key])
    live = view.live_release
    assert live is not None
    now = datetime.now(UTC).replace(microsecond=0)
    planned = replace(
        live,
        serial=view.next_serial(),
        rollout=Rollout(percent, live.rollout.salt),
        rollout_plan=RolloutPlan(steps, "2h", "0.25", min_agents),
        signed_at=now,
        raw=b"",
    )
    manifest, envelope = publishing.sign_checked(planned, [signer], now)
    publishing.publish_envelope(store, manifest, envelope, view.live_token)
    return manifest


def mixed_reports(site: Site) -> None:
    """A small fleet: a committed VM, a rolled-back VM, one mid-update, a container, a silent one."""
    for state in ("downloading", "verifying", "staged", "restarting"):
        site.report("vm-a", state)
    site.report("vm-a", "watching", version="0.1.44")
    site.report("vm-a", "committed", version="0.1.44")
    for state in ("downloading", "verifying", "staged", "restarting"):
        site.report("vm-b", state)
    site.report(
        "vm-b", "rolled_back", failed_state="watching", error="too_many_boots: 4 boots without a commit"
    )
    site.report("vm-c", "downloading")
    site.report(
        "ctr-d", "update_available", mode="container", image="ghcr.io/avika/agent:0.1.44", in_wave=True
    )
    site.heartbeat("vm-e", version="0.1.44", last_result="up_to_date")


def start_site(tmp: Path, *, rollout: int = 25, signing: bool = True, tokens: str = TOKENS) -> Site:
    key = new_key_file(tmp)
    root = tmp / "updates"
    release(root, key, "0.1.44", "--rollout", str(rollout), "--image", "ghcr.io/avika/agent:0.1.44", "--init")
    db = tmp / "reports.db"
    console = make_console(
        f"sqlite:///{db}", str(root), key_files=[str(key.path)] if signing else [], tokens=tokens
    )
    server = make_server(
        root, port=0, reports_url=f"sqlite:///{db}", fleet_secret=FLEET_SECRET, console=console
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return Site(tmp, key, root, db, server, thread)
