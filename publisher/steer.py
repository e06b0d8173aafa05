"""The console's actions and its view of the release store (DESIGN section 9).

- ``steer`` sets the rollout percent (``halt`` = 0) of the release the operator saw: it is
  ``publisher.resign.resign`` with ``expect_serial`` (the ``If-Match`` serial), which checks the
  serial on the very read its compare-and-swap of ``manifest.json`` is made against, signs only a
  live release that verifies, and signs nothing at that percent already (``unchanged``). A
  concurrent publish that wins the race (it claimed the next serial, swapped ``manifest.json``
  first, or has archived its serial and not yet swapped) is reported as ``SerialMoved`` too: the
  store moved past what the operator saw, an HTTP 412, not a retry.
- ``live_release`` is what every poll shows: ``manifest.json`` (one read), decoded, and whether a
  trusted key signed it; ``history`` (every archived serial, ``publisher.archive``) reads the whole
  archive and is cached by the API.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.manifest import (
    Manifest,
    ManifestError,
    PublicKey,
    Signer,
    parse_manifest,
    read_envelope_unverified,
    verify_envelope,
)
from publisher import resign as resigning
from publisher.archive import read_store
from publisher.errors import PublishError, Refused, VerificationFailed
from publisher.release import DEFAULT_EXPIRES_IN, Invalidate, trusted_keys
from publisher.stores import MANIFEST_KEY, Store

SerialMoved = resigning.SerialMoved


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
    manifest = _decode(data)
    if manifest is None:
        raise PublishError(f"{MANIFEST_KEY} in {store.location} is unreadable (not a manifest envelope)")
    if not trusted:
        return manifest, None
    try:
        verify_envelope(data, list(trusted))
    except ManifestError:
        return manifest, False
    return manifest, True


def history(store: Store, trusted: Sequence[PublicKey]) -> list[dict[str, Any]]:
    """Every archived serial, newest first, and whether it verifies (``history --json``)."""
    return read_store(store, trusted).history()


def steer(
    store: Store,
    signers: Sequence[Signer],
    *,
    percent: int,
    expect_serial: int,
    trusted: Sequence[PublicKey] = (),
    expires_in: Any = DEFAULT_EXPIRES_IN,
    invalidate: Invalidate | None = None,
    now: datetime | None = None,
) -> Steered:
    """Re-sign the live release at ``percent`` if its serial is still ``expect_serial`` (docstring)."""
    if not 0 <= percent <= 100:
        raise Refused(f"percent must be 0-100, not {percent}")
    try:
        outcome = resigning.resign(
            store,
            signers,
            percent=percent,
            expires_in=expires_in,
            trusted=trusted,
            expect_serial=expect_serial,
            invalidate=invalidate,
            now=now,
        )
    except (Refused, VerificationFailed, SerialMoved):
        raise
    except PublishError as exc:
        # Lost a race to another publish (it claimed the next serial, or its manifests/N.json is
        # there while its manifest.json is not yet): the store moved past the serial the operator
        # saw, which is a 412 with the store's own explanation, not a retry.
        highest = read_store(store, trusted_keys(signers, trusted)).highest_serial
        if highest > expect_serial:
            raise SerialMoved(exc.message, highest) from None
        raise
    manifest = outcome.manifest
    before = expect_serial
    return Steered(outcome.status, manifest.version, percent, before, manifest.serial)
