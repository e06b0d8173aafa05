"""Re-signing what is published: ``rollout``, ``halt``, ``refresh`` and ``rollback-to`` (DESIGN section 6).

Library functions with the store and the signers passed in, so the CLI, the operator API and
``progress`` take one path. Both read the store through ``publisher.archive``: only envelopes
that verify with the trusted keys count, so whoever can write to the store cannot choose what is
signed.

- ``resign`` re-signs the live release (``manifest.json``, verified, with nothing newer verified)
  at the next serial with a new ``expires`` and ``signed_at``; every other field is kept
  (``container_digest``, ``rollout_plan``, the salt ...), and ``percent`` changes only the rollout.
  At that percent already, nothing is signed (``unchanged``): ``halt`` and ``rollout N`` are
  idempotent, so a retried call never bumps the serial. ``expect_serial`` is the serial the caller
  looked at (the operator API's ``If-Match``): if the live serial moved, ``SerialMoved``.
- ``rollback_to`` signs an older VERSION again as a deliberate downgrade (``downgrade: true``,
  serial + 1), from the newest verified archived envelope of that version, after re-hashing its
  binaries in the store (missing or different bytes: refused). ``reports_url`` is the live
  release's (the endpoint may have moved since); the rollout plan is dropped (a rollback is not
  a staged release); ``helm-values.yaml`` follows when the version has an image.

The pure parts (``resigned``, ``rollback_source``, ``rolled_back``) take a ``StoreView`` or
manifests and return manifests; the rest is I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from packaging.version import InvalidVersion

from agent.manifest import Manifest, PublicKey, Rollout, Signer, format_time, normalize_version, parse_version
from publisher.archive import StoreView, read_store
from publisher.errors import PublishError, Refused, VerificationFailed
from publisher.release import (
    DEFAULT_EXPIRES_IN,
    MANIFEST_KEY,
    Invalidate,
    Outcome,
    Progress,
    _now,
    check_reports_url,
    helm_values,
    no_progress,
    publish_envelope,
    sign_checked,
    sign_for,
    stored_binary_problem,
    trusted_keys,
    validate,
)
from publisher.stores import HELM_VALUES_KEY, Store, archive_key


class NoLiveRelease(PublishError):
    """The store has no live release the publisher can believe (see ``StoreView.live_release``)."""

    code = "no_live_release"


class SerialMoved(PublishError):
    """The live serial is not the one the caller saw (the operator API answers 412)."""

    code = "serial_moved"

    def __init__(self, message: str, live_serial: int) -> None:
        super().__init__(message)
        self.live_serial = live_serial


# ---------------------------------------------------------------- pure


def require_live(view: StoreView) -> Manifest:
    """The live release, or the error that says why there is none."""
    live = view.live_release
    if live is not None:
        return live
    if view.live is None and not view.archive:
        raise NoLiveRelease(f"no {MANIFEST_KEY} in {view.location}: nothing to re-sign (release first)")
    if view.live is not None and not view.live.verified:
        raise VerificationFailed(
            view.live.error or "signature_invalid",
            f"the live {MANIFEST_KEY} in {view.location} does not verify with the trusted keys "
            f"({view.live.error}: {view.live.message}); refusing to re-sign it. After a key rotation, "
            "trust the old key with --trusted-key",
        )
    raise NoLiveRelease(
        f"{view.no_live_release()}. Nothing was signed: re-run the release that should be live, or "
        "use release / rollback-to for the version the fleet should run"
    )


def resigned(
    live: Manifest, *, serial: int, now: datetime, expires_in: timedelta, percent: int | None = None
) -> Manifest:
    """The live release at a new serial, expiry and ``signed_at``; every other field kept."""
    rollout = live.rollout if percent is None else Rollout(percent, live.rollout.salt)
    manifest = replace(live, serial=serial, expires=now + expires_in, signed_at=now, rollout=rollout, raw=b"")
    validate(manifest)
    return manifest


def rollback_source(view: StoreView, version: str) -> Manifest:
    """The newest verified archived manifest of an older ``version`` (normalised)."""
    head = view.head
    if head is None or head.manifest is None:
        raise NoLiveRelease(
            f"nothing in {view.location} verifies with the trusted keys: no current release to roll back"
        )
    current = head.manifest
    if parse_version(version) >= current.parsed_version:
        raise Refused(
            f"{version} is not older than the current release {current.version} (serial {current.serial}): "
            "rollback-to goes back to an older version; use rollout or release to go forward"
        )
    candidates = view.verified_of(version)
    if not candidates:
        raise Refused(
            f"no archived manifest of {version} in {view.location} verifies with the trusted keys; "
            "'avika-publish history' lists the archived serials"
        )
    return candidates[0]


def rolled_back(
    source: Manifest,
    *,
    serial: int,
    now: datetime,
    expires_in: timedelta,
    percent: int,
    reports_url: str | None,
) -> Manifest:
    """``source`` signed again as a deliberate downgrade, released now."""
    manifest = replace(
        source,
        serial=serial,
        released_at=now,
        expires=now + expires_in,
        signed_at=now,
        rollout=Rollout(percent, source.rollout.salt),
        downgrade=True,
        reports_url=reports_url,
        rollout_plan=None,
        raw=b"",
    )
    validate(manifest)
    return manifest


def _check_expected(live: Manifest, expect_serial: int | None) -> None:
    if expect_serial is not None and live.serial != expect_serial:
        raise SerialMoved(
            f"the live serial is {live.serial} ({live.version}, rollout {live.rollout.percent}%), not "
            f"{expect_serial}: someone published since; look again before acting",
            live.serial,
        )


# ---------------------------------------------------------------- I/O


def read_live(
    store: Store, signers: Sequence[Signer], trusted: Sequence[PublicKey] = ()
) -> tuple[StoreView, Manifest]:
    """The store as the publisher believes it, and its live release (errors as ``resign``'s)."""
    view = read_store(store, trusted_keys(signers, trusted))
    return view, require_live(view)


def resign(
    store: Store,
    signers: Sequence[Signer],
    *,
    percent: int | None = None,
    expires_in: timedelta = DEFAULT_EXPIRES_IN,
    trusted: Sequence[PublicKey] = (),
    expect_serial: int | None = None,
    now: datetime | None = None,
    dry_run: bool = False,
    invalidate: Invalidate | None = None,
) -> Outcome:
    """Re-sign the live release: serial + 1, new expiry, and (``percent``) a new rollout percent."""
    now = _now(now)
    if not signers and not dry_run:
        raise Refused("re-signing needs a signing key")
    if expires_in <= timedelta(0):
        raise Refused("--expires-in must be positive")
    view, live = read_live(store, signers, trusted)
    warnings = view.warnings()
    _check_expected(live, expect_serial)
    if percent is not None and live.rollout.percent == percent:
        expired = f"; it expired at {format_time(live.expires)}: use refresh" if live.expires <= now else ""
        note = (
            f"{live.version} is already at rollout {percent}% (serial {live.serial}) in {store.location}; "
            f"nothing signed{expired}"
        )
        envelope = view.live.data if view.live is not None else None
        return Outcome("unchanged", live, store.location, envelope, notes=[note], warnings=warnings)
    manifest = resigned(live, serial=view.next_serial(), now=now, expires_in=expires_in, percent=percent)
    if dry_run:
        notes: list[str] = []
        manifest, envelope = sign_for(manifest, signers, now, notes)
        written = [archive_key(manifest.serial), MANIFEST_KEY]
        return Outcome(
            "dry_run", manifest, store.location, envelope, written=written, notes=notes, warnings=warnings
        )
    manifest, envelope = sign_checked(manifest, signers, now)
    written = publish_envelope(store, manifest, envelope, view.live_token, invalidate=invalidate)
    return Outcome("published", manifest, store.location, envelope, written=written, warnings=warnings)


def rollback_to(
    store: Store,
    signers: Sequence[Signer],
    version: str,
    *,
    percent: int = 100,
    expires_in: timedelta = DEFAULT_EXPIRES_IN,
    trusted: Sequence[PublicKey] = (),
    reports_url: str | None = None,
    expect_serial: int | None = None,
    now: datetime | None = None,
    dry_run: bool = False,
    progress: Progress = no_progress,
    invalidate: Invalidate | None = None,
) -> Outcome:
    """Roll the fleet back to an older, archived VERSION (module docstring)."""
    now = _now(now)
    if not signers and not dry_run:
        raise Refused("rollback-to needs a signing key")
    if expires_in <= timedelta(0):
        raise Refused("--expires-in must be positive")
    if not 0 <= percent <= 100:
        raise Refused(f"--rollout {percent} is not a percent 0..100")
    try:
        version = normalize_version(version)
    except InvalidVersion:
        raise Refused(f"{version!r} is not a version (PEP 440, e.g. 0.1.43)") from None
    if reports_url is not None:
        check_reports_url(reports_url)
    view = read_store(store, trusted_keys(signers, trusted))
    warnings = view.warnings()
    live = view.live_release
    if expect_serial is not None:
        _check_expected(require_live(view), expect_serial)
    if live is not None and live.version == version and live.downgrade and live.rollout.percent == percent:
        note = f"already rolled back to {version} at {percent}% (serial {live.serial}); nothing signed"
        envelope = view.live.data if view.live is not None else None
        return Outcome("unchanged", live, store.location, envelope, notes=[note], warnings=warnings)
    source = rollback_source(view, version)
    if reports_url is None:
        if live is None:
            raise Refused(
                f"no live release to take reports_url from: {view.no_live_release()}. Pass --reports-url URL "
                "(or --reports-url '' for none)"
            )
        reports_url = live.reports_url
    _rehash(store, source, progress)
    manifest = rolled_back(
        source,
        serial=view.next_serial(),
        now=now,
        expires_in=expires_in,
        percent=percent,
        reports_url=reports_url or None,
    )
    helm = helm_values(source.container_image, source.container_digest) if source.container_image else None
    if dry_run:
        notes = [f"from serial {source.serial}"]
        manifest, envelope = sign_for(manifest, signers, now, notes)
        written = [archive_key(manifest.serial), *([HELM_VALUES_KEY] if helm else []), MANIFEST_KEY]
        return Outcome(
            "dry_run", manifest, store.location, envelope, written=written, notes=notes, warnings=warnings
        )
    manifest, envelope = sign_checked(manifest, signers, now)
    written = publish_envelope(store, manifest, envelope, view.live_token, helm=helm, invalidate=invalidate)
    notes = [f"rolled back to {version} from archived serial {source.serial} (binaries re-hashed)"]
    return Outcome(
        "published", manifest, store.location, envelope, written=written, notes=notes, warnings=warnings
    )


def _rehash(store: Store, source: Manifest, progress: Progress) -> None:
    """Every binary ``source`` names is in the store with exactly its bytes, else refused."""
    binaries = sorted(source.binaries.items())
    problems = []
    with progress("re-hashing", sum(b.size for _, b in binaries)) as advance:
        for platform, b in binaries:
            problem = stored_binary_problem(store, b.url, b.sha256, b.size, advance)
            if problem is not None:
                problems.append(f"{platform}: {problem}")
    if problems:
        raise Refused(
            f"cannot roll back to {source.version}: the binaries archived serial {source.serial} names are "
            f"not in {store.location} as published ({'; '.join(problems)}); nothing was signed"
        )
