"""What the publisher may believe of a store (DESIGN section 2, end: the store is not trusted).

Whoever can write to the bucket can add, replace or delete any object, but cannot sign. So the
publisher reads ``manifest.json`` and every ``manifests/<serial>.json``, verifies each as an agent
would (signature by a trusted key, strict payload, binary URLs relative: nothing else was ever
published by us) but without the expiry and serial rules, and believes only what verifies:

- the **highest verified serial** is the highest payload serial of a verified envelope (never an
  object *name*, never an unsigned payload); the next serial is the first archive name above it
  that is free (a name held by any object is skipped), and one more than ``MAX_SERIAL_GAP`` above
  it is refused, so junk names can neither lock the fleet out (serial 2^63-1 was the attack) nor
  push the serial up by much;
- the **head** is the verified envelope with the highest serial: a release keeps its
  ``reports_url`` and is checked against it (downgrade, dropped platforms);
- the **live release** is ``manifest.json`` when it verifies and is the head: the only thing a
  re-sign re-signs. When there is none (an unsigned edit, a key nobody trusts, or an older signed
  envelope put back in place of the newer one), nothing is re-signed: the store cannot choose
  what we sign;
- objects that do not verify are named in a warning and otherwise left alone (never used, never
  deleted).

Trusted keys: the signer's own, plus ``--trusted-key`` / ``AVIKA_PUBLIC_KEYS`` (e.g. the old key
after a rotation). ``read_store`` is the I/O; ``examine``, ``plan_serial`` and ``StoreView`` are pure.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from agent.manifest import (
    MAX_ENVELOPE_BYTES,
    MAX_SERIAL,
    Manifest,
    ManifestError,
    PublicKey,
    check_url,
    format_time,
    parse_manifest,
    read_envelope_unverified,
    verify_envelope,
)
from publisher.errors import Refused
from publisher.stores import ARCHIVE_PREFIX, MANIFEST_KEY, Oversized, Store, archive_key, archive_serial

MAX_SERIAL_GAP = 1000
"""The next serial may be at most this far above the highest verified one (junk names skipped)."""
READERS = 8  # archived envelopes read at once (S3: one GET each)
MAX_NAMED = 10  # unverifiable objects named one by one in a warning; the rest are counted
_KEYID_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Entry:
    """One envelope in the store (``manifest.json`` or ``manifests/<n>.json``) and what it proves."""

    key: str
    manifest: Manifest | None = None  # verified; None when it does not verify
    error: str | None = None  # the first failure's code (``signature_invalid``, ``too_large``, ...)
    message: str = ""
    claimed: Manifest | None = None  # decoded WITHOUT trust, for display only
    key_ids: tuple[str, ...] = ()  # the keyid hints its signatures carry (unverified)
    verified_by: tuple[str, ...] = ()  # trusted key ids whose signature is on it
    data: bytes = field(default=b"", repr=False)

    @property
    def verified(self) -> bool:
        return self.manifest is not None

    @property
    def name_serial(self) -> int | None:
        return archive_serial(self.key)

    def describe(self) -> str:
        """For warnings: the key, the serial it claims, why it does not verify."""
        claim = f" (claims serial {self.claimed.serial})" if self.claimed is not None else ""
        return f"{self.key}{claim}: {self.error}"


def _key_hints(data: bytes) -> tuple[str, ...]:
    if len(data) > MAX_ENVELOPE_BYTES:
        return ()
    try:
        signatures = json.loads(data).get("signatures")
    except (ValueError, AttributeError, RecursionError):
        return ()
    if not isinstance(signatures, list):
        return ()
    hints = (s.get("keyid") for s in signatures[:16] if isinstance(s, dict))
    return tuple(h for h in hints if isinstance(h, str) and _KEYID_RE.fullmatch(h))


def _claimed(data: bytes) -> Manifest | None:
    try:
        return parse_manifest(read_envelope_unverified(data))
    except ManifestError:
        return None


def trusted_manifest(data: bytes, trusted: Sequence[PublicKey]) -> Manifest:
    """The manifest an envelope proves, as the publisher reads the store; ``ManifestError`` if none.

    An agent's checks minus expiry and its own serial history: a trusted signature, the strict
    payload, and binary URLs that are relative (the publisher never signs anything else, so an
    absolute URL means the key signed outside this tool, e.g. a maintenance role calling KMS).
    """
    manifest = parse_manifest(verify_envelope(data, trusted))
    for binary in manifest.binaries.values():
        check_url(binary.url)
    return manifest


def examine(key: str, data: bytes, trusted: Sequence[PublicKey]) -> Entry:
    """Pure: what one stored object proves."""
    hints = _key_hints(data)
    try:
        manifest = trusted_manifest(data, trusted)
    except ManifestError as exc:
        return Entry(key, None, exc.code, exc.message, _claimed(data), hints, data=data)
    # It verified: with one trusted key, that key signed it; with several, ask each.
    signed = [trusted[0].keyid] if len(trusted) == 1 else [k.keyid for k in trusted if _signed_by(data, k)]
    return Entry(key, manifest, None, "", manifest, hints, tuple(signed), data=data)


def _signed_by(data: bytes, key: PublicKey) -> bool:
    try:
        verify_envelope(data, [key])
    except ManifestError:
        return False
    return True


def plan_serial(highest_verified: int, taken: Iterable[int]) -> int:
    """Pure: the first free archive name above the highest verified serial (DESIGN section 2)."""
    names = set(taken)
    serial = highest_verified + 1
    while serial in names:
        serial += 1
    if serial - highest_verified > MAX_SERIAL_GAP:
        raise Refused(
            f"the next free archive name is serial {serial}, more than {MAX_SERIAL_GAP} above the highest "
            f"verified serial {highest_verified}: manifests/{highest_verified + 1}.json .. "
            f"manifests/{serial - 1}.json are all taken by objects that do not verify. Nothing was signed; "
            "move them out of the store (they are evidence) and re-run"
        )
    if serial > MAX_SERIAL:
        raise Refused(f"serial {serial} would exceed the largest serial agents accept ({MAX_SERIAL})")
    return serial


@dataclass(frozen=True)
class StoreView:
    """Everything ``read_store`` read, classified (pure; see the module docstring)."""

    location: str
    trusted: tuple[PublicKey, ...]
    live: Entry | None  # manifest.json (None: absent)
    live_token: str | None  # its compare-and-swap token, as read
    archive: tuple[Entry, ...]  # every manifests/<n>.json, highest name first
    oversized: tuple[str, ...] = ()  # keys too large to be an envelope (never read whole)
    stray: tuple[str, ...] = ()  # other keys under manifests/ (not archive names)

    @property
    def exists(self) -> bool:
        """Has anything ever been published here? (A new store needs ``release --init``.)"""
        return self.live is not None or bool(self.archive or self.oversized or self.stray)

    @property
    def verified(self) -> list[Entry]:
        return [e for e in (self.live, *self.archive) if e is not None and e.verified]

    @property
    def head(self) -> Entry | None:
        """The verified envelope with the highest serial (``manifest.json`` first on a tie)."""
        best: Entry | None = None
        for entry in self.verified:  # live first
            assert entry.manifest is not None
            if best is None or entry.manifest.serial > best.manifest.serial:  # type: ignore[union-attr]
                best = entry
        return best

    @property
    def highest_serial(self) -> int:
        head = self.head
        return head.manifest.serial if head is not None and head.manifest is not None else 0

    @property
    def live_release(self) -> Manifest | None:
        """``manifest.json`` when it verifies and nothing verified is newer: what may be inherited."""
        if self.live is None or self.live.manifest is None:
            return None
        return self.live.manifest if self.live.manifest.serial >= self.highest_serial else None

    def no_live_release(self) -> str:
        """Why there is no live release (for refusals): one sentence naming the object."""
        if self.live is None:
            return f"there is no {MANIFEST_KEY} in {self.location}"
        if self.live.manifest is None:
            return (
                f"{MANIFEST_KEY} in {self.location} does not verify with the trusted keys "
                f"({self.live.error}: {self.live.message})"
            )
        head = self.head
        assert head is not None and head.manifest is not None
        return (
            f"{MANIFEST_KEY} in {self.location} is serial {self.live.manifest.serial}, but {head.key} "
            f"(serial {head.manifest.serial}, {head.manifest.version}) verifies and is newer: a publish "
            "was interrupted, or someone who can write to the store put an older manifest back"
        )

    @property
    def taken(self) -> set[int]:
        names = {e.name_serial for e in self.archive} | {archive_serial(k) for k in self.oversized}
        return {n for n in names if n is not None}

    def next_serial(self) -> int:
        return plan_serial(self.highest_serial, self.taken)

    def unverified(self) -> list[Entry]:
        return [e for e in (self.live, *self.archive) if e is not None and not e.verified]

    def warnings(self) -> list[str]:
        """One line per kind of object ignored, naming them (at most ``MAX_NAMED`` each).

        Objects that would matter if they were believed (``manifest.json``, or a claim at or above
        the highest verified serial) come first and loudest; older archives that do not verify
        (typically signed before a key rotation) get a line of their own.
        """
        out = []
        bad = self.unverified()
        highest = self.highest_serial
        newer = [e for e in bad if e.key == MANIFEST_KEY or _claim(e) >= highest]
        older = [e for e in bad if not (e.key == MANIFEST_KEY or _claim(e) >= highest)]
        keys = ", ".join(k.keyid[:16] for k in self.trusted) or "none"
        if newer:
            out.append(
                f"ignored {len(newer)} object(s) that do not verify with the trusted keys ({keys}): "
                f"{_named(newer)}. They are not used and not deleted; after a key rotation pass the old "
                "key with --trusted-key"
            )
        if older:
            out.append(
                f"{len(older)} archived manifest(s) below serial {highest} do not verify with the trusted "
                f"keys (signed before a key rotation, or replaced): {_named(older)}; ignored"
            )
        for kind, keys_ in (
            ("too large to be a manifest", self.oversized),
            ("not archive names", self.stray),
        ):
            if keys_:
                more = f" and {len(keys_) - MAX_NAMED} more" if len(keys_) > MAX_NAMED else ""
                out.append(f"ignored {len(keys_)} object(s) {kind}: {', '.join(keys_[:MAX_NAMED])}{more}")
        return out

    def verified_of(self, version: str) -> list[Manifest]:
        """Verified manifests of ``version`` (as published, normalised), newest serial first."""
        found = [
            e.manifest for e in self.verified if e.manifest is not None and e.manifest.version == version
        ]
        return sorted(found, key=lambda m: m.serial, reverse=True)

    def history(self) -> list[dict[str, Any]]:
        """Every archived serial, newest first, as ``history --json`` prints it (DESIGN section 6).

        ``manifest.json`` is a row of its own only when it is none of the archived envelopes.
        """
        live_data = self.live.data if self.live is not None else None
        rows = [_row(e, live=e.data == live_data) for e in self.archive]
        if self.live is not None and not any(row["live"] for row in rows):
            rows.append(_row(self.live, live=True))
        rows += [_oversized_row(key) for key in self.oversized]
        return sorted(rows, key=lambda r: (r["serial"] is not None, r["serial"] or 0), reverse=True)


def _claim(entry: Entry) -> int:
    """The highest serial an object claims, by content or by name (0: none)."""
    return max(entry.claimed.serial if entry.claimed is not None else 0, entry.name_serial or 0)


def _named(entries: Sequence[Entry]) -> str:
    more = f"; and {len(entries) - MAX_NAMED} more" if len(entries) > MAX_NAMED else ""
    return "; ".join(e.describe() for e in entries[:MAX_NAMED]) + more


def _row(entry: Entry, live: bool) -> dict[str, Any]:
    m = entry.manifest or entry.claimed
    return {
        "key": entry.key,
        "serial": m.serial if m is not None else entry.name_serial,
        "version": m.version if m else None,
        "rollout": m.rollout.percent if m else None,
        "expires": format_time(m.expires) if m else None,
        "released_at": format_time(m.released_at) if m else None,
        "signed_at": format_time(m.signed_at) if m and m.signed_at else None,
        "downgrade": m.downgrade if m else None,
        "key_ids": list(entry.key_ids),
        "verified": entry.verified,
        "verified_by": list(entry.verified_by),
        "error": entry.error,
        "message": entry.message,
        "live": live,
    }


def _oversized_row(key: str) -> dict[str, Any]:
    row = _row(Entry(key, error="too_large", message=f"over {MAX_ENVELOPE_BYTES} bytes"), live=False)
    return row


# ---------------------------------------------------------------- I/O


def _read(store: Store, key: str) -> tuple[str, bytes | None, bool]:
    """(key, bytes or None when gone, oversized?)."""
    try:
        return key, store.read(key, limit=MAX_ENVELOPE_BYTES), False
    except Oversized:
        return key, None, True


def read_store(store: Store, trusted: Sequence[PublicKey]) -> StoreView:
    """Read ``manifest.json`` and every archived envelope; verify each (see the module docstring).

    A read that fails for any other reason than size aborts (a missing serial must never make the
    highest verified serial look lower than it is).
    """
    keys = tuple(dict.fromkeys(trusted))
    live_object = store.read_versioned(MANIFEST_KEY)  # over 16 MiB aborts: its token is needed to replace it
    names = store.list(ARCHIVE_PREFIX)
    archived = [k for k in names if archive_serial(k) is not None and archive_key(archive_serial(k)) == k]
    named = set(archived)
    stray = tuple(k for k in names if k not in named)
    with ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="avika-archive") as pool:
        results = list(pool.map(lambda k: _read(store, k), archived))
    entries, oversized = [], []
    for key, data, too_big in results:
        if too_big:
            oversized.append(key)
        elif data is not None:  # deleted between list and read: as if never there
            entries.append(examine(key, data, keys))
    entries.sort(key=lambda e: e.name_serial or 0, reverse=True)
    live = None if live_object.data is None else examine(MANIFEST_KEY, live_object.data, keys)
    return StoreView(store.location, keys, live, live_object.token, tuple(entries), tuple(oversized), stray)
