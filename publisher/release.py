"""Publishing a release: the work behind ``release``, ``show`` and ``verify`` (re-signs: ``resign.py``).

A release, in the order of DESIGN section 1 (so an interrupted run never leaves agents a manifest
that points at something missing):

1. refuse bad input before any I/O: a version or ``min_version`` that is no version, ``min_version``
   above the version, a platform other than ``PLATFORMS``, a ``--reports-url`` that is not https
   (plain http only to loopback), ``--image-digest`` without ``--image``;
2. read the store as ``publisher.archive`` does (only what verifies counts) and refuse what would
   hurt the fleet: a store that does not exist yet without ``--init`` (a typo in ``--store`` must not
   start a new, empty fleet), an older version without ``--downgrade``, dropping a platform the
   newest verified release has without ``--drop-platform``, new bytes for a published version
   without ``--force``, no ``--reports-url`` when nothing verifies to take it from (it is kept from
   the newest verified envelope, never from one that does not verify);
3. hash and size every binary in one streaming pass; an identical re-run (a CI retry) is a no-op;
4. upload binaries to content-addressed keys (ones already there are re-hashed, not uploaded again);
5. build the manifest at the next free serial above the highest verified one, sign it and re-verify
   the envelope through the agent's own verifier (``agent.manifest.verify_manifest``);
6. archive ``manifests/<serial>.json`` create-only: two concurrent publishes never share a serial;
7. ``helm-values.yaml`` (with ``--image``), then ``manifest.json`` last, as a compare-and-swap
   against what step 2 read, so the live pointer never moves back to a lower serial.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from packaging.version import InvalidVersion

from agent.manifest import (
    Binary,
    Manifest,
    ManifestError,
    PublicKey,
    Rollout,
    RolloutPlan,
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
from publisher.archive import StoreView, read_store
from publisher.errors import PublishError, Refused, VerificationFailed
from publisher.stores import (
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
    binary_key,
)

DEFAULT_EXPIRES_IN = timedelta(days=30)
PLATFORMS = ("linux-amd64", "linux-arm64")
"""What a release may carry: the platforms an agent can be (``agent.environment``)."""
_IMAGE_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")  # the manifest's container_digest rule, checked early

Advance = Callable[[int], None]
Progress = Callable[[str, int], AbstractContextManager[Advance]]
"""``progress(label, total_bytes)`` gives a context whose value is called with each chunk's size."""


def no_progress(label: str, total: int) -> AbstractContextManager[Advance]:
    return nullcontext(lambda n: None)


Invalidate = Callable[[list[str]], None]
"""Called with the keys to purge from the CDN after a publish (only ``manifest.json``)."""


# ---------------------------------------------------------------- inputs and results


class LostRace(PublishError):
    """Another publish claimed the serial or replaced ``manifest.json`` first: nothing of ours is
    live (exit 1; ``progress`` reads the store again instead)."""

    code = "lost_race"


@dataclass(frozen=True)
class ReleaseSpec:
    """What ``avika-publish release`` was asked to publish."""

    version: str
    binaries: Mapping[str, Path]
    image: str | None = None
    image_digest: str | None = None
    min_version: str | None = None
    changelog: str = ""
    rollout_percent: int = 100
    rollout_salt: str | None = None  # None: the version
    expires_in: timedelta = DEFAULT_EXPIRES_IN
    downgrade: bool = False
    reports_url: str | None = None  # None: keep the live release's; "": none
    force: bool = False
    drop_platforms: frozenset[str] = frozenset()
    init: bool = False  # the store may be new (nothing published there yet)
    rollout_plan: RolloutPlan | None = None  # ``--plan``: signed as is (``publisher.plan`` checks it)


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
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status,
            "store": self.location,
            "version": self.manifest.version,
            "serial": self.manifest.serial,
            "percent": self.manifest.rollout.percent,
            "uploaded": self.uploaded,
            "present": self.present,
            "written": self.written,
            "notes": self.notes,
            "warnings": self.warnings,
            "manifest": self.manifest.to_dict(),
        }
        if self.status == "dry_run":
            out["envelope"] = json.loads(self.envelope) if self.envelope else None
        return out


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


def check_files(binaries: Mapping[str, Path]) -> int:
    """Every ``--binary`` is a regular, non-empty file: their total size."""
    total = 0
    for platform, path in binaries.items():
        try:
            st = os.stat(path)
        except OSError as exc:
            raise Refused(f"--binary {platform}={path}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            raise Refused(f"--binary {platform}={path}: not a regular, non-empty file")
        total += st.st_size
    return total


def hash_binaries(binaries: Mapping[str, Path], progress: Progress = no_progress) -> list[LocalBinary]:
    total = check_files(binaries)
    with progress("hashing", total) as advance:
        return [
            LocalBinary(platform, Path(path), *hash_file(Path(path), advance))
            for platform, path in sorted(binaries.items())
        ]


def distinct_keys(keys: Iterable[PublicKey]) -> list[PublicKey]:
    return list(dict.fromkeys(keys))


def trusted_keys(signers: Sequence[Signer], trusted: Sequence[PublicKey] = ()) -> list[PublicKey]:
    """The keys whose envelopes the publisher believes: its signers' own and the ones given."""
    return distinct_keys([*(s.public_key for s in signers), *trusted])


def validate(manifest: Manifest) -> None:
    """Hold what we are about to sign to the one schema (platform names, ranges, versions)."""
    try:
        parse_manifest(manifest.to_payload())
    except ManifestError as exc:
        raise Refused(f"invalid manifest: {exc.message}") from None


def sign_checked(manifest: Manifest, signers: Sequence[Signer], now: datetime) -> tuple[Manifest, bytes]:
    """Sign, then verify the envelope as an agent would, trusting exactly the signers' keys.

    With no manifest URL the agent's verifier passes only relative binary URLs: the publisher never
    signs a manifest that sends agents to another host (DESIGN section 2, ``bad_url``).
    """
    payload = manifest.to_payload()
    envelope = sign_envelope(payload, signers)
    keys = distinct_keys(s.public_key for s in signers)
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


def helm_values(image: str, digest: str | None = None) -> bytes:
    """``image.repository`` / ``image.tag`` (/ ``image.digest``) for ``helm upgrade -f``."""
    repository, tag, in_ref = split_image(image)
    digest = digest or in_ref
    lines = ["# Written by avika-publish; the agent image for Kubernetes.", "image:"]
    lines.append(f"  repository: {json.dumps(repository)}")  # JSON strings are YAML strings
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


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_reports_url(url: str) -> None:
    """Agents send their report token there: absolute https, or plain http to loopback only
    (127.0.0.0/8, ::1, ``localhost``: DESIGN section 5). "" means no reports."""
    if url == "":
        return
    why = "must be an absolute https URL (plain http only to 127.0.0.0/8, ::1 or localhost)"
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise Refused(f"--reports-url {url!r} has spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise Refused(f"--reports-url {url!r} does not parse ({exc}); it {why}") from None
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    if parts.username is not None or parts.password is not None or parts.fragment:
        raise Refused(f"--reports-url {url!r} carries credentials or a fragment; it {why}")
    if not host or not (scheme == "https" or (scheme == "http" and _loopback(host))):
        raise Refused(f"--reports-url {url!r} {why}")


def _check_spec(spec: ReleaseSpec) -> tuple[str, str | None]:
    """The pure refusals, before any I/O: (version, min_version), both normalised."""
    version = _version(spec.version, "version")
    min_version = _version(spec.min_version, "--min-version") if spec.min_version else None
    if min_version is not None and parse_version(min_version) > parse_version(version):
        raise Refused(f"--min-version {min_version} is above the release's own version {version}")
    if spec.expires_in <= timedelta(0):
        raise Refused("--expires-in must be positive")
    unknown = sorted(set(spec.binaries) - set(PLATFORMS))
    if unknown:
        raise Refused(
            f"--binary {unknown[0]}=...: {unknown[0]!r} is not a platform agents run on "
            f"(one of: {', '.join(PLATFORMS)})"
        )
    both = sorted(set(spec.binaries) & spec.drop_platforms)
    if both:
        raise Refused(f"--drop-platform {both[0]} and --binary {both[0]}=... contradict each other")
    if spec.reports_url is not None:
        check_reports_url(spec.reports_url)
    plan = spec.rollout_plan
    if plan is not None and spec.rollout_percent != plan.steps[0]:
        raise Refused(
            f"--rollout {spec.rollout_percent} disagrees with --plan {','.join(map(str, plan.steps))}: "
            f"the plan's first step is the starting percent ({plan.steps[0]})"
        )
    if spec.image_digest is not None:
        if not spec.image:
            raise Refused("--image-digest needs --image (the digest pins that image)")
        if not _IMAGE_DIGEST_RE.fullmatch(spec.image_digest):
            raise Refused(f"--image-digest {spec.image_digest!r} is not sha256:<64 lowercase hex digits>")
    return version, min_version


def _check_store(spec: ReleaseSpec, version: str, view: StoreView) -> tuple[str | None, list[str]]:
    """The refusals that need the store's verified content: (reports_url to sign, notes)."""
    if not view.exists and not spec.init:
        raise Refused(
            f"{view.location} holds no release yet: pass --init to start a new store there (a mistyped "
            "--store, or one that came out as 'None', must not start a new, empty fleet)"
        )
    notes: list[str] = []
    head = view.head.manifest if view.head is not None else None
    if head is not None and parse_version(version) < head.parsed_version and not spec.downgrade:
        raise Refused(
            f"{version} is older than the current release {head.version}: agents ignore it unless it is "
            "signed as a downgrade; pass --downgrade to roll the fleet back"
        )
    if head is not None:
        dropped = sorted(set(head.binaries) - set(spec.binaries) - spec.drop_platforms)
        if dropped:
            raise Refused(
                f"the current release {head.version} (serial {head.serial}) has {', '.join(dropped)}, which "
                f"this release lacks: agents there would be left behind; give --binary {dropped[0]}=PATH, "
                f"or --drop-platform {dropped[0]} to stop shipping it"
            )
        gone = sorted(spec.drop_platforms - set(head.binaries))
        if gone:
            notes.append(f"--drop-platform {', '.join(gone)}: the current release has no such binary")
    if spec.reports_url is not None:
        return spec.reports_url or None, notes
    if view.head is not None and head is not None:
        if view.head.key != MANIFEST_KEY:
            notes.append(f"reports_url taken from {view.head.key}, the newest envelope that verifies")
        return head.reports_url, notes
    if not view.exists:
        return None, notes  # a new store: nothing to inherit, nothing lost
    raise Refused(
        f"nothing in {view.location} verifies with the trusted keys, so there is no reports_url to keep "
        f"({view.no_live_release()}): pass --reports-url URL (or --reports-url '' for none), and "
        "--trusted-key if the store was signed with another key"
    )


def _build(
    spec: ReleaseSpec,
    version: str,
    min_version: str | None,
    reports_url: str | None,
    local: list[LocalBinary],
    now: datetime,
) -> Manifest:
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
        container_digest=spec.image_digest,
        min_version=min_version,
        changelog=spec.changelog,
        rollout=Rollout(spec.rollout_percent, version if spec.rollout_salt is None else spec.rollout_salt),
        downgrade=spec.downgrade,
        reports_url=reports_url,
        signed_at=now,
        rollout_plan=spec.rollout_plan,
    )
    validate(manifest)
    return manifest


def _substance(manifest: Manifest) -> dict[str, Any]:
    """What a release says, without what every signing changes (serial, times)."""
    d = manifest.to_dict()
    for name in ("serial", "released_at", "expires", "signed_at"):
        d.pop(name)
    return d


def _already_published(
    candidate: Manifest, view: StoreView, signers: Sequence[Signer], now: datetime
) -> bool:
    """A CI retry: the live release says exactly this, is not expired and is signed by these keys."""
    live = view.live_release
    if live is None or view.live is None or _substance(live) != _substance(candidate) or live.expires <= now:
        return False
    keys = distinct_keys(s.public_key for s in signers)
    if keys:
        try:
            verify_envelope(view.live.data, keys, threshold=len(keys))
        except ManifestError:
            return False
    return True


def _refuse_new_bytes(view: StoreView, version: str, local: list[LocalBinary]) -> None:
    """New bytes for a version+platform that a verified manifest published are refused
    (``--force`` skips this check); the newest verified manifest of the version is the truth."""
    published = view.verified_of(version)
    known: dict[str, set[str]] = {}
    for manifest in published:
        for platform, binary in manifest.binaries.items():
            known.setdefault(platform, set()).add(binary.sha256)
    clashes = [b for b in local if known.get(b.platform, set()) - {b.sha256}]
    if not clashes:
        return
    latest = published[0]
    if all(b.platform in latest.binaries and latest.binaries[b.platform].sha256 == b.sha256 for b in clashes):
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


def stored_binary_problem(
    store: Reader, key: str, sha256: str, size: int, advance: Advance | None = None
) -> str | None:
    """Does ``key`` in the store hold exactly these bytes? None, or what is wrong (re-hashed)."""
    digest, total = hashlib.sha256(), 0
    try:
        for chunk in store.stream(key):
            total += len(chunk)
            if total > size:
                return f"{key} is larger than {size} bytes"
            digest.update(chunk)
            if advance:
                advance(len(chunk))
    except NotFound:
        return f"{key} is missing"
    if total != size or digest.hexdigest() != sha256:
        return f"{key} is {total} bytes with sha256 {digest.hexdigest()}, expected {size} bytes, {sha256}"
    return None


def _pending_uploads(
    store: Store, version: str, local: list[LocalBinary]
) -> tuple[list[tuple[LocalBinary, str]], list[str]]:
    """(binaries to upload with their keys, keys already in the store with exactly these bytes)."""
    pending: list[tuple[LocalBinary, str]] = []
    present: list[str] = []
    for b in local:
        key = binary_key(version, b.sha256, b.platform)
        if store.size(key) is None:
            pending.append((b, key))
            continue
        # Anyone who can write to the store can replace an "immutable" object: re-hash what we reuse.
        problem = stored_binary_problem(store, key, b.sha256, b.size)
        if problem is not None:
            raise StoreError(
                f"{problem} in {store.location}: the store was changed behind the publisher's back; "
                "nothing was published (move that object away and re-run)"
            )
        present.append(key)
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
    live_token: str | None,
    *,
    helm: bytes | None = None,
    invalidate: Invalidate | None = None,
) -> list[str]:
    """Archive create-only, then helm values, then ``manifest.json`` last (compare-and-swap
    against ``live_token``, the token ``manifest.json`` had when the publish read the store)."""
    archived = archive_key(manifest.serial)
    try:
        store.put_immutable(archived, envelope)
    except AlreadyExists:
        raise LostRace(
            f"serial {manifest.serial} was claimed by a concurrent publish ({archived} exists); "
            "nothing was published: re-run"
        ) from None
    written = [archived]
    if helm is not None:
        store.put_mutable(HELM_VALUES_KEY, helm)
        written.append(HELM_VALUES_KEY)
    try:
        store.put_mutable(MANIFEST_KEY, envelope, if_match=live_token)
    except Conflict:
        raise LostRace(
            f"{MANIFEST_KEY} changed while serial {manifest.serial} was being published (a concurrent "
            f"publish?); {archived} is archived but not live: re-run"
        ) from None
    written.append(MANIFEST_KEY)
    if invalidate is not None:
        invalidate([MANIFEST_KEY])
    return written


def sign_for(
    manifest: Manifest, signers: Sequence[Signer], now: datetime, notes: list[str]
) -> tuple[Manifest, bytes | None]:
    """Sign for a dry run: without signers the manifest is shown unsigned."""
    if signers:
        return sign_checked(manifest, signers, now)
    notes.append("no signing key given: the manifest was not signed")
    return manifest, None


# ---------------------------------------------------------------- release


def release(
    store: Store,
    signers: Sequence[Signer],
    spec: ReleaseSpec,
    *,
    trusted: Sequence[PublicKey] = (),
    now: datetime | None = None,
    dry_run: bool = False,
    progress: Progress = no_progress,
    invalidate: Invalidate | None = None,
) -> Outcome:
    """Publish ``spec`` (DESIGN sections 1 and 2; steps in the module docstring).

    ``trusted``: keys besides the signers' whose envelopes in the store are believed (a rotation).
    A dry run may have no signers (then only ``trusted`` keys are believed).
    """
    now = _now(now)
    if not signers and not dry_run:
        raise Refused("a release needs a signing key")
    version, min_version = _check_spec(spec)
    check_files(spec.binaries)  # local mistakes first, before the store is read
    view = read_store(store, trusted_keys(signers, trusted))
    warnings = view.warnings()
    reports_url, notes = _check_store(spec, version, view)
    local = hash_binaries(spec.binaries, progress)
    candidate = _build(spec, version, min_version, reports_url, local, now)
    if _already_published(candidate, view, signers, now):
        live = view.live_release
        assert live is not None
        note = f"{version} is already published as serial {live.serial} in {store.location}; nothing to do"
        envelope = view.live.data if view.live else None
        return Outcome("unchanged", live, store.location, envelope, notes=[note], warnings=warnings)
    if not spec.force:
        _refuse_new_bytes(view, version, local)
    pending, present = _pending_uploads(store, version, local)
    helm = helm_values(spec.image, spec.image_digest) if spec.image else None
    serial = view.next_serial()
    if dry_run:
        manifest, envelope = sign_for(replace(candidate, serial=serial), signers, now, notes)
        written = [archive_key(serial), *([HELM_VALUES_KEY] if helm else []), MANIFEST_KEY]
        uploads = [key for _, key in pending]
        return Outcome(
            "dry_run", manifest, store.location, envelope, uploads, present, written, notes, warnings
        )
    uploaded, raced = _upload(store, pending, progress)
    manifest, envelope = sign_checked(replace(candidate, serial=serial), signers, now)
    written = publish_envelope(store, manifest, envelope, view.live_token, helm=helm, invalidate=invalidate)
    return Outcome(
        "published", manifest, store.location, envelope, uploaded, present + raced, written, notes, warnings
    )


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
