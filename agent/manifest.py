"""The signed manifest: the one definition of its format (DESIGN section 2, contract).

Publisher, agent and tests all use this module. It works on bytes, keys and a clock it is
given, never on the network or the disk, so every rule can be tested on data alone.

Verification runs the rules in the contract's order; the first failure is the error:

1. envelope size (``too_large``), envelope shape (``malformed_envelope``), ``payloadType``
   (``wrong_payload_type``), signatures counted by distinct trusted key
   (``signature_invalid`` / ``threshold_not_met``) -- verify first, parse second;
2. strict payload JSON and schema (``malformed_manifest``);
3. ``expires`` in the future, with clock slack (``expired``);
4. ``serial`` not below the highest accepted, an equal serial only with identical bytes
   (``serial_rollback``);
5. every binary URL relative, or absolute http(s) on the manifest's own origin or an allowed
   origin (``bad_url``), an entry for the platform (``no_binary_for_platform``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from packaging.version import InvalidVersion, Version

PAYLOAD_TYPE = "application/vnd.avika.manifest+json"
SCHEMA = 1
MAX_ENVELOPE_BYTES = 1 << 20
CLOCK_SLACK = timedelta(minutes=5)
# Sizes must fit a Go int64 so a Go agent reads the same numbers.
MAX_INT = (1 << 63) - 1
# Serials stay exact in every JSON reader, JavaScript's doubles included (DESIGN section 2).
MAX_SERIAL = (1 << 53) - 1
# A verifier never does unbounded work: at most this many signature entries (DESIGN section 2).
MAX_SIGNATURES = 16
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_PLATFORM_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


# ---------------------------------------------------------------- errors


class ManifestError(Exception):
    """A manifest was refused. ``code`` is the contract's error code (DESIGN section 7)."""

    code = "manifest_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TooLarge(ManifestError):
    code = "too_large"


class MalformedEnvelope(ManifestError):
    code = "malformed_envelope"


class WrongPayloadType(ManifestError):
    code = "wrong_payload_type"


class SignatureInvalid(ManifestError):
    code = "signature_invalid"


class ThresholdNotMet(ManifestError):
    code = "threshold_not_met"


class MalformedManifest(ManifestError):
    code = "malformed_manifest"


class Expired(ManifestError):
    code = "expired"


class SerialRollback(ManifestError):
    code = "serial_rollback"


class BadUrl(ManifestError):
    code = "bad_url"


class NoBinaryForPlatform(ManifestError):
    code = "no_binary_for_platform"


ERROR_CODES: tuple[str, ...] = tuple(
    cls.code
    for cls in (
        TooLarge,
        MalformedEnvelope,
        WrongPayloadType,
        SignatureInvalid,
        ThresholdNotMet,
        MalformedManifest,
        Expired,
        SerialRollback,
        BadUrl,
        NoBinaryForPlatform,
    )
)


# ---------------------------------------------------------------- keys


@dataclass(frozen=True)
class PublicKey:
    """A trusted Ed25519 key: raw 32 bytes, written as base64 (Sparkle's SUPublicEDKey)."""

    raw: bytes

    @property
    def keyid(self) -> str:
        return key_id(self.raw)

    @property
    def b64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True

    @classmethod
    def from_b64(cls, text: str) -> PublicKey:
        """Parse a configured key; ``ValueError`` names what is wrong with it."""
        text = text.strip()
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"public key {text!r} is not base64") from None
        if len(raw) != 32:
            raise ValueError(f"public key {text!r} is {len(raw)} bytes, an Ed25519 key is 32")
        try:
            Ed25519PublicKey.from_public_bytes(raw)
        except ValueError as exc:
            raise ValueError(f"public key {text!r} is not an Ed25519 key: {exc}") from None
        return cls(raw)


def key_id(raw_public_key: bytes) -> str:
    """Lowercase hex SHA-256 of the raw 32-byte public key (the DSSE ``keyid``)."""
    return hashlib.sha256(raw_public_key).hexdigest()


def parse_public_keys(text: str) -> list[PublicKey]:
    """Comma-separated base64 keys, as ``UPDATE_PUBLIC_KEYS`` holds them; duplicates folded."""
    keys: list[PublicKey] = []
    for part in text.split(","):
        if part.strip():
            key = PublicKey.from_b64(part)
            if key not in keys:
                keys.append(key)
    return keys


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_of(key: Ed25519PrivateKey) -> PublicKey:
    # Key files (PEM) are the publisher's (publisher/signing.py): the agent never imports
    # cryptography's serialization package (1.8 MiB, 10 ms at every start).
    return PublicKey(key.public_key().public_bytes_raw())


class Signer(Protocol):
    """Anything that signs with an Ed25519 key: a local key file or AWS KMS."""

    @property
    def public_key(self) -> PublicKey: ...

    def sign(self, data: bytes) -> bytes: ...


class LocalSigner:
    """Signs with an in-memory Ed25519 private key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self._public = public_key_of(key)

    @property
    def public_key(self) -> PublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


# ---------------------------------------------------------------- DSSE envelope


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what is actually signed."""
    ptype = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(ptype), ptype, len(payload), payload)


def sign_envelope(payload: bytes, signers: Iterable[Signer], payload_type: str = PAYLOAD_TYPE) -> bytes:
    """Build the envelope bytes served as ``manifest.json``."""
    message = pae(payload_type, payload)
    signatures = [
        {"keyid": s.public_key.keyid, "sig": base64.b64encode(s.sign(message)).decode("ascii")}
        for s in signers
    ]
    if not signatures:
        raise ValueError("an envelope needs at least one signer")
    envelope = {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": signatures,
    }
    return canonical_envelope(envelope)


def canonical_envelope(envelope: Mapping[str, Any]) -> bytes:
    """The publisher's exact layout: compact JSON, fields in DSSE order, no trailing newline.

    No insignificant byte is left, so an audit can insist that every served byte is as signed.
    """
    ordered = {
        "payloadType": envelope.get("payloadType"),
        "payload": envelope.get("payload"),
        "signatures": [
            {"keyid": s.get("keyid"), "sig": s.get("sig")} for s in envelope.get("signatures", [])
        ],
    }
    return json.dumps(ordered, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _b64(text: str) -> bytes:
    """Standard or URL-safe base64, as DSSE allows; padding optional; canonical only.

    Non-zero padding bits are refused (RFC 4648 section 3.5; Go: ``StdEncoding.Strict()``), so no
    two envelope texts decode to the same bytes: every byte of a served envelope matters.
    """
    padded = text + "=" * (-len(text) % 4)
    if re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", padded):
        raw, again = base64.b64decode(padded, validate=True), base64.b64encode
    elif re.fullmatch(r"[A-Za-z0-9_-]*={0,2}", padded):
        raw, again = base64.urlsafe_b64decode(padded), base64.urlsafe_b64encode
    else:
        raise binascii.Error("not base64")
    if again(raw).decode("ascii") != padded:
        raise binascii.Error("non-canonical base64")
    return raw


def _strict_loads(data: bytes) -> Any:
    """JSON with no duplicate keys, floats, NaN or Infinity; ``ValueError`` otherwise."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    def no_float(text: str) -> Any:
        raise ValueError(f"non-integer number {text}")

    def no_constant(text: str) -> Any:
        raise ValueError(f"{text} is not JSON")

    try:
        text = data.decode("utf-8")
        return json.loads(text, object_pairs_hook=pairs, parse_float=no_float, parse_constant=no_constant)
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8: {exc}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _open_envelope(data: bytes) -> tuple[bytes, list[tuple[str | None, bytes]]]:
    """Size, shape and ``payloadType`` checks: the payload and (keyid hint, signature) pairs."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise TooLarge(f"envelope is {len(data)} bytes, the limit is {MAX_ENVELOPE_BYTES}")
    try:
        envelope = _strict_loads(data)
    except ValueError as exc:
        raise MalformedEnvelope(f"envelope is not strict JSON: {exc}") from None
    if not isinstance(envelope, dict):
        raise MalformedEnvelope("envelope is not a JSON object")
    payload_text, payload_type = envelope.get("payload"), envelope.get("payloadType")
    signatures = envelope.get("signatures")
    if not isinstance(payload_text, str):
        raise MalformedEnvelope("envelope has no string 'payload'")
    if not isinstance(payload_type, str):
        raise MalformedEnvelope("envelope has no string 'payloadType'")
    if not isinstance(signatures, list):
        raise MalformedEnvelope("envelope has no 'signatures' list")
    if not 1 <= len(signatures) <= MAX_SIGNATURES:
        raise MalformedEnvelope(
            f"envelope has {len(signatures)} signature entries, allowed 1..{MAX_SIGNATURES}"
        )
    try:
        payload = _b64(payload_text)
    except (binascii.Error, ValueError):
        raise MalformedEnvelope("envelope 'payload' is not base64") from None
    decoded: list[tuple[str | None, bytes]] = []
    for i, entry in enumerate(signatures):
        if not isinstance(entry, dict) or not isinstance(entry.get("sig"), str):
            raise MalformedEnvelope(f"signature {i} has no string 'sig'")
        hint = entry.get("keyid")
        if hint is not None and not isinstance(hint, str):
            raise MalformedEnvelope(f"signature {i} has a non-string 'keyid'")
        try:
            decoded.append((hint, _b64(entry["sig"])))
        except (binascii.Error, ValueError):
            raise MalformedEnvelope(f"signature {i} 'sig' is not base64") from None
    if payload_type != PAYLOAD_TYPE:
        raise WrongPayloadType(f"payloadType is {payload_type!r}, expected {PAYLOAD_TYPE!r}")
    return payload, decoded


def audit_envelope(data: bytes, trusted: Sequence[PublicKey]) -> list[str]:
    """Stricter than an agent, for ``avika-publish verify``: problems with an envelope that verifies.

    An agent accepts any layout and treats ``keyid`` as a hint (DESIGN section 2). An audit of what
    the CDN serves also wants the publisher's exact bytes: canonical layout, every signature made
    by a trusted key, and every ``keyid`` naming the key that made it.
    """
    payload, decoded = _open_envelope(data)
    envelope = json.loads(data)
    problems = []
    if canonical_envelope(envelope) != data:
        problems.append("envelope bytes differ from the publisher's canonical layout")
    message = pae(PAYLOAD_TYPE, payload)
    for i, (hint, sig) in enumerate(decoded):
        signer = next((k for k in trusted if k.verify(sig, message)), None)
        if signer is None:
            problems.append(f"signature {i} is not made by a trusted key")
        elif hint != signer.keyid:
            problems.append(f"signature {i} has keyid {hint!r}, but key {signer.keyid} made it")
    return problems


def read_envelope_unverified(data: bytes) -> bytes:
    """The payload of a well-formed envelope, WITHOUT checking any signature.

    For display only (``avika-publish show``); nothing may trust what this returns.
    """
    return _open_envelope(data)[0]


def verify_envelope(data: bytes, trusted: Sequence[PublicKey], threshold: int = 1) -> bytes:
    """Check size, shape, type and signatures; return the payload bytes that they cover.

    Signatures are counted by distinct trusted key, never by entries, and ``keyid`` is only a
    hint: a signature counts for whichever trusted key verifies it.
    """
    if threshold < 1:
        raise ValueError("threshold must be at least 1")
    payload, decoded = _open_envelope(data)
    message = pae(PAYLOAD_TYPE, payload)
    verified: set[bytes] = set()
    for hint, sig in decoded:
        # Try the hinted key first (cheap), then every other trusted key.
        for key in sorted(trusted, key=lambda k: k.keyid != hint):
            if key.raw not in verified and key.verify(sig, message):
                verified.add(key.raw)
                break
    if not verified:
        raise SignatureInvalid(f"no trusted key ({len(trusted)} configured) verified any signature")
    if len(verified) < threshold:
        raise ThresholdNotMet(f"{len(verified)} distinct trusted key(s) signed, {threshold} required")
    return payload


# ---------------------------------------------------------------- payload


def parse_version(text: str) -> Version:
    """PEP 440 version; a leading ``v`` (a git tag) is ignored. ``InvalidVersion`` otherwise."""
    if not isinstance(text, str):
        raise InvalidVersion(f"version {text!r} is not a string")
    # Stricter than packaging, which also takes spaces and "vv1.0": a Go agent must agree.
    stripped = text[1:] if text[:1] in ("v", "V") else text
    if not re.fullmatch(r"[0-9][0-9A-Za-z.!+_-]*", stripped):
        raise InvalidVersion(f"{text!r} is not a version")
    return Version(stripped)


def normalize_version(text: str) -> str:
    """How a version is written in a manifest: ``v0.1.44`` becomes ``0.1.44``."""
    return str(parse_version(text))


def parse_time(text: str) -> datetime:
    """RFC 3339 timestamp with an explicit offset; ``ValueError`` otherwise."""
    if not isinstance(text, str) or not re.fullmatch(
        r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d{1,9})?([Zz]|[+-]\d\d:\d\d)", text
    ):
        raise ValueError(f"{text!r} is not an RFC 3339 time")
    normal = text.upper().replace("Z", "+00:00").replace(" ", "T")
    frac = re.search(r"\.(\d+)", normal)
    if frac:  # microseconds, exactly six digits: Python 3.9's fromisoformat takes no other count
        normal = normal.replace(frac.group(0), "." + frac.group(1)[:6].ljust(6, "0"))
    return datetime.fromisoformat(normal)


def format_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Binary:
    """One platform's file: where it is, what it hashes to, how big it must be."""

    url: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Rollout:
    """Who acts on the release now: the wave's percent and the salt that buckets hosts."""

    percent: int = 100
    salt: str = ""

    @property
    def halted(self) -> bool:
        """Percent 0: nobody acts on the release unless ``min_version`` forces it."""
        return self.percent == 0


@dataclass(frozen=True)
class RolloutPlan:
    """``rollout_plan``: the percents a release climbs through by itself (``avika-publish progress``).

    Agents parse it strictly and decide nothing from it (DESIGN section 2).
    """

    steps: tuple[int, ...]
    soak: str = "2h"
    max_failure_rate: str = "0.05"
    min_agents: int = 20

    @property
    def soak_seconds(self) -> int:
        return parse_duration(self.soak)

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": list(self.steps),
            "soak": self.soak,
            "max_failure_rate": self.max_failure_rate,
            "min_agents": self.min_agents,
        }


@dataclass(frozen=True)
class Manifest:
    """A parsed payload. ``raw`` keeps the exact signed bytes (for the equal-serial rule)."""

    serial: int
    version: str
    released_at: datetime
    expires: datetime
    binaries: Mapping[str, Binary]
    container_image: str | None = None
    min_version: str | None = None
    changelog: str = ""
    rollout: Rollout = field(default_factory=Rollout)
    downgrade: bool = False
    reports_url: str | None = None
    container_digest: str | None = None
    signed_at: datetime | None = None
    rollout_plan: RolloutPlan | None = None
    schema: int = SCHEMA
    raw: bytes = b""

    @property
    def parsed_version(self) -> Version:
        return parse_version(self.version)

    @property
    def digest(self) -> str:
        """SHA-256 of the signed payload bytes: identifies this exact manifest."""
        return hashlib.sha256(self.raw).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """The payload object, with every field written out."""
        return {
            "schema": self.schema,
            "serial": self.serial,
            "version": self.version,
            "released_at": format_time(self.released_at),
            "expires": format_time(self.expires),
            "binaries": {
                name: {"url": b.url, "sha256": b.sha256, "size": b.size}
                for name, b in sorted(self.binaries.items())
            },
            "container_image": self.container_image,
            "min_version": self.min_version,
            "changelog": self.changelog,
            "rollout": {"percent": self.rollout.percent, "salt": self.rollout.salt},
            "downgrade": self.downgrade,
            "reports_url": self.reports_url,
            "container_digest": self.container_digest,
            "signed_at": None if self.signed_at is None else format_time(self.signed_at),
            "rollout_plan": None if self.rollout_plan is None else self.rollout_plan.to_dict(),
        }

    def to_payload(self) -> bytes:
        """Canonical bytes to sign: sorted keys, no spaces, UTF-8."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8"
        )


def _field(obj: Mapping[str, Any], name: str, types: type | tuple[type, ...], where: str = "") -> Any:
    if name not in obj:
        raise MalformedManifest(f"{where}missing field {name!r}")
    value = obj[name]
    # bool is an int in Python, never in the contract.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise MalformedManifest(f"{where}field {name!r} must not be a boolean")
    if not isinstance(value, types):
        raise MalformedManifest(f"{where}field {name!r} has type {type(value).__name__}")
    return value


def _optional(obj: Mapping[str, Any], name: str, types: type | tuple[type, ...], default: Any) -> Any:
    if obj.get(name) is None:
        return default
    return _field(obj, name, types)


def _int_in(value: int, name: str, low: int, high: int) -> int:
    if not low <= value <= high:
        raise MalformedManifest(f"field {name!r} is {value}, allowed {low}..{high}")
    return value


def _version_field(value: str, name: str) -> str:
    try:
        parse_version(value)
    except InvalidVersion:
        raise MalformedManifest(f"field {name!r} is not a PEP 440 version: {value!r}") from None
    return value


def _time_field(obj: Mapping[str, Any], name: str) -> datetime:
    try:
        return parse_time(_field(obj, name, str))
    except ValueError as exc:
        raise MalformedManifest(f"field {name!r}: {exc}") from None


def parse_manifest(payload: bytes) -> Manifest:
    """Strict payload parsing: anything off the schema is ``MalformedManifest``."""
    try:
        obj = _strict_loads(payload)
    except ValueError as exc:
        raise MalformedManifest(f"payload is not strict JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedManifest("payload is not a JSON object")
    schema = _field(obj, "schema", int)
    if schema != SCHEMA:
        raise MalformedManifest(f"unknown schema {schema} (this agent reads schema {SCHEMA})")
    serial = _int_in(_field(obj, "serial", int), "serial", 1, MAX_SERIAL)
    version = _version_field(_field(obj, "version", str), "version")
    released_at = _time_field(obj, "released_at")
    expires = _time_field(obj, "expires")

    raw_binaries = _field(obj, "binaries", dict)
    binaries: dict[str, Binary] = {}
    for platform, entry in raw_binaries.items():
        where = f"binaries[{platform!r}]: "
        if not _PLATFORM_RE.fullmatch(platform):
            raise MalformedManifest(f"binary platform {platform!r} is not a platform name")
        if not isinstance(entry, dict):
            raise MalformedManifest(f"{where}entry is not an object")
        sha256 = _field(entry, "sha256", str, where)
        if not _SHA256_RE.fullmatch(sha256):
            raise MalformedManifest(f"{where}sha256 {sha256!r} is not 64 lowercase hex digits")
        size = _int_in(_field(entry, "size", int, where), f"{platform}.size", 1, MAX_INT)
        binaries[platform] = Binary(url=_field(entry, "url", str, where), sha256=sha256, size=size)

    raw_rollout = _optional(obj, "rollout", dict, {})
    rollout = Rollout(
        percent=_int_in(_optional(raw_rollout, "percent", int, 100), "rollout.percent", 0, 100),
        salt=_optional(raw_rollout, "salt", str, ""),
    )
    min_version = _optional(obj, "min_version", str, None)
    if min_version is not None:
        _version_field(min_version, "min_version")
    container_digest = _optional(obj, "container_digest", str, None)
    if container_digest is not None and not _DIGEST_RE.fullmatch(container_digest):
        raise MalformedManifest(f"container_digest {container_digest!r} is not sha256:<64 lowercase hex>")
    signed_at = _time_field(obj, "signed_at") if obj.get("signed_at") is not None else None
    return Manifest(
        schema=schema,
        serial=serial,
        version=version,
        released_at=released_at,
        expires=expires,
        binaries=binaries,
        container_image=_optional(obj, "container_image", str, None),
        min_version=min_version,
        changelog=_optional(obj, "changelog", str, ""),
        rollout=rollout,
        downgrade=_optional(obj, "downgrade", bool, False),
        reports_url=_optional(obj, "reports_url", str, None),
        container_digest=container_digest,
        signed_at=signed_at,
        rollout_plan=_rollout_plan(obj),
        raw=bytes(payload),
    )


# The failure-rate threshold is a decimal string in JSON ("0.05"): the payload has no floats.
_RATE_RE = re.compile(r"^(0(\.[0-9]{1,6})?|1(\.0{1,6})?)$")


def _rollout_plan(obj: Mapping[str, Any]) -> RolloutPlan | None:
    raw = _optional(obj, "rollout_plan", dict, None)
    if raw is None:
        return None
    where = "rollout_plan: "
    steps = _field(raw, "steps", list, where)
    if not steps or len(steps) > 100:
        raise MalformedManifest(f"{where}steps must hold 1 to 100 percents")
    for step in steps:
        if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= 100:
            raise MalformedManifest(f"{where}step {step!r} is not a percent 1..100")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise MalformedManifest(f"{where}steps {steps} are not strictly increasing")
    if steps[-1] != 100:
        raise MalformedManifest(f"{where}steps {steps} do not end at 100")
    soak = _field(raw, "soak", str, where)
    try:
        soak_seconds = duration_seconds(soak)
    except ValueError as exc:
        raise MalformedManifest(f"{where}soak: {exc}") from None
    if soak_seconds > MAX_SOAK_SECONDS:
        raise MalformedManifest(f"{where}soak {soak!r} is longer than {MAX_SOAK_SECONDS // 86400}d")
    rate = _field(raw, "max_failure_rate", str, where)
    if not _RATE_RE.fullmatch(rate):
        raise MalformedManifest(f"{where}max_failure_rate {rate!r} is not a decimal string from 0 to 1")
    min_agents = _int_in(_field(raw, "min_agents", int, where), "rollout_plan.min_agents", 0, 1_000_000)
    return RolloutPlan(steps=tuple(steps), soak=soak, max_failure_rate=rate, min_agents=min_agents)


_DURATION_RE = re.compile(r"(?:[0-9]{1,9}[smhd])+")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# A longer soak is a typo; the bound also keeps every reader's arithmetic far from overflowing.
MAX_SOAK_SECONDS = 365 * 86400


def duration_seconds(text: str) -> int:
    """Seconds in ``30s``, ``15m``, ``1h30m``, ``2d``, exactly as written (no spaces); ``ValueError``."""
    if not isinstance(text, str) or not _DURATION_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a duration like 30s, 15m or 1h30m")
    return sum(int(n) * _DURATION_UNITS[u] for n, u in re.findall(r"([0-9]+)([smhd])", text))


def parse_duration(text: str) -> int:
    """A configured duration (DESIGN section 3): :func:`duration_seconds`, surrounding spaces allowed."""
    return duration_seconds(text.strip() if isinstance(text, str) else text)


# ---------------------------------------------------------------- rules


@dataclass(frozen=True)
class TrustState:
    """What this agent has accepted before: the highest serial and its payload's digest."""

    highest_serial: int | None = None
    digest: str | None = None


# An authority a binary URL may name: a DNS name or an IP literal, and an optional port. No userinfo
# (``https://updates.example.com@evil.example/`` is on evil.example), no percent-escapes, nothing
# outside ASCII: URL parsers disagree about all of those, and two agents must find the same host.
_AUTHORITY_RE = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def url_origin(url: str) -> str | None:
    """``scheme://host[:port]`` of an absolute http(s) URL, lower-cased, default port dropped.

    None for anything else (relative, another scheme, no host, a bad port).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}:{port}"
    return f"{scheme}://{host}"


def plain_authority(netloc: str) -> bool:
    """``host[:port]`` and nothing else (see ``_AUTHORITY_RE``): what an origin may be written as."""
    return _AUTHORITY_RE.fullmatch(netloc) is not None


def check_url(url: str, manifest_url: str | None = None, origins: Sequence[str] = ()) -> None:
    """A binary URL stays on ground the store controls, else ``bad_url`` (DESIGN section 2).

    Relative URLs are fine (they resolve against the manifest). An absolute one -- or a
    scheme-relative ``//host/...`` -- must resolve to the manifest's own origin or to one of
    ``origins`` (``UPDATE_BINARY_ORIGINS``, as :func:`url_origin` writes them), so a key that can
    only re-sign (the maintenance job) can never point the fleet at bytes that were not published
    to the store. Origins compare by scheme, lower-cased host and port (the default port may be
    written or not); its authority must be a plain ``host[:port]``.
    """
    if not url or any(ord(c) < 0x21 or ord(c) == 0x7F for c in url) or "\\" in url:
        raise BadUrl(f"binary url {url!r} is empty or has spaces or control characters")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise BadUrl(f"binary url {url!r} does not parse: {exc}") from None
    if parts.scheme and parts.scheme.lower() not in _DEFAULT_PORTS:
        raise BadUrl(f"binary url {url!r} has scheme {parts.scheme!r}, only http(s) is allowed")
    if (parts.scheme or url.startswith("//")) and not parts.netloc:
        raise BadUrl(f"binary url {url!r} has no host")
    if not parts.netloc:
        return  # relative: on the manifest's own origin by construction
    if not plain_authority(parts.netloc):
        raise BadUrl(
            f"binary url {url!r}: {parts.netloc!r} is not a plain host[:port] "
            "(no userinfo, percent-escapes or other characters)"
        )
    base = manifest_url or "https://manifest.invalid/"
    origin = url_origin(urljoin(base, url))
    if origin is None:
        raise BadUrl(f"binary url {url!r} has no valid host or port")
    own = url_origin(manifest_url) if manifest_url else None
    if origin != own and origin not in origins:
        allowed = ", ".join(x for x in (own, *origins) if x) or "none: only relative URLs"
        raise BadUrl(f"binary url {url!r} is on {origin}, which is not an allowed origin ({allowed})")


def check_rules(
    manifest: Manifest,
    *,
    now: datetime,
    trust: TrustState = TrustState(),
    platform: str | None = None,
    manifest_url: str | None = None,
    binary_origins: Sequence[str] = (),
) -> None:
    """The rules after parsing, in the contract's order. ``platform`` None = container agent.

    ``manifest_url`` is where the envelope came from (None: absolute binary URLs are allowed only
    on ``binary_origins``).
    """
    if manifest.expires <= now - CLOCK_SLACK:
        # isoformat, not format_time: an instant near year 1 cannot always be shifted to UTC.
        raise Expired(f"manifest serial {manifest.serial} expired at {manifest.expires.isoformat()}")
    if trust.highest_serial is not None:
        if manifest.serial < trust.highest_serial:
            raise SerialRollback(
                f"manifest serial {manifest.serial} is below the highest accepted ({trust.highest_serial})"
            )
        if manifest.serial == trust.highest_serial and trust.digest and manifest.digest != trust.digest:
            raise SerialRollback(f"manifest serial {manifest.serial} was accepted before with other content")
    for binary in manifest.binaries.values():
        check_url(binary.url, manifest_url, binary_origins)
    if platform is not None and platform not in manifest.binaries:
        raise NoBinaryForPlatform(
            f"manifest {manifest.version} has no binary for {platform} (has: {sorted(manifest.binaries)})"
        )


def verify_manifest(
    data: bytes,
    *,
    trusted: Sequence[PublicKey],
    threshold: int = 1,
    now: datetime,
    trust: TrustState = TrustState(),
    platform: str | None = None,
    manifest_url: str | None = None,
    binary_origins: Sequence[str] = (),
) -> Manifest:
    """Everything an agent checks before it believes a manifest (DESIGN section 2, in order)."""
    manifest = parse_manifest(verify_envelope(data, trusted, threshold))
    check_rules(
        manifest,
        now=now,
        trust=trust,
        platform=platform,
        manifest_url=manifest_url,
        binary_origins=binary_origins,
    )
    return manifest


def resolve_url(manifest_url: str, url: str) -> str:
    """A binary's URL is resolved against the manifest's own URL."""
    return urljoin(manifest_url, url)


def manifest_url(update_server: str) -> str:
    """``UPDATE_SERVER`` is a directory URL that holds ``manifest.json``."""
    return update_server.rstrip("/") + "/manifest.json"


# ---------------------------------------------------------------- rollout


def fnv1a32(data: bytes) -> int:
    """FNV-1a, 32-bit: Go's ``hash/fnv.New32a``."""
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def rollout_bucket(agent_id: str, salt: str = "") -> int:
    """0..99; with ``salt`` "" this is exactly the seed's ``shouldUpdateInWave`` bucket."""
    return fnv1a32((salt + agent_id).encode("utf-8")) % 100


def in_wave(agent_id: str, rollout: Rollout, local_cap: int = 100) -> bool:
    """The agent updates only if its bucket is below min(manifest percent, local cap)."""
    return rollout_bucket(agent_id, rollout.salt) < min(rollout.percent, local_cap)
