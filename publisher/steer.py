"""The console's actions (DESIGN section 9): set the rollout percent, or halt, of the release the
operator saw, and nothing else.

``steer`` re-signs the live manifest (``publisher.release.resign``: serial + 1, new expiry, the
agent's own verifier before upload, ``manifest.json`` last as a compare-and-swap) only while the
live serial is still ``expect_serial``. The check is made on the very read that ``resign`` swaps
against (a guard around the store's ``manifest.json`` read), so a publish landing between the
operator's click and the write is refused (``SerialMoved``, HTTP 412), never overwritten or acted
upon. At that percent already, nothing is signed (``unchanged``), as with the CLI's ``rollout`` and
``halt``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.manifest import (
    Manifest,
    ManifestError,
    PublicKey,
    Signer,
    format_time,
    parse_manifest,
    read_envelope_unverified,
)
from agent.manifest import verify_envelope as verify_signatures
from publisher import release as publishing
from publisher.errors import PublishError, Refused, VerificationFailed
from publisher.stores import MANIFEST_KEY, Store, Versioned, archive_key


class SerialMoved(PublishError):
    """The live serial is not the one the operator saw: nothing was signed (HTTP 412)."""

    code = "precondition_failed"

    def __init__(self, expected: int, live: Manifest | None) -> None:
        now = "no live manifest" if live is None else f"serial {live.serial} ({live.version})"
        super().__init__(
            f"the live release moved: you saw serial {expected}, it is now {now}; "
            "nothing was signed. Look again, then retry"
        )
        self.expected = expected
        self.live = live


@dataclass(frozen=True)
class Steered:
    """What an action did: ``published`` (a new serial) or ``unchanged`` (already at that percent)."""

    status: str
    version: str
    percent: int
    serial_before: int
    serial_after: int

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": self.serial_after,
            "version": self.version,
            "percent": self.percent,
            "status": self.status,
            "previous_serial": self.serial_before,
        }


class _SerialGuard:
    """A store whose ``manifest.json`` read refuses anything but the expected serial."""

    def __init__(self, store: Store, expected: int) -> None:
        self._store = store
        self._expected = expected

    def read_versioned(self, key: str) -> Versioned:
        versioned = self._store.read_versioned(key)
        if key == MANIFEST_KEY:
            live = _decode(versioned.data)
            if live is None or live.serial != self._expected:
                raise SerialMoved(self._expected, live)
        return versioned

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _decode(data: bytes | None) -> Manifest | None:
    if data is None:
        return None
    try:
        return parse_manifest(read_envelope_unverified(data))
    except ManifestError:
        return None


def live_release(store: Store, trusted: Sequence[PublicKey] = ()) -> tuple[Manifest | None, bool | None]:
    """The live manifest (decoded) and whether a trusted key signed it (None: no key to check with)."""
    data = store.read(MANIFEST_KEY)
    if data is None:
        return None, None
    try:
        manifest = parse_manifest(read_envelope_unverified(data))
    except ManifestError as exc:
        raise PublishError(
            f"{MANIFEST_KEY} in {store.location} is unreadable ({exc.code}: {exc.message})"
        ) from None
    if not trusted:
        return manifest, None
    try:
        verify_signatures(data, list(trusted))
    except ManifestError:
        return manifest, False
    return manifest, True


def steer(
    store: Store,
    signers: Sequence[Signer],
    *,
    percent: int,
    expect_serial: int,
    trusted: Sequence[PublicKey] = (),
    expires_in: Any = publishing.DEFAULT_EXPIRES_IN,
    invalidate: publishing.Invalidate | None = None,
    now: datetime | None = None,
) -> Steered:
    """Re-sign the live release at ``percent`` if its serial is still ``expect_serial`` (docstring)."""
    if not 0 <= percent <= 100:
        raise Refused(f"percent must be 0-100, not {percent}")
    live = _decode(store.read_versioned(MANIFEST_KEY).data)
    if live is None or live.serial != expect_serial:
        raise SerialMoved(expect_serial, live)
    if live.rollout.percent == percent:
        return Steered("unchanged", live.version, percent, live.serial, live.serial)
    try:
        outcome = publishing.resign(
            _SerialGuard(store, expect_serial),  # type: ignore[arg-type]  # a Store by delegation
            signers,
            percent=percent,
            expires_in=expires_in,
            trusted=trusted,
            invalidate=invalidate,
            now=now,
        )
    except (Refused, VerificationFailed, SerialMoved):
        raise
    except PublishError:
        # Lost a race to another publish (it claimed the next serial, or swapped manifest.json
        # under us): the release the operator saw is being replaced, which is a 412, not a retry.
        if max(publishing.archived_serials(store), default=0) > expect_serial:
            raise SerialMoved(expect_serial, _decode(store.read_versioned(MANIFEST_KEY).data)) from None
        raise
    return Steered("published", outcome.manifest.version, percent, live.serial, outcome.manifest.serial)


def _history_row(
    key: str, data: bytes, trusted: Sequence[PublicKey], live_data: bytes | None
) -> dict[str, Any]:
    claimed = _decode(data)
    error = message = None
    verified_by: list[str] = []
    for public in trusted:
        try:
            verify_signatures(data, [public])
            verified_by.append(public.keyid)
        except ManifestError as exc:
            error, message = exc.code, exc.message
    try:
        hints = [str(s.get("keyid", "")) for s in json.loads(data).get("signatures", [])]
    except (ValueError, AttributeError, TypeError):
        hints = []
    verified = bool(verified_by) and claimed is not None
    return {
        "key": key,
        "serial": None if claimed is None else claimed.serial,
        "version": None if claimed is None else claimed.version,
        "rollout": None if claimed is None else claimed.rollout.percent,
        "expires": None if claimed is None else format_time(claimed.expires),
        "released_at": None if claimed is None else format_time(claimed.released_at),
        "signed_at": None if claimed is None or claimed.signed_at is None else format_time(claimed.signed_at),
        "downgrade": None if claimed is None else claimed.downgrade,
        "key_ids": hints,
        "verified": verified,
        "verified_by": verified_by,
        "error": None if verified else (error or "malformed_manifest"),
        "message": None if verified else message,
        "live": data == live_data,
    }


def release_history(store: Store, trusted: Sequence[PublicKey]) -> list[dict[str, Any]]:
    """Every archived serial, newest first, and whether it verifies with ``trusted`` (``history --json``)."""
    live_data = store.read(MANIFEST_KEY)
    rows = []
    for serial in publishing.archived_serials(store):
        data = store.read(archive_key(serial))
        if data is not None:
            rows.append(_history_row(archive_key(serial), data, trusted, live_data))
    return rows
