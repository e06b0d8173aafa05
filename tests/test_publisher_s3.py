"""The S3 store (publisher/s3store.py) and CloudFront invalidation (publisher/cdn.py), under moto.

Everything runs in-process against moto's ``mock_aws`` with fake credentials: no real AWS, no
network. The store contract suite (tests/test_publisher_stores.py) also runs over ``S3Store``
through ``moto_s3_store`` below; this file adds what only S3 has: object headers, multipart,
request order, conditional headers, CloudFront, endpoints and AWS errors.

What moto (5.2) enforces, and what is checked by recording requests instead:
- enforced by moto and exercised here: ``IfNoneMatch="*"`` on PutObject and on
  CompleteMultipartUpload (412), ``IfMatch`` on PutObject (412; 404 for a missing key), missing
  buckets, CloudFront distributions and their invalidations;
- recorded (botocore's ``before-call`` event, i.e. the serialized HTTP request) because real S3
  decides on the header, not on moto's emulation: every create-only write carries
  ``If-None-Match: *``, every compare-and-swap of ``manifest.json`` carries ``If-Match: <ETag>``,
  and every PutObject/UploadPart carries ``x-amz-checksum-sha256`` (moto stores checksums without
  verifying them);
- stubbed: moto applies no IAM or bucket policy by default, so AccessDenied and ExpiredToken are
  answered by a ``before-call`` hook (a real botocore ClientError, raised by the client itself).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from moto import mock_aws

from agent.manifest import Manifest, verify_manifest
from publisher import cdn, s3store
from publisher.errors import Refused
from publisher.s3store import MiB, S3Store
from publisher.store_url import open_store
from publisher.stores import ANY, AlreadyExists, StoreError, object_headers
from tests.publisher_fixtures import cli, make_binary, new_key_file, sha256

BUCKET = "avika-releases"
PREFIX = "updates/stable"
STORE = f"s3://{BUCKET}/{PREFIX}"
SMALL_PARTS = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4)

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws/config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws/credentials",
}
AWS_UNSET = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_CLOUDFRONT", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "MOTO_S3_CUSTOM_ENDPOINTS", "AVIKA_CLOUDFRONT_DISTRIBUTION_ID",
)  # fmt: skip


# ---------------------------------------------------------------- moto and request recording


def aws_env(monkeypatch: pytest.MonkeyPatch, *, credentials: bool = True) -> None:
    """Fake credentials (or none at all), and nothing from the real machine's AWS setup."""
    for name in AWS_UNSET:
        monkeypatch.delenv(name, raising=False)
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    if not credentials:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name)


def atomic_moto(monkeypatch: pytest.MonkeyPatch) -> None:
    """Handle one request at a time in moto, as S3 applies each request atomically.

    moto's in-process backend is not thread-safe (its ``IfNoneMatch`` check and the write are two
    steps, and a thread switch between them lets two writers win). The store's own threads still
    run concurrently up to the point where a request is answered.
    """
    from moto.core.botocore_stubber import BotocoreStubber

    lock = threading.RLock()
    handle = BotocoreStubber.process_request

    def one_at_a_time(self: Any, request: Any) -> Any:
        with lock:
            return handle(self, request)

    monkeypatch.setattr(BotocoreStubber, "process_request", one_at_a_time)


@contextlib.contextmanager
def moto_s3_store(monkeypatch: pytest.MonkeyPatch, prefix: str = PREFIX, **kwargs: Any) -> Iterator[S3Store]:
    """An ``S3Store`` over a fresh moto bucket (what the store contract suite runs against)."""
    aws_env(monkeypatch)
    atomic_moto(monkeypatch)
    with mock_aws():
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield S3Store(BUCKET, prefix, **kwargs)


@dataclass
class Call:
    operation: str
    key: str  # the request path without the leading "/" (virtual-host addressing: the object key)
    url: str
    headers: dict[str, str]
    thread: str


@dataclass
class Recorder:
    """Every API call of the clients ``make_client`` builds, as serialized for the wire.

    ``hooks[operation](call)`` runs inside the call; what it returns (``aws_error(...)``) is the
    response botocore uses instead of sending the request.
    """

    calls: list[Call] = field(default_factory=list)
    clients: list[Any] = field(default_factory=list)
    hooks: dict[str, Callable[[Call], Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self, client: Any) -> Any:
        self.clients.append(client)
        client.meta.events.register("before-call", self._record)
        return client

    def _record(self, model: Any, params: dict[str, Any], **kwargs: Any) -> Any:
        key = unquote(params["url_path"].split("?")[0]).lstrip("/")
        call = Call(model.name, key, params.get("url", ""), dict(params["headers"]),
                    threading.current_thread().name)  # fmt: skip
        with self.lock:
            self.calls.append(call)
        hook = self.hooks.get(model.name)
        return hook(call) if hook else None

    def ops(self, *operations: str) -> list[Call]:
        return [c for c in self.calls if c.operation in operations]

    @property
    def writes(self) -> list[Call]:
        """The calls that make an object appear: PutObject and CompleteMultipartUpload, in order."""
        return self.ops("PutObject", "CompleteMultipartUpload")


def aws_error(code: str, status: int, message: str) -> tuple[Any, dict[str, Any]]:
    """A before-call answer: botocore raises it as the ClientError AWS would have sent."""
    http = SimpleNamespace(status_code=status, headers={}, content=b"", raw=None)
    return http, {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}


@pytest.fixture(autouse=True)
def bare_root_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The root logger as in a fresh ``avika-publish`` process: no handlers, WARNING.

    Tests that run ``avika-agent`` in-process leave an INFO handler on the root logger, which would
    add botocore's "Found credentials" line to the one-line errors checked here.
    """
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    level = root.level
    root.setLevel(logging.WARNING)
    yield
    root.setLevel(level)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    real = s3store.make_client

    def watched(*args: Any, **kwargs: Any) -> Any:
        return rec.attach(real(*args, **kwargs))

    monkeypatch.setattr(s3store, "make_client", watched)
    monkeypatch.setattr(cdn, "make_client", watched)
    return rec


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """moto with the bucket; yields an (unrecorded) S3 client for looking at the bucket."""
    aws_env(monkeypatch)
    atomic_moto(monkeypatch)
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        yield s3


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Any]:
    key = new_key_file(tmp_path)
    amd64 = make_binary(tmp_path / "dist" / "amd64", 40_000, "amd64")
    arm64 = make_binary(tmp_path / "dist" / "arm64", 30_000, "arm64")
    return {
        "key": key,
        "tmp": tmp_path,
        "bytes": {"linux-amd64": amd64, "linux-arm64": arm64},
        "binaries": [
            "--binary", f"linux-amd64={tmp_path / 'dist' / 'amd64'}",
            "--binary", f"linux-arm64={tmp_path / 'dist' / 'arm64'}",
        ],
    }  # fmt: skip


def release_args(env: dict[str, Any], version: str = "0.1.44", *extra: str, store: str = STORE) -> list[str]:
    """A release that may start the store (``--init``), of stand-in bytes (``--no-inspect``)."""
    return [
        "release",
        version,
        *env["binaries"],
        "--key",
        str(env["key"].path),
        "--store",
        store,
        "--init",
        "--no-inspect",
        *extra,
    ]


def signing(env: dict[str, Any], store: str = STORE) -> list[str]:
    return ["--key", str(env["key"].path), "--store", store]


def bucket(s3: Any, name: str = BUCKET) -> dict[str, dict[str, Any]]:
    """Every object: ETag, size, Content-Type, Cache-Control (to prove a refusal changed nothing)."""
    out: dict[str, dict[str, Any]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", ()):
            head = s3.head_object(Bucket=name, Key=item["Key"])
            out[item["Key"]] = {
                "etag": head["ETag"],
                "size": head["ContentLength"],
                "content_type": head.get("ContentType"),
                "cache_control": head.get("CacheControl"),
            }
    return out


def body(s3: Any, key: str) -> bytes:
    return s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")["Body"].read()


def live(s3: Any, env: dict[str, Any]) -> Manifest:
    """``manifest.json`` as read back from the bucket, through the agent's own verifier."""
    return verify_manifest(body(s3, "manifest.json"), trusted=[env["key"].public], now=datetime.now(UTC))


def b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def one_line_error(stderr: str) -> str:
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith("avika-publish: error: "), stderr
    return stderr


# ---------------------------------------------------------------- release to S3


def test_release_writes_the_layout_with_its_headers_and_the_manifest_last(
    aws: Any, recorder: Recorder, env: dict[str, Any]
) -> None:
    result = cli(*release_args(env, "v0.1.44", "--image", "hellodk/avika-agent:0.1.44", "--json"))
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["status"], out["store"], out["serial"]) == ("published", STORE, 1)

    binaries = {
        f"binaries/0.1.44/{sha256(data)}/avika-agent-{platform}": data
        for platform, data in env["bytes"].items()
    }
    layout = {*binaries, "manifests/1.json", "helm-values.yaml", "manifest.json"}
    objects = bucket(aws)
    assert set(objects) == {f"{PREFIX}/{key}" for key in layout}
    for key in layout:  # DESIGN section 2's table, object by object
        head = objects[f"{PREFIX}/{key}"]
        assert (head["content_type"], head["cache_control"]) == object_headers(key), key
    for key, data in binaries.items():
        assert body(aws, key) == data
    assert body(aws, "manifests/1.json") == body(aws, "manifest.json")

    writes = recorder.writes
    last = [f"{PREFIX}/{k}" for k in ("manifests/1.json", "helm-values.yaml", "manifest.json")]
    assert [c.key for c in writes[2:]] == last  # binaries first, the archive, helm values, manifest.json last
    assert {c.key for c in writes[:2]} == {f"{PREFIX}/{key}" for key in binaries}
    for call in writes[:2]:  # binaries: create-only, checksummed
        assert call.headers["If-None-Match"] == "*"
        assert call.headers["x-amz-checksum-sha256"] == b64sha(binaries[call.key[len(PREFIX) + 1 :]])
    assert writes[2].headers["If-None-Match"] == "*"  # the archive is create-only
    assert writes[4].headers["If-None-Match"] == "*"  # the first manifest.json: only if still absent

    manifest = live(aws, env)  # the agent's verifier accepts what was read back
    assert (manifest.version, manifest.serial) == ("0.1.44", 1)
    assert {p: (b.sha256, b.size) for p, b in manifest.binaries.items()} == {
        p: (sha256(d), len(d)) for p, d in env["bytes"].items()
    }
    verified = cli("verify", "--public-key", env["key"].public.b64, "--store", STORE, "--json")
    assert verified.exit_code == 0, verified.stderr
    assert json.loads(verified.stdout)["ok"] is True
    shown = cli("show", "--store", STORE, "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["serial"] == 1

    before = bucket(aws)
    calls = len(recorder.calls)
    retry = cli(*release_args(env, "0.1.44", "--image", "hellodk/avika-agent:0.1.44"))
    assert retry.exit_code == 0 and "already published" in retry.stdout  # a CI retry: a no-op
    assert bucket(aws) == before
    assert not [c for c in recorder.calls[calls:] if c.operation in ("PutObject", "CompleteMultipartUpload")]


def test_a_large_binary_goes_multipart_with_parts_in_flight_together(
    aws: Any, recorder: Recorder, env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3store, "DEFAULT_TRANSFER", SMALL_PARTS)  # 5 MiB parts, 4 in flight
    big = os.urandom(20 * MiB + 123)  # four full parts and a short one
    (env["tmp"] / "dist" / "amd64").write_bytes(big)
    env["bytes"]["linux-amd64"] = big

    # The first two parts wait for each other: the test passes only if they are in flight at once.
    both_in_flight = threading.Barrier(2)
    gated: list[bool] = []

    def gate(call: Call) -> None:
        with recorder.lock:
            first_two = len(gated) < 2
            gated.append(first_two)
        if first_two:
            both_in_flight.wait(timeout=20)

    recorder.hooks["UploadPart"] = gate
    result = cli(*release_args(env))
    assert result.exit_code == 0, result.stderr
    assert not both_in_flight.broken

    key = f"{PREFIX}/binaries/0.1.44/{sha256(big)}/avika-agent-linux-amd64"
    creates = [c for c in recorder.ops("CreateMultipartUpload") if c.key == key]
    parts = [c for c in recorder.ops("UploadPart") if c.key == key]
    completes = [c for c in recorder.ops("CompleteMultipartUpload") if c.key == key]
    assert (len(creates), len(parts), len(completes)) == (1, 5, 1)
    assert len({c.thread for c in parts}) >= 2  # a thread pool, not the caller's thread
    assert creates[0].headers["Content-Type"] == "application/octet-stream"
    assert creates[0].headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert creates[0].headers["x-amz-checksum-algorithm"] == "SHA256"
    assert all("x-amz-checksum-sha256" in c.headers for c in parts)
    assert completes[0].headers["If-None-Match"] == "*"  # create-only reaches the completion
    assert completes[0].headers["x-amz-mp-object-size"] == str(len(big))
    assert not [c for c in recorder.ops("PutObject") if c.key == key]
    assert [c.key for c in recorder.writes][-1] == f"{PREFIX}/manifest.json"

    assert aws.get_object(Bucket=BUCKET, Key=key)["Body"].read() == big
    head = aws.head_object(Bucket=BUCKET, Key=key)
    assert (head["ContentType"], head["CacheControl"]) == object_headers(key[len(PREFIX) + 1 :])
    assert "Uploads" not in aws.list_multipart_uploads(Bucket=BUCKET)
    assert live(aws, env).binaries["linux-amd64"].size == len(big)
    verified = cli("verify", "--public-key", env["key"].public.b64, "--store", STORE)
    assert verified.exit_code == 0, verified.stderr

    # The same version with other bytes: refused (exit 2) before any write, the bucket unchanged.
    before, calls = bucket(aws), len(recorder.calls)
    (env["tmp"] / "dist" / "amd64").write_bytes(os.urandom(len(big)))
    refused = cli(*release_args(env))
    assert refused.exit_code == 2 and "already published with other bytes" in one_line_error(refused.stderr)
    assert bucket(aws) == before
    assert not [c for c in recorder.calls[calls:] if c.operation in (
        "PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload")]  # fmt: skip


def test_rollout_halt_and_refresh_re_sign_against_s3_with_compare_and_swap(
    aws: Any, recorder: Recorder, env: dict[str, Any]
) -> None:
    assert cli(*release_args(env, "0.1.44", "--rollout", "10")).exit_code == 0
    steps = [("rollout", "50"), ("halt",), ("refresh", "--expires-in", "2d")]
    for serial, step in enumerate(steps, start=2):
        previous = body(aws, "manifest.json")
        result = cli(*step, *signing(env))
        assert result.exit_code == 0, result.stderr
        put = [c for c in recorder.writes if c.key == f"{PREFIX}/manifest.json"][-1]
        assert put.headers["If-Match"] == f'"{hashlib.md5(previous).hexdigest()}"'  # the ETag read
        assert live(aws, env).serial == serial
    manifest = live(aws, env)
    assert (manifest.rollout.percent, manifest.rollout.salt) == (0, "0.1.44")
    assert manifest.expires - datetime.now(UTC) <= timedelta(days=2)
    assert sorted(k for k in bucket(aws) if "/manifests/" in k) == [
        f"{PREFIX}/manifests/{n}.json" for n in (1, 2, 3, 4)
    ]


def test_manifest_json_never_moves_back_when_another_publish_lands_first(
    aws: Any, recorder: Recorder, env: dict[str, Any]
) -> None:
    assert cli(*release_args(env)).exit_code == 0
    newer = b'{"a newer publish": true}'

    def race(call: Call) -> None:  # another publisher's manifest.json lands between our read and write
        if call.key == f"{PREFIX}/manifest.json" and "If-Match" in call.headers:
            aws.put_object(Bucket=BUCKET, Key=call.key, Body=newer)

    recorder.hooks["PutObject"] = race
    result = cli("rollout", "50", *signing(env))
    assert result.exit_code == 1
    assert "changed while serial 2 was being published" in one_line_error(result.stderr)
    assert body(aws, "manifest.json") == newer


# ---------------------------------------------------------------- create-only, at the store


def test_create_only_single_put_refuses_an_existing_key(aws: Any, recorder: Recorder) -> None:
    store = S3Store(BUCKET, PREFIX)
    store.put_immutable("manifests/7.json", b"first")
    with pytest.raises(AlreadyExists, match="already exists in s3://avika-releases/updates/stable"):
        store.put_immutable("manifests/7.json", b"second")
    assert store.read("manifests/7.json") == b"first"
    puts = recorder.ops("PutObject")
    assert len(puts) == 2 and all(c.headers["If-None-Match"] == "*" for c in puts)  # moto answered 412


def test_create_only_multipart_refuses_an_existing_key_before_uploading(
    aws: Any, recorder: Recorder, tmp_path: Path
) -> None:
    store = S3Store(BUCKET, PREFIX, transfer=SMALL_PARTS)
    store.put_immutable("binaries/1.0/x/avika-agent-a", b"already here")
    make_binary(tmp_path / "big", 6 * MiB, "big")
    with pytest.raises(AlreadyExists):
        store.put_immutable("binaries/1.0/x/avika-agent-a", tmp_path / "big")
    assert not recorder.ops("CreateMultipartUpload", "UploadPart")  # nothing uploaded in vain
    assert store.read("binaries/1.0/x/avika-agent-a") == b"already here"


def test_create_only_multipart_losing_the_race_at_completion_is_already_exists_and_aborts(
    aws: Any, recorder: Recorder, tmp_path: Path
) -> None:
    """Another writer creates the key while our parts upload: CompleteMultipartUpload carries
    ``If-None-Match: *`` (recorded) and moto answers 412 (it enforces the header on completion),
    which the store reports as ``AlreadyExists``; the parts are aborted, the winner's bytes stay."""
    store = S3Store(BUCKET, PREFIX, transfer=SMALL_PARTS)
    key = f"{PREFIX}/binaries/1.0/x/avika-agent-a"
    recorder.hooks["CompleteMultipartUpload"] = lambda call: (
        aws.put_object(Bucket=BUCKET, Key=key, Body=b"the other writer won") and None
    )
    make_binary(tmp_path / "big", 11 * MiB, "big")
    with pytest.raises(AlreadyExists):
        store.put_immutable("binaries/1.0/x/avika-agent-a", tmp_path / "big")
    (complete,) = recorder.ops("CompleteMultipartUpload")
    assert complete.headers["If-None-Match"] == "*"
    assert len(recorder.ops("UploadPart")) == 3 and len(recorder.ops("AbortMultipartUpload")) == 1
    assert aws.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"the other writer won"
    assert "Uploads" not in aws.list_multipart_uploads(Bucket=BUCKET)


def test_a_file_that_does_not_match_its_sha256_is_aborted_and_never_stored(
    aws: Any, recorder: Recorder, tmp_path: Path
) -> None:
    store = S3Store(BUCKET, PREFIX, transfer=SMALL_PARTS)
    make_binary(tmp_path / "big", 7 * MiB, "big")
    with pytest.raises(StoreError, match="changed while it was uploaded"):
        store.put_immutable("binaries/1.0/x/avika-agent-a", tmp_path / "big", sha256="0" * 64)
    assert not recorder.ops("CompleteMultipartUpload") and recorder.ops("AbortMultipartUpload")
    assert not store.exists("binaries/1.0/x/avika-agent-a")
    assert "Uploads" not in aws.list_multipart_uploads(Bucket=BUCKET)


def test_a_failed_part_fails_the_upload_in_one_line_and_aborts_it(
    aws: Any, recorder: Recorder, tmp_path: Path
) -> None:
    store = S3Store(BUCKET, PREFIX, transfer=SMALL_PARTS)
    recorder.hooks["UploadPart"] = lambda call: (
        aws_error("AccessDenied", 403, "Access Denied") if "partNumber=2" in call.url else None
    )
    make_binary(tmp_path / "big", 16 * MiB, "big")
    with pytest.raises(StoreError) as info:
        store.put_immutable("binaries/1.0/x/avika-agent-a", tmp_path / "big")
    assert info.value.message == (
        f"S3 UploadPart 2 s3://{BUCKET}/{PREFIX}/binaries/1.0/x/avika-agent-a: AccessDenied: Access Denied"
    )
    assert recorder.ops("AbortMultipartUpload") and not recorder.ops("CompleteMultipartUpload")
    assert not store.exists("binaries/1.0/x/avika-agent-a")
    assert "Uploads" not in aws.list_multipart_uploads(Bucket=BUCKET)


def test_put_mutable_sends_the_condition_it_is_asked_for(aws: Any, recorder: Recorder) -> None:
    store = S3Store(BUCKET, PREFIX)
    store.put_mutable("manifest.json", b"one", if_match=None)
    token = store.read_versioned("manifest.json").token
    store.put_mutable("manifest.json", b"two", if_match=token)
    store.put_mutable("helm-values.yaml", b"image: {}\n", if_match=ANY)
    first, second, third = recorder.ops("PutObject")
    assert first.headers["If-None-Match"] == "*" and "If-Match" not in first.headers
    assert second.headers["If-Match"] == token and "If-None-Match" not in second.headers
    assert "If-Match" not in third.headers and "If-None-Match" not in third.headers
    assert third.headers["Content-Type"] == "application/yaml"
    assert third.headers["Cache-Control"] == "public, max-age=60"


# ---------------------------------------------------------------- CloudFront


def create_distribution() -> str:
    return boto3.client("cloudfront").create_distribution(
        DistributionConfig={
            "CallerReference": "avika-test",
            "Comment": "avika updates",
            "Enabled": True,
            "Origins": {"Quantity": 1, "Items": [{
                "Id": "bucket", "DomainName": f"{BUCKET}.s3.amazonaws.com",
                "S3OriginConfig": {"OriginAccessIdentity": ""},
            }]},
            "DefaultCacheBehavior": {
                "TargetOriginId": "bucket",
                "ViewerProtocolPolicy": "redirect-to-https",
                "MinTTL": 0,
                "ForwardedValues": {"QueryString": False, "Cookies": {"Forward": "none"}},
                "TrustedSigners": {"Enabled": False, "Quantity": 0},
            },
        }
    )["Distribution"]["Id"]  # fmt: skip


def invalidations(distribution: str) -> list[dict[str, Any]]:
    cloudfront = boto3.client("cloudfront")
    listed = cloudfront.list_invalidations(DistributionId=distribution)["InvalidationList"]
    return [
        cloudfront.get_invalidation(DistributionId=distribution, Id=item["Id"])["Invalidation"]
        for item in listed.get("Items", [])
    ]


def test_a_publish_invalidates_only_the_manifest_path_with_a_unique_caller_reference(
    aws: Any, recorder: Recorder, env: dict[str, Any]
) -> None:
    distribution = create_distribution()
    result = cli(*release_args(env, "0.1.44", "--cloudfront-distribution", distribution))
    assert result.exit_code == 0, result.stderr
    assert f"invalidated /{PREFIX}/manifest.json on CloudFront distribution {distribution}" in result.stderr
    (first,) = invalidations(distribution)
    assert first["InvalidationBatch"]["Paths"] == {"Quantity": 1, "Items": [f"/{PREFIX}/manifest.json"]}
    order = [c.operation for c in recorder.calls if c.operation in ("PutObject", "CreateInvalidation")]
    assert order[-2:] == ["PutObject", "CreateInvalidation"] and order.count("CreateInvalidation") == 1

    # The distribution from the environment; a dry run and a no-op retry invalidate nothing.
    by_env = {"AVIKA_CLOUDFRONT_DISTRIBUTION_ID": distribution}
    assert cli("rollout", "50", "--dry-run", *signing(env), env=by_env).exit_code == 0
    retry = cli(*release_args(env), env=by_env)
    assert retry.exit_code == 0 and "already published" in retry.stdout
    assert len(invalidations(distribution)) == 1
    assert cli("rollout", "50", *signing(env), env=by_env).exit_code == 0
    done = invalidations(distribution)
    assert len(done) == 2
    assert all(i["InvalidationBatch"]["Paths"]["Items"] == [f"/{PREFIX}/manifest.json"] for i in done)
    assert len({i["InvalidationBatch"]["CallerReference"] for i in done}) == 2


def test_an_invalidation_failure_is_one_line_exit_1_after_the_manifest_is_live(
    aws: Any, env: dict[str, Any]
) -> None:
    create_distribution()
    result = cli(*release_args(env, "0.1.44", "--cloudfront-distribution", "ENOSUCHDIST"))
    assert result.exit_code == 1
    line = one_line_error(result.stderr)
    assert "CloudFront CreateInvalidation" in line and "NoSuchDistribution" in line
    assert "manifest.json is live" in line
    assert live(aws, env).serial == 1


def test_invalidation_paths_follow_the_prefix() -> None:
    assert cdn.manifest_path("updates/stable/") == "/updates/stable/manifest.json"
    assert cdn.manifest_path("") == "/manifest.json"
    assert cdn.manifest_path("a b") == "/a%20b/manifest.json"
    assert cdn.caller_reference() != cdn.caller_reference()
    with pytest.raises(ValueError, match=r"only manifest\.json"):
        cdn.CloudFrontInvalidator("E1", "p", client=object())(["manifest.json", "binaries/x"])


# ---------------------------------------------------------------- endpoints, URLs, errors


def test_endpoint_url_is_honoured_from_the_option_and_from_aws_endpoint_url(
    recorder: Recorder, env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = "http://s3.avika.test:9000"  # an S3-compatible service (moto answers for it)
    aws_env(monkeypatch)
    monkeypatch.setenv("MOTO_S3_CUSTOM_ENDPOINTS", endpoint)
    with mock_aws():
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        result = cli(*release_args(env, "0.1.44", "--endpoint-url", endpoint))
        assert result.exit_code == 0, result.stderr
        assert [c.meta.endpoint_url for c in recorder.clients] == [endpoint]
        assert recorder.calls and all(c.url.startswith(f"{endpoint}/") for c in recorder.calls)

        shown = cli("show", "--store", STORE, "--json", env={"AWS_ENDPOINT_URL": endpoint})
        assert shown.exit_code == 0, shown.stderr
        assert recorder.clients[-1].meta.endpoint_url == endpoint


def test_s3_urls_open_an_s3_store(monkeypatch: pytest.MonkeyPatch) -> None:
    aws_env(monkeypatch)
    store = open_store("s3://avika-releases/updates/stable/", endpoint_url="http://127.0.0.1:9")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.location) == (BUCKET, PREFIX, STORE)
    assert store.client.meta.endpoint_url == "http://127.0.0.1:9"
    root = open_store("s3://avika-releases")
    assert isinstance(root, S3Store) and (root.prefix, root.location) == ("", "s3://avika-releases")
    assert root.name("manifest.json") == "manifest.json"


@pytest.mark.parametrize(
    "url, message",
    [
        ("s3:///updates", "no bucket"),
        ("s3://avika-releases/a/../b", "invalid prefix"),
        ("s3://avika-releases/.hidden", "invalid prefix"),
        ("s3://avika-releases/p?versionId=1", "no query"),
        ("s3://bad bucket/p", "not a bucket name"),
    ],
)
def test_bad_s3_urls_are_refused(url: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    aws_env(monkeypatch)
    with pytest.raises(Refused, match=message) as info:
        open_store(url)
    assert info.value.exit_code == 2


def test_a_bad_endpoint_url_exits_2(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    aws_env(monkeypatch)
    result = cli(*release_args(env, "0.1.44", "--endpoint-url", "not a url"))
    assert result.exit_code == 2 and "--endpoint-url" in one_line_error(result.stderr)


def test_a_missing_bucket_is_one_line_exit_1(aws: Any, env: dict[str, Any]) -> None:
    result = cli(*release_args(env, store="s3://no-such-bucket/updates"))
    assert result.exit_code == 1
    line = one_line_error(result.stderr)
    assert "s3://no-such-bucket/updates/manifest.json" in line and "NoSuchBucket" in line


@pytest.mark.parametrize(
    "operation, code, status, message",
    [
        ("PutObject", "AccessDenied", 403, "Access Denied"),
        ("GetObject", "ExpiredToken", 400, "The provided token has expired."),
    ],
)
def test_an_aws_error_is_one_line_exit_1_naming_bucket_key_and_code(
    aws: Any, recorder: Recorder, env: dict[str, Any], operation: str, code: str, status: int, message: str
) -> None:
    recorder.hooks[operation] = lambda call: aws_error(code, status, message)
    result = cli(*release_args(env))
    assert result.exit_code == 1
    line = one_line_error(result.stderr)
    assert f"S3 {operation} s3://{BUCKET}/{PREFIX}/" in line and f"{code}: {message}" in line
    assert bucket(aws) == {}


def test_no_credentials_is_one_clear_line_exit_1(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    aws_env(monkeypatch, credentials=False)  # and no moto: the chain finds nothing, nothing is sent
    result = cli(*release_args(env))
    assert result.exit_code == 1
    assert "no AWS credentials found" in one_line_error(result.stderr)
