"""End to end through moto's server mode: ``avika-publish`` -> S3 over HTTP -> a real agent.

moto's ``ThreadedMotoServer`` runs in this process on 127.0.0.1 (port 0: a free one) and answers S3 at
``http://127.0.0.1:PORT`` with path-style addressing (``/BUCKET/KEY``), the way an S3-compatible
store (MinIO, Ceph) would. Everything else is a real process:

- ``avika-publish release`` (the installed console script, ``--endpoint-url``, fake credentials in
  its environment) publishes 1.0.0 and then 1.0.1 to ``s3://BUCKET/updates/stable``;
- ``avika-publish verify`` audits the bucket both through the S3 API and over plain HTTP (``--url``,
  what an agent sees);
- a real agent (a development build of 1.0.0 from ``tests/agent_harness.py``, ``DEPLOYMENT_MODE=vm``)
  runs ``update`` with ``UPDATE_SERVER=http://127.0.0.1:PORT/BUCKET/updates/stable``: it downloads,
  verifies and swaps in the 1.0.1 build; the next ``run`` starts it, watches it and commits;
- a second ``release 1.0.1`` with other bytes is refused (exit 2) and the bucket, with versioning
  enabled as in ``infra/template.yaml``, holds exactly the same object versions and ETags after;
- ``rollback-to 1.0.0`` takes a running agent back from 1.0.1, and ``history`` lists the serials.

What moto's server needs and enforces here (moto 5.2):
- Agents fetch without credentials. moto answers an anonymous GET of an object with 403 unless a
  bucket policy allows ``s3:GetObject`` to the caller or the object's ACL is public-read. The
  publisher sets no ACL (the real bucket has BlockPublicAccess and ``BucketOwnerEnforced``; CloudFront
  reads it with Origin Access Control), so the bucket policy below allows anonymous ``s3:GetObject``
  on ``updates/stable/*`` only: a stand-in for CloudFront. An object outside that prefix stays 403.
- moto authorizes an anonymous HEAD as ``s3:HeadObject`` (not an IAM action), so with this policy a
  HEAD gets 403 where a GET gets 200; agents only GET.
- ``verify`` reaches the endpoint with ``--endpoint-url``; ``show`` with ``AWS_ENDPOINT_URL``, which
  boto3 reads itself (both ways are supported).
- The refused re-release is decided before any write (the publisher reads the live manifest); the
  create-only writes themselves (``IfNoneMatch="*"``, 412 in moto's server as in-process) are
  covered by tests/test_publisher_s3.py.
- Not shown here, only on AWS: CloudFront itself (OAC, cache behaviours, HTTPS), IAM, KMS Ed25519.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests

from tests.agent_harness import COMMITTED_CHAIN, PLATFORM, Host, dev_binary, wait_for
from tests.publisher_fixtures import sha256

moto_server = pytest.importorskip(
    "moto.server", reason="moto's server extra is not installed: pip install 'moto[server]'"
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

BIN = Path(sys.executable).parent
PREFIX = "updates/stable"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws/config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws/credentials",
}


# ---------------------------------------------------------------- the server and the bucket


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """moto's S3 over HTTP on 127.0.0.1; its request log is quieted while it runs."""
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        werkzeug.setLevel(level)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Fake credentials and a region here and in every child process; nothing of the real machine's."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "AVIKA_", "UPDATE_")):
            monkeypatch.delenv(name)
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    return dict(os.environ)


@dataclass(frozen=True)
class Bucket:
    s3: Any  # a boto3 S3 client on the moto endpoint
    name: str


@pytest.fixture
def bucket(endpoint: str, aws_env: dict[str, str]) -> Bucket:
    """A fresh versioned bucket (as the stack's) whose PREFIX anyone may GET (CloudFront's stand-in)."""
    s3 = boto3.client("s3", endpoint_url=endpoint)
    name = f"avika-e2e-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "StandInForCloudFront",
                "Effect": "Allow",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{name}/{PREFIX}/*",
            }
        ],
    }
    s3.put_bucket_policy(Bucket=name, Policy=json.dumps(policy))
    return Bucket(s3, name)


# ---------------------------------------------------------------- helpers


def publish(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed ``avika-publish`` console script, as an operator or CI runs it."""
    return subprocess.run(
        [str(BIN / "avika-publish"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


def keygen(tmp_path: Path, env: dict[str, str]) -> tuple[Path, str]:
    key = tmp_path / "signing.pem"
    out = json.loads(ok(publish("keygen", "--out", str(key), "--json", env=env, cwd=tmp_path)).stdout)
    return key, out["public_key"]


def release(
    version: str, binary: Path, key: Path, store: str, endpoint: str, env: dict[str, str], *extra: str
) -> Any:
    return publish(
        "release",
        version,
        *extra,
        "--binary",
        f"{PLATFORM}={binary}",
        "--key",
        str(key),
        "--store",
        store,
        "--endpoint-url",
        endpoint,
        "--no-inspect",  # a development launcher, not an agent build
        "--json",
        env=env,
        cwd=binary.parent,
    )


def object_versions(bucket: Bucket) -> list[tuple[str, str, str, bool, int]]:
    """Every version of every object: (key, version id, ETag, is latest, size)."""
    response = bucket.s3.list_object_versions(Bucket=bucket.name)
    assert not response.get("IsTruncated")
    assert not response.get("DeleteMarkers")
    return sorted(
        (v["Key"], v["VersionId"], v["ETag"], v["IsLatest"], v["Size"]) for v in response.get("Versions", ())
    )


def current_objects(bucket: Bucket) -> dict[str, str]:
    listing = bucket.s3.list_objects_v2(Bucket=bucket.name)
    return {item["Key"]: item["ETag"] for item in listing.get("Contents", ())}


def published(tmp_path: Path, endpoint: str, bucket: Bucket, env: dict[str, str]) -> dict[str, Any]:
    """keygen, then releases 1.0.0 and 1.0.1 (dev agent builds trusting the key) to the bucket."""
    key, public = keygen(tmp_path, env)
    store = f"s3://{bucket.name}/{PREFIX}"
    builds = {}
    for serial, version in enumerate(("1.0.0", "1.0.1"), start=1):
        path = tmp_path / "dist" / version / f"avika-agent-{PLATFORM}"
        builds[version] = (path, dev_binary(path, version, public))
        init = ["--init"] if serial == 1 else []  # the first release starts the store
        out = json.loads(ok(release(version, path, key, store, endpoint, env, *init)).stdout)
        assert (out["status"], out["manifest"]["version"], out["manifest"]["serial"]) == (
            "published",
            version,
            serial,
        ), out
    return {"key": key, "public": public, "store": store, "builds": builds}


# ---------------------------------------------------------------- the tests


def test_publish_to_moto_s3_then_a_real_agent_updates_over_plain_http(tmp_path, endpoint, bucket, aws_env):
    site = published(tmp_path, endpoint, bucket, aws_env)
    old_path, old = site["builds"]["1.0.0"]
    new_path, new = site["builds"]["1.0.1"]
    public, store = site["public"], site["store"]
    update_server = f"{endpoint}/{bucket.name}/{PREFIX}"

    # The layout of DESIGN section 2, under the prefix, in the bucket.
    binary_keys = {
        v: f"{PREFIX}/binaries/{v}/{sha256(data)}/avika-agent-{PLATFORM}"
        for v, (_, data) in site["builds"].items()
    }
    assert set(current_objects(bucket)) == {
        f"{PREFIX}/manifest.json",
        f"{PREFIX}/manifests/1.json",
        f"{PREFIX}/manifests/2.json",
        *binary_keys.values(),
    }

    # What an agent (or CloudFront) gets over plain HTTP, anonymously: the headers the publisher set.
    manifest = requests.get(f"{update_server}/manifest.json", timeout=10)
    assert manifest.status_code == 200
    assert manifest.headers["Content-Type"] == "application/json"
    assert manifest.headers["Cache-Control"] == "public, max-age=60"
    binary = requests.get(f"{endpoint}/{bucket.name}/{binary_keys['1.0.1']}", timeout=10)
    assert binary.status_code == 200 and binary.content == new
    assert binary.headers["Content-Type"] == "application/octet-stream"
    assert binary.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    # The bucket is not public: only the prefix the policy names can be read without credentials.
    bucket.s3.put_object(Bucket=bucket.name, Key="private/notes.txt", Body=b"not for agents")
    assert requests.get(f"{endpoint}/{bucket.name}/private/notes.txt", timeout=10).status_code == 403

    # verify: through the S3 API (the store, --endpoint-url) and over HTTP (--url, what agents see);
    # show through AWS_ENDPOINT_URL.
    s3_env = {**aws_env, "AWS_ENDPOINT_URL": endpoint}
    done = ok(
        publish(
            "verify",
            "--public-key",
            public,
            "--store",
            store,
            "--endpoint-url",
            endpoint,
            env=aws_env,
            cwd=tmp_path,
        )
    )
    assert "manifest serial 2 (1.0.1) verified" in done.stdout, done.stdout
    done = ok(publish("show", "--store", store, "--json", env=s3_env, cwd=tmp_path))
    assert json.loads(done.stdout)["version"] == "1.0.1", done.stdout
    done = ok(publish("verify", "--public-key", public, "--url", update_server, env=aws_env, cwd=tmp_path))
    assert "manifest serial 2 (1.0.1) verified" in done.stdout and " ok " in done.stdout, done.stdout

    # A real agent, 1.0.0 installed, updates from the endpoint over plain HTTP.
    host = Host(tmp_path / "host", update_server)
    assert host.install("1.0.0", public) == old and old_path.read_bytes() == old
    try:
        done = host.cli("update")
        assert done.returncode == 0, (done, host.log_text())
        result = json.loads(done.stdout)
        assert result["restart"] == "deferred", result  # no agent running: the next start runs 1.0.1
        assert host.target.read_bytes() == new and new_path.read_bytes() == new
        assert host.backup.read_bytes() == old
        pending = host.pending()
        assert pending is not None
        assert (pending["from_version"], pending["to_version"], pending["boots"]) == ("1.0.0", "1.0.1", 0)
        status = host.status()
        assert status["version"] == "1.0.1" and status["running"] is None
        assert status["pending"]["to_version"] == "1.0.1" and status["highest_serial"] == 2

        # The next start is 1.0.1: it watches itself through the health window and commits.
        proc = host.start()
        wait_for(lambda: host.converged(new, "1.0.1"), 30, "1.0.1 to start and commit")
        assert host.agent_record()["pid"] == proc.pid
        assert host.chain("1.0.1") == COMMITTED_CHAIN
        status = host.status()
        assert status["version"] == "1.0.1" and status["running"] == {"pid": proc.pid, "version": "1.0.1"}
        assert status["pending"] is None and status["highest_serial"] == 2 and status["last_error"] is None
        assert host.target.read_bytes() == new and host.stray_files() == []
    finally:
        host.kill_all()


def test_a_second_release_of_a_version_with_other_bytes_is_refused_and_the_bucket_is_unchanged(
    tmp_path, endpoint, bucket, aws_env
):
    site = published(tmp_path, endpoint, bucket, aws_env)
    key, store = site["key"], site["store"]
    before_versions, before = object_versions(bucket), current_objects(bucket)
    # Two binaries, two archived envelopes, and manifest.json in two versions (1.0.0's, then 1.0.1's).
    assert [v[0] for v in before_versions].count(f"{PREFIX}/manifest.json") == 2
    assert len(before_versions) == 6 and set(before) == {v[0] for v in before_versions}
    manifest_before = bucket.s3.get_object(Bucket=bucket.name, Key=f"{PREFIX}/manifest.json")["Body"]

    other = tmp_path / "other" / f"avika-agent-{PLATFORM}"
    rebuilt = dev_binary(other, "1.0.1", site["public"] + ",")  # another 1.0.1 build: other bytes
    assert rebuilt != site["builds"]["1.0.1"][1]
    done = release("1.0.1", other, key, store, endpoint, aws_env)
    assert done.returncode == 2, done
    error = done.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("avika-publish: error:"), done.stderr
    assert "1.0.1" in error[0] and "--force" in error[0], error
    assert "Traceback" not in done.stderr and done.stdout == ""

    assert object_versions(bucket) == before_versions
    assert current_objects(bucket) == before
    manifest_after = bucket.s3.get_object(Bucket=bucket.name, Key=f"{PREFIX}/manifest.json")["Body"]
    with contextlib.closing(manifest_before), contextlib.closing(manifest_after):
        assert manifest_after.read() == manifest_before.read()

    # The identical release (a CI retry) is a no-op that writes nothing either.
    done = ok(release("1.0.1", site["builds"]["1.0.1"][0], key, store, endpoint, aws_env))
    assert json.loads(done.stdout)["status"] == "unchanged"
    assert object_versions(bucket) == before_versions


@pytest.mark.timeout(180)
def test_history_and_rollback_to_through_an_s3_compatible_endpoint(tmp_path, endpoint, bucket, aws_env):
    """A running agent takes 1.0.1, then ``rollback-to 1.0.0`` (the console script, --endpoint-url)
    takes it back; ``history`` lists the three serials, all verifying with the key."""
    site = published(tmp_path, endpoint, bucket, aws_env)
    key, store, public = site["key"], site["store"], site["public"]
    (_, old), (_, new) = site["builds"]["1.0.0"], site["builds"]["1.0.1"]
    host = Host(tmp_path / "host", f"{endpoint}/{bucket.name}/{PREFIX}")
    host.install("1.0.0", public)
    s3 = ("--key", str(key), "--store", store, "--endpoint-url", endpoint)
    try:
        host.start()
        wait_for(lambda: host.converged(new, "1.0.1"), 60, "1.0.1 to commit")
        done = ok(publish("rollback-to", "1.0.0", *s3, "--json", env=aws_env, cwd=tmp_path))
        out = json.loads(done.stdout)
        assert (out["serial"], out["version"], out["manifest"]["downgrade"]) == (3, "1.0.0", True)
        wait_for(lambda: host.converged(old, "1.0.0"), 60, "the rollback to 1.0.0 to commit")
        assert host.status()["highest_serial"] == 3
        rows = json.loads(ok(publish("history", *s3, "--json", env=aws_env, cwd=tmp_path)).stdout)
        assert [(r["serial"], r["version"], r["verified"], r["live"]) for r in rows] == [
            (3, "1.0.0", True, True), (2, "1.0.1", True, False), (1, "1.0.0", True, False),
        ]  # fmt: skip
    finally:
        host.kill_all()
