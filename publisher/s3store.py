"""The S3 store: ``s3://bucket/prefix`` with the layout and guarantees of ``publisher.stores``.

The same interface as ``DirStore``, over S3's conditional writes:

- ``put_immutable`` is create-only with ``IfNoneMatch="*"``. Small objects are one ``PutObject``.
  Large files go multipart: boto3's managed uploader (``upload_file``) does not pass ``IfNoneMatch``
  through, so this module drives ``CreateMultipartUpload`` / ``UploadPart`` / ``CompleteMultipartUpload``
  itself, with the condition on the completion. Parts (at least 8 MiB, ``TransferConfig`` sizes them)
  are read from the file one at a time in order, hashed into the whole-file SHA-256 and uploaded
  concurrently by a bounded thread pool, so at most ``max_concurrency`` parts are in memory. Every
  part carries its ``ChecksumSHA256`` (S3 checks each one), and the completion happens only if the
  whole file still hashes to the ``sha256`` the manifest will name; otherwise, or on any failure,
  the upload is aborted and nothing appears under the key. A 412 on the completion means another
  writer created the key first: ``AlreadyExists``, exactly as ``DirStore``'s ``link`` failing.
- ``put_mutable`` is ``PutObject`` with ``IfMatch=<ETag>`` (the token ``read_versioned`` returned),
  or ``IfNoneMatch="*"`` when the key must not exist, so two publishes racing cannot move
  ``manifest.json`` back to a lower serial.
- Content-Type and Cache-Control follow the layout table (``object_headers``) unless given.

Credentials come from boto3's default chain (environment, profile, SSO, web identity/OIDC, instance
role). ``--endpoint-url`` (or ``AWS_ENDPOINT_URL``, which boto3 reads itself) selects an
S3-compatible service. Every botocore error becomes a ``StoreError`` (exit 1) with one line naming
the operation, ``s3://bucket/key`` and the AWS error code.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import posixpath
import re
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from publisher.errors import Refused
from publisher.stores import (
    ANY,
    CHUNK,
    MAX_READ_BYTES,
    AlreadyExists,
    Conflict,
    NotFound,
    Oversized,
    Progress,
    Store,
    StoreError,
    Versioned,
    _http_chunks,
    check_key,
    object_headers,
)

MiB = 1 << 20
MIN_PART_SIZE = 5 * MiB  # S3's floor for every part but the last
MAX_PARTS = 10_000  # S3's ceiling on parts per upload
DEFAULT_TRANSFER = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=8)
"""Files of ``multipart_threshold`` bytes or more go multipart, in ``multipart_chunksize`` parts
(never below S3's 5 MiB), ``max_concurrency`` parts in flight."""
PUT_ATTEMPTS = 3  # a single PutObject answered 409 ConditionalRequestConflict is retried (S3's advice)
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


def make_client(service: str, *, endpoint_url: str | None = None, max_pool_connections: int = 10) -> Any:
    """A boto3 client on the default credential chain (one place, so tests can watch every client)."""
    config = Config(
        retries={"mode": "standard", "max_attempts": 3},
        max_pool_connections=max_pool_connections,
        user_agent_extra="avika-publish",
    )
    try:
        return boto3.session.Session().client(service, endpoint_url=endpoint_url or None, config=config)
    except ValueError as exc:  # e.g. "Invalid endpoint: ..."
        raise Refused(f"--endpoint-url {endpoint_url!r}: {exc}") from None
    except BotoCoreError as exc:
        raise StoreError(f"{service} client: {_one_line(str(exc))}") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ``ClientError`` (a HEAD has no body: its code is the status)."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code") or _status(exc) or "Unknown")
    return type(exc).__name__


def _status(exc: ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def describe_aws_error(exc: BaseException) -> str:
    """``Code: message`` on one line, for any botocore error."""
    if isinstance(exc, NoCredentialsError):
        return (
            "NoCredentials: no AWS credentials found (set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, or run with a role)"
        )
    if isinstance(exc, ClientError):
        code = error_code(exc)
        message = exc.response.get("Error", {}).get("Message") or ""
        status = _status(exc)
        if not message and status is not None:
            message = f"HTTP {status}"
        return _one_line(f"{code}: {message}" if message else code)
    return _one_line(f"{type(exc).__name__}: {exc}")


def _is_precondition_failed(exc: ClientError) -> bool:
    return error_code(exc) in ("PreconditionFailed", "412") or _status(exc) == 412


def _is_conditional_conflict(exc: ClientError) -> bool:
    return error_code(exc) == "ConditionalRequestConflict" or _status(exc) == 409


def _is_missing(exc: ClientError) -> bool:
    return error_code(exc) in ("NoSuchKey", "404", "NotFound")


def _b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def _report(progress: Progress | None, size: int) -> None:
    """Tell the progress callback about ``size`` bytes in steps of at most ``CHUNK``."""
    if progress is None:
        return
    for offset in range(0, size, CHUNK):
        progress(min(CHUNK, size - offset))


class S3Store(Store):
    """Objects under ``s3://bucket/prefix``: see the module docstring."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        endpoint_url: str | None = None,
        transfer: TransferConfig | None = None,
    ) -> None:
        if not _BUCKET_RE.match(bucket or ""):
            raise Refused(f"store s3://{bucket}: {bucket!r} is not a bucket name")
        prefix = prefix.strip("/")
        if prefix:
            try:
                check_key(prefix)
            except StoreError:
                raise Refused(f"store s3://{bucket}/{prefix}: invalid prefix {prefix!r}") from None
        self.bucket = bucket
        self.prefix = prefix
        self.location = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        transfer = transfer or DEFAULT_TRANSFER
        self.part_size = max(MIN_PART_SIZE, int(transfer.multipart_chunksize))
        self.multipart_threshold = max(1, int(transfer.multipart_threshold))
        self.workers = max(1, int(transfer.max_concurrency))
        self.client = client or make_client(
            "s3", endpoint_url=endpoint_url, max_pool_connections=self.workers + 2
        )

    @classmethod
    def from_url(
        cls, url: str, *, endpoint_url: str | None = None, transfer: TransferConfig | None = None
    ) -> S3Store:
        parts = urlsplit(url)
        if parts.scheme.lower() != "s3":
            raise Refused(f"store {url!r} is not an s3:// URL")
        if not parts.netloc:
            raise Refused(f"store {url!r}: no bucket; use s3://bucket/prefix")
        if parts.query or parts.fragment:
            raise Refused(f"store {url!r}: an s3:// store URL takes no query or fragment")
        return cls(parts.netloc, unquote(parts.path), endpoint_url=endpoint_url, transfer=transfer)

    # ------------------------------------------------------------ names and errors

    def name(self, key: str) -> str:
        """The S3 object key of a store key."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, operation: str, name: str, exc: BaseException) -> StoreError:
        return StoreError(f"S3 {operation} s3://{self.bucket}/{name}: {describe_aws_error(exc)}")

    # ------------------------------------------------------------ reading

    def read_versioned(self, key: str, *, limit: int = MAX_READ_BYTES) -> Versioned:
        name = self.name(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=name)
            with contextlib.closing(response["Body"]) as body:
                if response.get("ContentLength", 0) > limit:
                    raise Oversized(f"s3://{self.bucket}/{name} is over {limit} bytes; not a manifest")
                data = body.read(limit + 1)
            if len(data) > limit:
                raise Oversized(f"s3://{self.bucket}/{name} is over {limit} bytes; not a manifest")
        except ClientError as exc:
            if _is_missing(exc):
                return Versioned(None, None)
            raise self._fail("GetObject", name, exc) from None
        except BotoCoreError as exc:
            raise self._fail("GetObject", name, exc) from None
        return Versioned(data, response["ETag"])

    def read(self, key: str, *, limit: int = MAX_READ_BYTES) -> bytes | None:
        return self.read_versioned(key, limit=limit).data

    def size(self, key: str) -> int | None:
        name = self.name(key)
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=name)["ContentLength"])
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise self._fail("HeadObject", name, exc) from None
        except BotoCoreError as exc:
            raise self._fail("HeadObject", name, exc) from None

    def list(self, prefix: str) -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base + prefix
            )
            for page in pages:
                for item in page.get("Contents", ()):
                    key = item["Key"][len(base) :]
                    if key.startswith(prefix) and not any(p.startswith(".") for p in key.split("/")):
                        keys.append(key)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("ListObjectsV2", base + prefix + "*", exc) from None
        return sorted(keys)

    def stream(self, url: str) -> Iterator[bytes]:
        parts = urlsplit(url)
        if parts.scheme:
            return _http_chunks(url)
        name = self.name(posixpath.normpath(unquote(parts.path)))
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=name)["Body"]
        except ClientError as exc:
            if _is_missing(exc):
                raise NotFound(f"s3://{self.bucket}/{name} does not exist") from None
            raise self._fail("GetObject", name, exc) from None
        except BotoCoreError as exc:
            raise self._fail("GetObject", name, exc) from None

        def chunks() -> Iterator[bytes]:
            with contextlib.closing(body):
                try:
                    yield from body.iter_chunks(CHUNK)
                except (ClientError, BotoCoreError) as exc:
                    raise self._fail("GetObject", name, exc) from None

        return chunks()

    # ------------------------------------------------------------ writing

    def put_immutable(
        self,
        key: str,
        source: bytes | Path,
        *,
        content_type: str | None = None,
        cache_control: str | None = None,
        sha256: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        name = self.name(key)
        default_type, default_cache = object_headers(key)
        headers = {
            "ContentType": content_type or default_type,
            "CacheControl": cache_control or default_cache,
        }
        if isinstance(source, bytes | bytearray):
            data = bytes(source)
        else:
            try:
                size = os.stat(source).st_size
            except OSError as exc:
                raise StoreError(f"{source}: {exc.strerror or exc}") from None
            if size >= self.multipart_threshold:
                self._put_multipart(key, name, Path(source), size, headers, sha256, progress)
                return
            data = self._read_small(Path(source))
        digest = hashlib.sha256(data)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise StoreError(
                f"{source if isinstance(source, Path) else key} changed while it was uploaded "
                f"(sha256 {digest.hexdigest()}, expected {sha256})"
            )
        self._put_create_only(key, name, data, base64.b64encode(digest.digest()).decode("ascii"), headers)
        _report(progress, len(data))

    @staticmethod
    def _read_small(path: Path) -> bytes:
        data = bytearray()
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    data += chunk
        except OSError as exc:
            raise StoreError(f"{path}: {exc.strerror or exc}") from None
        return bytes(data)

    def _put_create_only(self, key: str, name: str, data: bytes, checksum: str, headers: dict) -> None:
        for attempt in range(1, PUT_ATTEMPTS + 1):
            try:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=name,
                    Body=data,
                    IfNoneMatch="*",
                    ChecksumSHA256=checksum,
                    **headers,
                )
                return
            except ClientError as exc:
                if _is_precondition_failed(exc):
                    raise AlreadyExists(f"{key} already exists in {self.location}") from None
                if _is_conditional_conflict(exc) and attempt < PUT_ATTEMPTS:
                    time.sleep(0.2 * attempt)  # a concurrent write to the key: its outcome decides ours
                    continue
                raise self._fail("PutObject", name, exc) from None
            except BotoCoreError as exc:
                raise self._fail("PutObject", name, exc) from None

    def _put_multipart(
        self,
        key: str,
        name: str,
        path: Path,
        size: int,
        headers: dict,
        sha256: str | None,
        progress: Progress | None,
    ) -> None:
        # Checked first only to save uploading a large file that could never land; the
        # guarantee is IfNoneMatch on the completion.
        if self.size(key) is not None:
            raise AlreadyExists(f"{key} already exists in {self.location}")
        # S3 allows at most 10,000 parts: a huge file gets bigger parts (whole MiB).
        part_size = max(self.part_size, -(-size // MAX_PARTS // MiB) * MiB)
        try:
            upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=name, ChecksumAlgorithm="SHA256", **headers
            )["UploadId"]
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("CreateMultipartUpload", name, exc) from None
        try:
            parts, digest, total = self._upload_parts(name, upload_id, path, part_size, progress)
            if sha256 is not None and digest != sha256:
                raise StoreError(f"{path} changed while it was uploaded (sha256 {digest}, expected {sha256})")
            try:
                self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=name,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                    MpuObjectSize=total,
                )
            except ClientError as exc:
                if _is_precondition_failed(exc):
                    raise AlreadyExists(f"{key} already exists in {self.location}") from None
                if _is_conditional_conflict(exc) and self.size(key) is not None:
                    raise AlreadyExists(f"{key} already exists in {self.location}") from None
                raise self._fail("CompleteMultipartUpload", name, exc) from None
            except BotoCoreError as exc:
                raise self._fail("CompleteMultipartUpload", name, exc) from None
        except BaseException:
            # Nothing was created; drop the parts (S3 bills for them until a lifecycle rule would).
            with contextlib.suppress(ClientError, BotoCoreError):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
            raise

    def _upload_parts(
        self, name: str, upload_id: str, path: Path, part_size: int, progress: Progress | None
    ) -> tuple[list[dict[str, Any]], str, int]:
        """Read parts in order (hashing the whole file), upload them ``self.workers`` at a time.

        Returns (the parts for CompleteMultipartUpload, the file's sha256, its size). Progress is
        reported from this (the caller's) thread only, as parts finish.
        """
        digest = hashlib.sha256()
        parts: list[dict[str, Any]] = []
        total = 0
        inflight: set[Future[tuple[dict[str, Any], int]]] = set()

        def collect(done: set[Future[tuple[dict[str, Any], int]]]) -> None:
            for future in done:
                part, length = future.result()  # re-raises a failed part's error
                parts.append(part)
                _report(progress, length)

        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="avika-s3-part")
        try:
            with open(path, "rb") as fh:
                number = 0
                while True:
                    while len(inflight) >= self.workers:  # a free slot before reading more: bounded memory
                        done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                        collect(done)
                    data = fh.read(part_size)
                    if not data:
                        break
                    number += 1
                    if number > MAX_PARTS:
                        raise StoreError(f"{path} grew while it was uploaded (over {MAX_PARTS} parts)")
                    digest.update(data)
                    total += len(data)
                    inflight.add(pool.submit(self._upload_part, name, upload_id, number, data))
                    del data
            done, inflight = wait(inflight)
            collect(done)
        except OSError as exc:
            raise StoreError(f"{path}: {exc.strerror or exc}") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        parts.sort(key=lambda p: p["PartNumber"])
        return parts, digest.hexdigest(), total

    def _upload_part(self, name: str, upload_id: str, number: int, data: bytes) -> tuple[dict[str, Any], int]:
        checksum = _b64_sha256(data)
        try:
            response = self.client.upload_part(
                Bucket=self.bucket,
                Key=name,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                ChecksumSHA256=checksum,
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(f"UploadPart {number}", name, exc) from None
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum}, len(data)

    def put_mutable(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        cache_control: str | None = None,
        if_match: Any = ANY,
    ) -> None:
        name = self.name(key)
        default_type, default_cache = object_headers(key)
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": name,
            "Body": data,
            "ContentType": content_type or default_type,
            "CacheControl": cache_control or default_cache,
            "ChecksumSHA256": _b64_sha256(data),
        }
        conditional = if_match is None or isinstance(if_match, str)
        if if_match is None:
            params["IfNoneMatch"] = "*"
        elif isinstance(if_match, str):
            params["IfMatch"] = if_match
        try:
            self.client.put_object(**params)
        except ClientError as exc:
            # 412: the ETag moved (or the key appeared); 404 on IfMatch: the key is gone;
            # 409: a concurrent conditional write to it is in flight.
            if conditional and (
                _is_precondition_failed(exc) or _is_conditional_conflict(exc) or _is_missing(exc)
            ):
                raise Conflict(f"{key} in {self.location} changed since it was read") from None
            raise self._fail("PutObject", name, exc) from None
        except BotoCoreError as exc:
            raise self._fail("PutObject", name, exc) from None
