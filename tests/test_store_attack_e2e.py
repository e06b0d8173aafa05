"""A store written by an attacker, end to end: real agents, ``avika-publish serve``, the real CLI.

The attacker can write to the store (the bucket, the served directory) and can have the signing
key sign what a maintenance role can sign, but holds no key of its own that agents trust. In this
order it:
1. drops junk archive names (the lock-out name ``manifests/9223372036854775806.json``, a junk
   ``manifests/2.json``, a non-archive name) and uploads its own binary into the store;
2. replaces ``manifest.json`` with an envelope signed by its own key (a newer version, its own
   binary, its own ``reports_url``, serial 1000);
3. replaces it with the real manifest's payload edited (unsigned: the old signature kept);
4. has the real key sign (the maintenance path: a role that can call Sign) a manifest whose binary
   URL points at another origin it serves, at serial 60.
After each step real agents (``avika-agent check`` and ``update`` as processes, two hosts) install
nothing, and the attacker's server sees no request. Then the release engineer publishes 1.1.0
with the usual command (no extra options): it ignores everything that does not verify (warning
naming it), keeps the real ``reports_url``, takes the next serial above the last real one, and
every agent takes it; the daily ``refresh`` after it is accepted too.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.manifest import Binary, parse_manifest, read_envelope_unverified, sign_envelope
from publisher.signing import load_key_file
from tests.agent_harness import PLATFORM, Host, dev_binary, new_signer, sha256
from tests.publisher_fixtures import REPO, proc_env, run_publish

pytestmark = pytest.mark.slow
REPORTS = "https://reports.example.com/v1/reports"
EVIL_REPORTS = "https://reports.attacker.example/v1/reports"


class Serve:
    """``avika-publish serve --root DIR --port 0`` as a process."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "publisher.cli", "serve", "--root", str(root), "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=proc_env(), cwd=REPO,
        )  # fmt: skip
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().split()[-1]

    def requests_seen(self) -> str:
        self.process.terminate()
        _, err = self.process.communicate(timeout=10)
        return err


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict]:
    key = tmp_path / "signing.pem"
    done = run_publish("keygen", "--out", str(key), "--json")
    assert done.returncode == 0, done.stderr
    public = json.loads(done.stdout)["public_key"]
    store = tmp_path / "store"
    served, evil = Serve(store), Serve(tmp_path / "evil")
    hosts = [Host(tmp_path / f"host{i}", served.url) for i in (1, 2)]
    for host in hosts:
        host.install("1.0.0", public)
    builds = {}
    for version in ("1.0.0", "1.1.0"):
        builds[version] = tmp_path / "dist" / version / "avika-agent"
        dev_binary(builds[version], version, public)
    try:
        yield {"key": key, "public": public, "store": store, "served": served, "evil": evil,
               "hosts": hosts, "builds": builds, "tmp": tmp_path}  # fmt: skip
    finally:
        for host in hosts:
            host.kill_all()
        for server in (served, evil):
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait()


def publish(world: dict, *args: str) -> subprocess.CompletedProcess[str]:
    done = run_publish(*args, "--key", str(world["key"]), "--store", str(world["store"]))
    assert done.returncode == 0, done.stderr
    return done


def live_payload(world: dict) -> dict:
    return json.loads(read_envelope_unverified((world["store"] / "manifest.json").read_bytes()))


def nothing_installed(world: dict, expected_error: str) -> None:
    """Every host refuses the live manifest with ``expected_error``; its binary is 1.0.0."""
    for host in world["hosts"]:
        before = host.target.read_bytes()
        for command in ("check", "update"):
            done = host.cli(command)
            assert done.returncode == 3, (command, done.stdout, host.log_text()[-2000:])
            assert json.loads(done.stdout.splitlines()[-1])["error"] == expected_error, done.stdout
        assert host.target.read_bytes() == before and host.cli("version").stdout.strip() == "1.0.0"
        assert host.state()["highest_serial"] == 1


def test_a_store_written_by_an_attacker_installs_nothing_and_blocks_no_later_release(world: dict) -> None:
    store, hosts = world["store"], world["hosts"]
    publish(world, "release", "1.0.0", "--init", f"--binary={PLATFORM}={world['builds']['1.0.0']}",
            "--reports-url", REPORTS, "--no-inspect")  # fmt: skip
    for host in hosts:
        decided = json.loads(host.cli("check").stdout.splitlines()[-1])
        assert (decided["serial"], decided["action"], decided["reason"]) == (1, "none", "up_to_date")
    real = parse_manifest(read_envelope_unverified((store / "manifest.json").read_bytes()))

    # 1. Junk names, and the attacker's own binary uploaded into the store.
    (store / "manifests" / "9223372036854775806.json").write_bytes(b"junk: the lock-out name")
    (store / "manifests" / "2.json").write_bytes(b'{"payload": "junk"}')
    (store / "manifests" / "latest.json").write_bytes(b"not an archive name")
    evil_bytes = dev_binary(world["tmp"] / "evil-build", "9.9.9", world["public"])
    evil_key = f"binaries/9.9.9/{sha256(evil_bytes)}/avika-agent-{PLATFORM}"
    (store / evil_key).parent.mkdir(parents=True)
    (store / evil_key).write_bytes(evil_bytes)
    evil_binary = Binary(evil_key, sha256(evil_bytes), len(evil_bytes))
    forged = replace(
        real, serial=1000, version="9.9.9", binaries={PLATFORM: evil_binary}, reports_url=EVIL_REPORTS,
        rollout=replace(real.rollout, percent=100), raw=b"",
    )  # fmt: skip

    # 2. manifest.json signed by the attacker's own key.
    (store / "manifest.json").write_bytes(sign_envelope(forged.to_payload(), [new_signer()]))
    nothing_installed(world, "signature_invalid")

    # 3. The real envelope with its payload edited (the real signature kept: unsigned content).
    envelope = json.loads((store / "manifests" / "1.json").read_bytes())
    envelope["payload"] = base64.b64encode(forged.to_payload()).decode()
    (store / "manifest.json").write_bytes(json.dumps(envelope).encode())
    nothing_installed(world, "signature_invalid")

    # 4. The maintenance path: the real key signs a manifest sending agents to another origin.
    (world["tmp"] / "evil" / "agent").write_bytes(evil_bytes)
    foreign = replace(
        forged, serial=60, binaries={PLATFORM: replace(evil_binary, url=world["evil"].url + "/agent")}
    )
    signed_foreign = sign_envelope(foreign.to_payload(), [load_key_file(world["key"])])
    (store / "manifests" / "60.json").write_bytes(signed_foreign)
    (store / "manifest.json").write_bytes(signed_foreign)
    nothing_installed(world, "bad_url")

    # The real re-sign path refuses to launder any of it (the live manifest does not verify: bad_url).
    refused = run_publish("refresh", "--key", str(world["key"]), "--store", str(store))
    assert refused.returncode == 3 and "bad_url" in refused.stderr, refused.stderr

    # The next legitimate release, as the release engineer always types it.
    done = publish(
        world, "release", "1.1.0", "--no-inspect", f"--binary={PLATFORM}={world['builds']['1.1.0']}"
    )
    assert "manifest.json" in done.stderr and "warning" in done.stderr
    payload = live_payload(world)
    assert (payload["serial"], payload["version"], payload["reports_url"]) == (3, "1.1.0", REPORTS)
    assert payload["binaries"][PLATFORM]["url"].startswith("binaries/1.1.0/")
    new = world["builds"]["1.1.0"].read_bytes()
    decided = json.loads(hosts[0].cli("check").stdout.splitlines()[-1])
    assert (decided["serial"], decided["action"], decided["manifest_version"]) == (3, "update", "1.1.0")
    for host in hosts:
        done = host.cli("update")
        assert done.returncode == 0, (done.stdout, host.log_text()[-2000:])
        assert host.target.read_bytes() == new and host.state()["highest_serial"] == 3

    # The daily refresh after it: serial 4, accepted.
    publish(world, "refresh")
    assert live_payload(world)["serial"] == 4
    for host in hosts:
        decided = json.loads(host.cli("check").stdout.splitlines()[-1])
        assert decided["serial"] == 4 and host.state()["highest_serial"] == 4

    # Nothing the attacker wrote was used, deleted or changed; its server was never asked.
    assert (store / "manifests" / "9223372036854775806.json").read_bytes() == b"junk: the lock-out name"
    assert (store / "manifests" / "60.json").read_bytes() == signed_foreign
    assert (store / evil_key).read_bytes() == evil_bytes
    assert "GET /agent" not in world["evil"].requests_seen()
    assert datetime.fromisoformat(payload["signed_at"].replace("Z", "+00:00")) > datetime.now(
        UTC
    ) - timedelta(hours=1)
