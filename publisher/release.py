"""Publishing: the work behind ``release``, ``rollout``/``halt``/``refresh``, ``show`` and ``verify``.

A release, in the order of DESIGN section 1 (so an interrupted run never leaves agents a manifest
that points at something missing):

1. hash and size every binary in one streaming pass;
2. refuse what would hurt the fleet before writing anything: ``min_version`` above the version,
   an older version without ``--downgrade``, new bytes for a published version without ``--force``
   (section 2); an identical re-run (a CI retry) is a no-op;
3. upload binaries to content-addressed keys (ones already there are not uploaded again);
4. build the manifest at serial = 1 + max(current serial, every archived serial), sign it and
   re-verify the envelope through the agent's own verifier (``agent.manifest.verify_manifest``);
5. archive ``manifests/<serial>.json`` create-only: two concurrent publishes never share a serial;
6. ``helm-values.yaml`` (with ``--image``), then ``manifest.json`` last, as a compare-and-swap
   against what step 2 read, so the live pointer never moves back to a lower serial.

A re-sign (``resign``: rollout, halt, refresh) is steps 4-6 over the current manifest: new serial,
new expiry, same everything else (``rollout`` changes only the percent). It re-signs only a
manifest that already verifies with the signing key (or a ``--public-key`` trusted for rotation),
so a tampered ``manifest.json`` is never laundered by the daily refresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion

from agent.manifest import (
    Binary,
    Manifest,
    ManifestError,
    PublicKey,
    Rollout,
    Signer,
    audit_envelope,
    format_time,
    normalize_version,
    parse_manifest,
    parse_version,
    read_envelope_unverified,
    sign_envelope,
    verify_envelope,
    verify_manifest,
)
from publisher.errors import PublishError, Refused, VerificationFailed
from publisher.stores import (
    ARCHIVE_PREFIX,
    BINARIES_PREFIX,
    CHUNK,
    HELM_VALUES_KEY,
    MANIFEST_KEY,
    AlreadyExists,
    Conflict,
    NotFound,
    Reader,
    Store,
    StoreError,
    archive_key,
    archive_serial,
    binary_key,
    parse_binary_key,
)

DEFAULT_EXPIRES_IN = timedelta(days=30)

Advance = Callable[[int], None]
Progress = Callable[[str, int], AbstractContextManager[Advance]]
"""``progress(label, total_bytes)`` gives a context whose value is called with each chunk's size."""


def no_progress(label: str, total: int) -> AbstractContextManager[Advance]:
    return nullcontext(lambda n: None)


Invalidate = Callable[[list[str]], None]
"""Called with the keys to purge from the CDN after a publish (only ``manifest.json``)."""


# ---------------------------------------------------------------- inputs and results


@dataclass(frozen=True)
class ReleaseSpec:
    """What ``avika-publish release`` was asked to publish."""

    version: str
    binaries: Mapping[str, Path]
    image: str | None = None
    min_version: str | None = None
    changelog: str = ""
    rollout_percent: int = 100
    rollout_salt: str | None = None  # None: the version
    expires_in: timedelta = DEFAULT_EXPIRES_IN
    downgrade: bool = False
    reports_url: str | None = None  # None: keep the current manifest's; "": none
    force: bool = False


@dataclass(frozen=True)
class LocalBinary:
    platform: str
    path: Path
    sha256: str
    size: int


@dataclass
class Outcome:
    """What a publish did (or, for a dry run, would do)."""

    status: str  # "published" | "unchanged" | "dry_run"
    manifest: Manifest
    location: str
    envelope: bytes | None = None
    uploaded: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status,
            "store": self.location,
            "version": self.manifest.version,
            "serial": self.manifest.serial,
            "uploaded": self.uploaded,
            "present": self.present,
            "written": self.written,
            "notes": self.notes,
            "manifest": self.manifest.to_dict(),
        }
        if self.status == "dry_run":
            out["envelope"] = json.loads(self.envelope) if self.envelope else None
        return out


@dataclass(frozen=True)
class Current:
    """The store's ``manifest.json`` as read at the start of a publish (decoded without trust)."""

    envelope: bytes | None = None
    token: str | None = None
    manifest: Manifest | None = None


# ---------------------------------------------------------------- steps


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)


def hash_file(path: Path, advance: Advance | None = None) -> tuple[str, int]:
    """(sha256 hex, size) in one streaming pass of 1 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if advance:
                advance(len(chunk))
    return digest.hexdigest(), size


def hash_binaries(binaries: Mapping[str, Path], progress: Progress = no_progress) -> list[LocalBinary]:
    total = 0
    for platform, path in binaries.items():
        try:
            st = os.stat(path)
        except OSError as exc:
            raise Refused(f"--binary {platform}={path}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            raise Refused(f"--binary {platform}={path}: not a regular, non-empty file")
        total += st.st_size
    with progress("hashing", total) as advance:
        return [
            LocalBinary(platform, Path(path), *hash_file(Path(path), advance))
            for platform, path in sorted(binaries.items())
        ]


def read_current(store: Store) -> Current:
    versioned = store.read_versioned(MANIFEST_KEY)
    if versioned.data is None:
        return Current(token=versioned.token)
    try:
        manifest = parse_manifest(read_envelope_unverified(versioned.data))
    except ManifestError as exc:
        raise PublishError(
            f"{MANIFEST_KEY} in {store.location} is unreadable ({exc.code}: {exc.message}); repair it first"
        ) from None
    return Current(versioned.data, versioned.token, manifest)


def archived_serials(store: Store) -> list[int]:
    """Every serial in ``manifests/``, highest first."""
    serials = (archive_serial(key) for key in store.list(ARCHIVE_PREFIX))
    return sorted((s for s in serials if s is not None), reverse=True)


def next_serial(store: Store, current: Current) -> int:
    """One above the current serial and every archived one (an interrupted publish never blocks)."""
    serials = archived_serials(store)
    if current.manifest is not None:
        serials.append(current.manifest.serial)
    return max(serials, default=0) + 1


def _distinct_keys(keys: Iterable[PublicKey]) -> list[PublicKey]:
    return list(dict.fromkeys(keys))


def _validate(manifest: Manifest) -> None:
    """Hold what we are about to sign to the one schema (platform names, ranges, versions)."""
    try:
        parse_manifest(manifest.to_payload())
    except ManifestError as exc:
        raise Refused(f"invalid manifest: {exc.message}") from None


def sign_checked(manifest: Manifest, signers: Sequence[Signer], now: datetime) -> tuple[Manifest, bytes]:
    """Sign, then verify the envelope as an agent would, trusting exactly the signers' keys."""
    payload = manifest.to_payload()
    envelope = sign_envelope(payload, signers)
    keys = _distinct_keys(s.public_key for s in signers)
    try:
        verified = verify_manifest(envelope, trusted=keys, threshold=len(keys), now=now)
    except ManifestError as exc:
        raise PublishError(
            f"the signed manifest failed re-verification ({exc.code}: {exc.message}); nothing was published"
        ) from None
    if verified.raw != payload:
        raise PublishError(
            "the signed manifest's payload differs from what was signed; nothing was published"
        )
    return verified, envelope


def split_image(image: str) -> tuple[str, str, str]:
    """``repo[:tag][@digest]`` to (repository, tag, digest); no tag and no digest means ``latest``."""
    name, _, digest = image.partition("@")
    if ":" in name.rsplit("/", 1)[-1]:
        repository, tag = name.rsplit(":", 1)
    else:
        repository, tag = name, ("" if digest else "latest")
    return repository, tag, digest


def helm_values(image: str) -> bytes:
    """``image.repository`` / ``image.tag`` for ``helm upgrade -f`` (JSON strings are YAML strings)."""
    repository, tag, digest = split_image(image)
    lines = ["# Written by avika-publish release; the agent image for Kubernetes.", "image:"]
    lines.append(f"  repository: {json.dumps(repository)}")
    if tag:
        lines.append(f"  tag: {json.dumps(tag)}")
    if digest:
        lines.append(f"  digest: {json.dumps(digest)}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def _version(text: str, what: str) -> str:
    try:
        return normalize_version(text)
    except InvalidVersion:
        raise Refused(f"{what} {text!r} is not a version (PEP 440, e.g. 0.1.44 or v0.1.44)") from None


def _check_spec(spec: ReleaseSpec) -> tuple[str, str | None]:
    """The pure refusals, before any I/O: (version, min_version), both normalised."""
    version = _version(spec.version, "version")
    min_version = _version(spec.min_version, "--min-version") if spec.min_version else None
    if min_version is not None and parse_version(min_version) > parse_version(version):
        raise Refused(f"--min-version {min_version} is above the release's own version {version}")
    if spec.expires_in <= timedelta(0):
        raise Refused("--expires-in must be positive")
    return version, min_version


def _build(
    spec: ReleaseSpec,
    version: str,
    min_version: str | None,
    local: list[LocalBinary],
    current: Current,
    now: datetime,
) -> Manifest:
    reports_url = spec.reports_url
    if reports_url is None and current.manifest is not None:
        reports_url = current.manifest.reports_url
    manifest = Manifest(
        serial=1,  # a placeholder: the real serial is assigned just before the archive write
        version=version,
        released_at=now,
        expires=now + spec.expires_in,
        binaries={
            b.platform: Binary(url=binary_key(version, b.sha256, b.platform), sha256=b.sha256, size=b.size)
            for b in local
        },
        container_image=spec.image or None,
        min_version=min_version,
        changelog=spec.changelog,
        rollout=Rollout(spec.rollout_percent, version if spec.rollout_salt is None else spec.rollout_salt),
        downgrade=spec.downgrade,
        reports_url=reports_url or None,
    )
    _validate(manifest)
    return manifest


def _substance(manifest: Manifest) -> dict[str, Any]:
    """What a release says, without what every signing changes (serial, times)."""
    d = manifest.to_dict()
    for name in ("serial", "released_at", "expires", "signed_at"):
        d.pop(name)
    return d


def _already_published(
    candidate: Manifest, current: Current, signers: Sequence[Signer], now: datetime
) -> bool:
    """A CI retry: the live manifest says exactly this, is not expired and is signed by these keys."""
    live = current.manifest
    if live is None or current.envelope is None or _substance(live) != _substance(candidate):
        return False
    if live.expires <= now:
        return False
    keys = _distinct_keys(s.public_key for s in signers)
    if keys:
        try:
            verify_envelope(current.envelope, keys, threshold=len(keys))
        except ManifestError:
            return False
    return True


def _latest_manifest_of(store: Store, version: str, current: Current) -> Manifest | None:
    """The newest manifest (live, else archived) that published ``version``."""
    if current.manifest is not None and current.manifest.version == version:
        return current.manifest
    for serial in archived_serials(store):
        data = store.read(archive_key(serial))
        try:
            archived = parse_manifest(read_envelope_unverified(data or b""))
        except ManifestError:
            continue
        if archived.version == version:
            return archived
    return None


def _refuse_new_bytes(store: Store, version: str, local: list[LocalBinary], current: Current) -> None:
    """New bytes under a published version+platform are refused (``--force`` skips this check)."""
    known: dict[str, set[str]] = {}
    for key in store.list(f"{BINARIES_PREFIX}{version}/"):
        parsed = parse_binary_key(key)
        if parsed is not None and parsed[0] == version:
            known.setdefault(parsed[2], set()).add(parsed[1])
    if current.manifest is not None and current.manifest.version == version:
        for platform, binary in current.manifest.binaries.items():
            known.setdefault(platform, set()).add(binary.sha256)
    clashes = [b for b in local if known.get(b.platform, set()) - {b.sha256}]
    if not clashes:
        return
    # A version re-published with --force leaves its old bytes in the store; the newest manifest
    # of the version says which bytes are the version now.
    latest = _latest_manifest_of(store, version, current)
    if latest is not None and all(
        b.platform in latest.binaries and latest.binaries[b.platform].sha256 == b.sha256 for b in clashes
    ):
        return
    details = "; ".join(
        f"{b.platform}: published sha256 {', '.join(sorted(known[b.platform] - {b.sha256}))}, "
        f"this build {b.sha256}"
        for b in clashes
    )
    raise Refused(
        f"{version} was already published with other bytes ({details}); rebuilding a released version "
        "is refused: release a new version, or pass --force to replace it"
    )


def _pending_uploads(
    store: Store, version: str, local: list[LocalBinary]
) -> tuple[list[tuple[LocalBinary, str]], list[str]]:
    """(binaries to upload with their keys, keys already in the store)."""
    pending: list[tuple[LocalBinary, str]] = []
    present: list[str] = []
    for b in local:
        key = binary_key(version, b.sha256, b.platform)
        have = store.size(key)
        if have is None:
            pending.append((b, key))
        elif have == b.size:
            present.append(key)
        else:
            raise StoreError(
                f"{key} in {store.location} is {have} bytes, expected {b.size}: the store is damaged"
            )
    return pending, present


def _upload(
    store: Store, pending: list[tuple[LocalBinary, str]], progress: Progress
) -> tuple[list[str], list[str]]:
    uploaded: list[str] = []
    present: list[str] = []
    with progress("uploading", sum(b.size for b, _ in pending)) as advance:
        for b, key in pending:
            try:
                store.put_immutable(key, b.path, sha256=b.sha256, progress=advance)
            except AlreadyExists:  # a concurrent publish of the same bytes (same content address)
                present.append(key)
            else:
                uploaded.append(key)
    return uploaded, present


def publish_envelope(
    store: Store,
    manifest: Manifest,
    envelope: bytes,
    current: Current,
    *,
    helm: bytes | None = None,
    invalidate: Invalidate | None = None,
) -> list[str]:
    """Archive create-only, then helm values, then ``manifest.json`` last (compare-and-swap)."""
    archived = archive_key(manifest.serial)
    try:
        store.put_immutable(archived, envelope)
    except AlreadyExists:
        raise PublishError(
            f"serial {manifest.serial} was claimed by a concurrent publish ({archived} exists); "
            "nothing was published: re-run"
        ) from None
    written = [archived]
    if helm is not None:
        store.put_mutable(HELM_VALUES_KEY, helm)
        written.append(HELM_VALUES_KEY)
    try:
        store.put_mutable(MANIFEST_KEY, envelope, if_match=current.token)
    except Conflict:
        raise PublishError(
            f"{MANIFEST_KEY} changed while serial {manifest.serial} was being published (a concurrent "
            f"publish?); {archived} is archived but not live: re-run"
        ) from None
    written.append(MANIFEST_KEY)
    if invalidate is not None:
        invalidate([MANIFEST_KEY])
    return written


def _sign_for(
    manifest: Manifest, signers: Sequence[Signer], now: datetime, notes: list[str]
) -> tuple[Manifest, bytes | None]:
    if signers:
        return sign_checked(manifest, signers, now)
    notes.append("no signing key given: the manifest was not signed")
    return manifest, None


# ---------------------------------------------------------------- operations


def release(
    store: Store,
    signers: Sequence[Signer],
    spec: ReleaseSpec,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
    progress: Progress = no_progress,
    invalidate: Invalidate | None = None,
) -> Outcome:
    """Publish ``spec`` (DESIGN sections 1 and 2). A dry run may have no signers."""
    now = _now(now)
    if not signers and not dry_run:
        raise Refused("a release needs a signing key")
    version, min_version = _check_spec(spec)
    current = read_current(store)
    live = current.manifest
    if live is not None and parse_version(version) < live.parsed_version and not spec.downgrade:
        raise Refused(
            f"{version} is older than the current release {live.version}: agents ignore it unless it is "
            "signed as a downgrade; pass --downgrade to roll the fleet back"
        )
    local = hash_binaries(spec.binaries, progress)
    candidate = _build(spec, version, min_version, local, current, now)
    if _already_published(candidate, current, signers, now):
        assert live is not None
        return Outcome(
            "unchanged", live, store.location, current.envelope,
            notes=[f"{version} is already published as serial {live.serial}; nothing to do"],
        )  # fmt: skip
    if not spec.force:
        _refuse_new_bytes(store, version, local, current)
    pending, present = _pending_uploads(store, version, local)
    helm = helm_values(spec.image) if spec.image else None
    if dry_run:
        notes: list[str] = []
        manifest, envelope = _sign_for(
            replace(candidate, serial=next_serial(store, current)), signers, now, notes
        )
        written = [archive_key(manifest.serial), *([HELM_VALUES_KEY] if helm else []), MANIFEST_KEY]
        uploads = [key for _, key in pending]
        return Outcome("dry_run", manifest, store.location, envelope, uploads, present, written, notes)
    uploaded, raced = _upload(store, pending, progress)
    manifest, envelope = sign_checked(replace(candidate, serial=next_serial(store, current)), signers, now)
    written = publish_envelope(store, manifest, envelope, current, helm=helm, invalidate=invalidate)
    return Outcome("published", manifest, store.location, envelope, uploaded, present + raced, written)


def resign(
    store: Store,
    signers: Sequence[Signer],
    *,
    percent: int | None = None,
    expires_in: timedelta = DEFAULT_EXPIRES_IN,
    trusted: Sequence[PublicKey] = (),
    now: datetime | None = None,
    dry_run: bool = False,
    invalidate: Invalidate | None = None,
) -> Outcome:
    """Re-sign the live manifest: serial + 1, new expiry, and (``percent``) a new rollout percent."""
    now = _now(now)
    if not signers and not dry_run:
        raise Refused("re-signing needs a signing key")
    if expires_in <= timedelta(0):
        raise Refused("--expires-in must be positive")
    current = read_current(store)
    live = current.manifest
    if live is None or current.envelope is None:
        raise PublishError(f"no {MANIFEST_KEY} in {store.location}: nothing to re-sign (release first)")
    keys = _distinct_keys([*(s.public_key for s in signers), *trusted])
    if keys:
        try:
            verify_envelope(current.envelope, keys)
        except ManifestError as exc:
            raise VerificationFailed(
                exc.code,
                f"the live {MANIFEST_KEY} (serial {live.serial}) is not signed by a trusted key "
                f"({exc.code}); refusing to re-sign it. After a key rotation, trust the old key with "
                "--public-key",
            ) from None
    rollout = live.rollout if percent is None else Rollout(percent, live.rollout.salt)
    manifest = replace(
        live, serial=next_serial(store, current), expires=now + expires_in, rollout=rollout, raw=b""
    )
    _validate(manifest)
    if dry_run:
        notes: list[str] = []
        manifest, envelope = _sign_for(manifest, signers, now, notes)
        return Outcome(
            "dry_run",
            manifest,
            store.location,
            envelope,
            written=[archive_key(manifest.serial), MANIFEST_KEY],
            notes=notes,
        )
    manifest, envelope = sign_checked(manifest, signers, now)
    written = publish_envelope(store, manifest, envelope, current, invalidate=invalidate)
    return Outcome("published", manifest, store.location, envelope, written=written)


def show(reader: Reader) -> Manifest:
    """The live manifest, decoded WITHOUT checking its signature (display only)."""
    data = reader.read(MANIFEST_KEY)
    if data is None:
        raise PublishError(f"no {MANIFEST_KEY} at {reader.location}")
    try:
        return parse_manifest(read_envelope_unverified(data))
    except ManifestError as exc:
        raise VerificationFailed(exc.code, f"{MANIFEST_KEY} at {reader.location}: {exc.message}") from None


# ---------------------------------------------------------------- verify (an audit of what is served)


@dataclass
class BinaryCheck:
    platform: str
    url: str
    size: int
    sha256: str
    error: str | None = None
    message: str = ""

    def fail(self, code: str, message: str) -> BinaryCheck:
        self.error, self.message = code, f"{self.platform}: {message}"
        return self


@dataclass
class VerifyReport:
    location: str
    manifest: Manifest | None = None
    error: str | None = None
    message: str = ""
    binaries: list[BinaryCheck] = field(default_factory=list)

    @property
    def failures(self) -> list[tuple[str, str]]:
        out = [(self.error, self.message)] if self.error else []
        return out + [(b.error, b.message) for b in self.binaries if b.error]

    @property
    def exit_code(self) -> int:
        codes = [code for code, _ in self.failures]
        if any(code != "fetch_failed" for code in codes):
            return 3
        return 1 if codes else 0

    def to_json(self) -> dict[str, Any]:
        failures = self.failures
        return {
            "ok": not failures,
            "location": self.location,
            "error": failures[0][0] if failures else None,
            "message": failures[0][1] if failures else "",
            "serial": self.manifest.serial if self.manifest else None,
            "version": self.manifest.version if self.manifest else None,
            "expires": format_time(self.manifest.expires) if self.manifest else None,
            "binaries": {
                b.platform: {"url": b.url, "size": b.size, "sha256": b.sha256, "ok": b.error is None,
                             "error": b.error, "message": b.message}
                for b in self.binaries
            },
        }  # fmt: skip


def check_binary(reader: Reader, platform: str, binary: Binary, advance: Advance) -> BinaryCheck:
    """Stream the binary the manifest names; size-capped, hashed while reading."""
    check = BinaryCheck(platform, binary.url, binary.size, binary.sha256)
    digest, size = hashlib.sha256(), 0
    try:
        for chunk in reader.stream(binary.url):
            size += len(chunk)
            if size > binary.size:
                return check.fail(
                    "size_exceeded", f"{binary.url} is larger than the {binary.size} bytes declared"
                )
            digest.update(chunk)
            advance(len(chunk))
    except NotFound as exc:
        return check.fail("binary_missing", exc.message)
    except StoreError as exc:
        return check.fail("fetch_failed", exc.message)
    if size != binary.size:
        return check.fail("size_mismatch", f"{binary.url} is {size} bytes, the manifest says {binary.size}")
    if digest.hexdigest() != binary.sha256:
        return check.fail(
            "checksum_mismatch",
            f"{binary.url} has sha256 {digest.hexdigest()}, the manifest says {binary.sha256}",
        )
    return check


def verify(
    reader: Reader,
    trusted: Sequence[PublicKey],
    *,
    threshold: int = 1,
    now: datetime | None = None,
    progress: Progress = no_progress,
) -> VerifyReport:
    """Verify the envelope as an agent would (expiry included), then every binary's size and sha256."""
    now = now or datetime.now(UTC)
    data = reader.read(MANIFEST_KEY)
    if data is None:
        raise PublishError(f"no {MANIFEST_KEY} at {reader.location}")
    report = VerifyReport(reader.location)
    try:
        report.manifest = verify_manifest(data, trusted=trusted, threshold=threshold, now=now)
    except ManifestError as exc:
        report.error, report.message = exc.code, exc.message
        return report
    problems = audit_envelope(data, trusted)
    if problems:
        report.error, report.message = "noncanonical_envelope", "; ".join(problems)
    binaries = sorted(report.manifest.binaries.items())
    with progress("verifying", sum(b.size for _, b in binaries)) as advance:
        report.binaries = [check_binary(reader, platform, b, advance) for platform, b in binaries]
    return report
