"""Every rule of the signed manifest (DESIGN section 2, contract), one error code each.

- the envelope: size (``too_large``), shape (``malformed_envelope``), ``payloadType``
  (``wrong_payload_type``), signatures counted by distinct trusted key (``signature_invalid``,
  ``threshold_not_met``); DSSE PAE bytes exactly as the DSSE spec writes them;
- the envelope holds 1-16 signature entries (``malformed_envelope``), so a verifier never does
  unbounded work: 4,000 junk entries are refused before a single signature is checked;
- the payload: strict JSON and schema (``malformed_manifest``): serials in 1..2^53-1, the optional
  ``container_digest`` (``sha256:<64 hex>``), ``signed_at`` (RFC 3339) and ``rollout_plan`` (steps
  strictly increasing to 100, soak a duration, the failure rate a decimal string, ``min_agents`` an
  integer; no bool/float/int-string confusion); expiry with 5 min slack (``expired``), serial never
  below the highest accepted (``serial_rollback``);
- binary URLs (``bad_url``): relative, or absolute on the manifest's own origin or an origin of
  ``UPDATE_BINARY_ORIGINS`` (scheme, host and port; no userinfo or other tricks in the host); a
  binary for a VM agent's platform (``no_binary_for_platform``);
- the rules run in the contract's order: the first failure is the error;
- key helpers, PEP 440 version comparison and URL resolution.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from packaging.version import InvalidVersion, Version

from agent import manifest as m
from agent.manifest import (
    CLOCK_SLACK,
    ERROR_CODES,
    MAX_ENVELOPE_BYTES,
    PAYLOAD_TYPE,
    LocalSigner,
    ManifestError,
    PublicKey,
    TrustState,
    key_id,
    manifest_url,
    normalize_version,
    pae,
    parse_manifest,
    parse_public_keys,
    parse_version,
    public_key_of,
    resolve_url,
    sign_envelope,
    verify_envelope,
    verify_manifest,
)

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
# Where the envelopes of these tests are served from: the origin binary URLs may use.
SERVED_FROM = "https://updates.example.com/avika/manifest.json"
NO_TRUST = TrustState()
K1, K2, K3, OUTSIDER = (Ed25519PrivateKey.from_private_bytes(bytes([n]) * 32) for n in (1, 2, 3, 99))
P1, P2, P3, POUT = (public_key_of(k) for k in (K1, K2, K3, OUTSIDER))
SHA_A = hashlib.sha256(b"amd64 binary").hexdigest()
SHA_B = hashlib.sha256(b"arm64 binary").hexdigest()


def manifest_obj(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "schema": 1,
        "serial": 42,
        "version": "0.1.44",
        "released_at": "2026-02-15T20:00:00Z",
        "expires": "2026-03-17T20:00:00Z",
        "binaries": {
            "linux-amd64": {
                "url": f"binaries/0.1.44/{SHA_A}/avika-agent-linux-amd64",
                "sha256": SHA_A,
                "size": 100,
            },
            "linux-arm64": {
                "url": f"binaries/0.1.44/{SHA_B}/avika-agent-linux-arm64",
                "sha256": SHA_B,
                "size": 90,
            },
        },
    }
    obj.update(changes)
    return obj


def with_binary(platform: str = "linux-amd64", **changes: Any) -> dict[str, Any]:
    obj = manifest_obj()
    obj["binaries"][platform] = {**obj["binaries"][platform], **changes}
    return obj


def without(obj: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != name}


def payload_of(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def signed(payload: bytes, *keys: Ed25519PrivateKey, payload_type: str = PAYLOAD_TYPE) -> bytes:
    return sign_envelope(payload, [LocalSigner(k) for k in keys or (K1,)], payload_type)


def raw_envelope(obj: Any) -> bytes:
    return json.dumps(obj).encode("utf-8")


def sig_b64(key: Ed25519PrivateKey, payload: bytes, payload_type: str = PAYLOAD_TYPE) -> str:
    return base64.b64encode(key.sign(pae(payload_type, payload))).decode()


def envelope_with(**fields: Any) -> bytes:
    """The good payload's envelope signed by K1, fields then overridden (``None`` removes one)."""
    good = payload_of(manifest_obj())
    env: dict[str, Any] = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(good).decode(),
        "signatures": [{"keyid": P1.keyid, "sig": sig_b64(K1, good)}],
    }
    for name, value in fields.items():
        if value is None:
            env.pop(name)
        else:
            env[name] = value
    return raw_envelope(env)


def verify(
    data: bytes,
    trusted: tuple[PublicKey, ...] = (P1,),
    threshold: int = 1,
    now: datetime = NOW,
    trust: TrustState = NO_TRUST,
    platform: str | None = "linux-amd64",
    manifest_url: str | None = SERVED_FROM,
    binary_origins: tuple[str, ...] = (),
) -> m.Manifest:
    return verify_manifest(
        data,
        trusted=trusted,
        threshold=threshold,
        now=now,
        trust=trust,
        platform=platform,
        manifest_url=manifest_url,
        binary_origins=binary_origins,
    )


def outcome(data: bytes, **kw: Any) -> str:
    """The error code, or "ok"."""
    try:
        verify(data, **kw)
    except ManifestError as exc:
        return exc.code
    return "ok"


GOOD_PAYLOAD = payload_of(manifest_obj())
GOOD = signed(GOOD_PAYLOAD)


def test_a_valid_envelope_verifies_and_parses() -> None:
    manifest = verify(GOOD)
    assert manifest.serial == 42
    assert manifest.version == "0.1.44"
    assert manifest.binaries["linux-amd64"].sha256 == SHA_A
    assert manifest.raw == GOOD_PAYLOAD
    assert manifest.digest == hashlib.sha256(GOOD_PAYLOAD).hexdigest()


def test_error_codes_are_the_contracts_list() -> None:
    # DESIGN section 7, `check`: the codes of a rejected manifest.
    assert ERROR_CODES == (
        "too_large",
        "malformed_envelope",
        "wrong_payload_type",
        "signature_invalid",
        "threshold_not_met",
        "malformed_manifest",
        "expired",
        "serial_rollback",
        "bad_url",
        "no_binary_for_platform",
    )
    subclasses = {cls.code for cls in ManifestError.__subclasses__()}
    assert subclasses == set(ERROR_CODES)


# ---------------------------------------------------------------- PAE


def test_pae_matches_the_dsse_spec_example() -> None:
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters() -> None:
    assert pae("t\u00e9", "\u00fc".encode()) == b"DSSEv1 3 t\xc3\xa9 2 \xc3\xbc"
    assert pae(PAYLOAD_TYPE, b"") == b"DSSEv1 35 application/vnd.avika.manifest+json 0 "


def test_the_signature_covers_pae_not_the_bare_payload() -> None:
    bare = base64.b64encode(K1.sign(GOOD_PAYLOAD)).decode()
    data = envelope_with(signatures=[{"keyid": P1.keyid, "sig": bare}])
    assert outcome(data) == "signature_invalid"


# ---------------------------------------------------------------- envelope rules

PAYLOAD_B64 = base64.b64encode(GOOD_PAYLOAD).decode()
GOOD_SIG = {"keyid": P1.keyid, "sig": sig_b64(K1, GOOD_PAYLOAD)}
# A real signature of these bytes by a key nobody trusts, naming the trusted key: each entry costs a
# full verification per trusted key (arbitrary bytes are often refused early, as a bad scalar).
JUNK_SIG = {"keyid": P1.keyid, "sig": sig_b64(OUTSIDER, GOOD_PAYLOAD)}

ENVELOPE_CASES = [
    pytest.param(GOOD, "ok", id="a signed envelope is accepted"),
    pytest.param(
        GOOD + b" " * (MAX_ENVELOPE_BYTES - len(GOOD)), "ok", id="an envelope of exactly 1 MiB is accepted"
    ),
    pytest.param(
        GOOD + b" " * (MAX_ENVELOPE_BYTES + 1 - len(GOOD)),
        "too_large",
        id="an envelope over 1 MiB is too large",
    ),
    pytest.param(b"x" * (MAX_ENVELOPE_BYTES + 1), "too_large", id="unsigned garbage over 1 MiB is too large"),
    pytest.param(b"", "malformed_envelope", id="an empty body is malformed"),
    pytest.param(b"not json", "malformed_envelope", id="a body that is not JSON is malformed"),
    pytest.param(b"\xff\xfe{}", "malformed_envelope", id="a body that is not UTF-8 is malformed"),
    pytest.param(GOOD[: len(GOOD) // 2], "malformed_envelope", id="a truncated envelope is malformed"),
    pytest.param(b"[]", "malformed_envelope", id="an envelope that is a list is malformed"),
    pytest.param(b'"payload"', "malformed_envelope", id="an envelope that is a string is malformed"),
    pytest.param(
        GOOD.replace(b'"payloadType"', b'"payloadType": "x", "payloadType"', 1),
        "malformed_envelope",
        id="an envelope with a duplicate key is malformed",
    ),
    pytest.param(envelope_with(payload=None), "malformed_envelope", id="a missing payload is malformed"),
    pytest.param(envelope_with(payload=123), "malformed_envelope", id="a numeric payload is malformed"),
    pytest.param(
        envelope_with(payload="not base64!"),
        "malformed_envelope",
        id="a payload that is not base64 is malformed",
    ),
    pytest.param(
        envelope_with(payload=PAYLOAD_B64[:-1] + "+_"),
        "malformed_envelope",
        id="a payload mixing both base64 alphabets is malformed",
    ),
    pytest.param(
        envelope_with(payloadType=None), "malformed_envelope", id="a missing payloadType is malformed"
    ),
    pytest.param(envelope_with(signatures=None), "malformed_envelope", id="missing signatures are malformed"),
    pytest.param(
        envelope_with(signatures=GOOD_SIG),
        "malformed_envelope",
        id="signatures that are not a list are malformed",
    ),
    pytest.param(
        envelope_with(signatures=["sig"]),
        "malformed_envelope",
        id="a signature that is not an object is malformed",
    ),
    pytest.param(
        envelope_with(signatures=[{"keyid": P1.keyid}]),
        "malformed_envelope",
        id="a signature without sig is malformed",
    ),
    pytest.param(
        envelope_with(signatures=[{"sig": 5}]), "malformed_envelope", id="a numeric sig is malformed"
    ),
    pytest.param(
        envelope_with(signatures=[{"sig": "*** not base64 ***"}]),
        "malformed_envelope",
        id="a sig that is not base64 is malformed",
    ),
    pytest.param(
        envelope_with(signatures=[{**GOOD_SIG, "keyid": 7}]),
        "malformed_envelope",
        id="a numeric keyid is malformed",
    ),
    pytest.param(
        envelope_with(signatures=[GOOD_SIG, {"sig": "!"}]),
        "malformed_envelope",
        id="one bad sig among good ones is malformed",
    ),
    pytest.param(
        envelope_with(payloadType="application/json"),
        "wrong_payload_type",
        id="another payload type is refused",
    ),
    pytest.param(
        envelope_with(payloadType=PAYLOAD_TYPE.upper()),
        "wrong_payload_type",
        id="the payload type is compared case-sensitively",
    ),
    pytest.param(
        envelope_with(payloadType=PAYLOAD_TYPE + " "),
        "wrong_payload_type",
        id="the payload type is compared exactly",
    ),
    pytest.param(
        signed(GOOD_PAYLOAD, OUTSIDER), "signature_invalid", id="a signature by an untrusted key is invalid"
    ),
    pytest.param(
        envelope_with(payload=base64.b64encode(GOOD_PAYLOAD.replace(b"42", b"43", 1)).decode()),
        "signature_invalid",
        id="a tampered payload byte invalidates the signature",
    ),
    pytest.param(
        envelope_with(
            signatures=[
                {
                    "sig": base64.b64encode(
                        bytes([base64.b64decode(GOOD_SIG["sig"])[0] ^ 1])
                        + base64.b64decode(GOOD_SIG["sig"])[1:]
                    ).decode()
                }
            ]
        ),
        "signature_invalid",
        id="a tampered signature is invalid",
    ),
    pytest.param(
        envelope_with(signatures=[{"sig": base64.b64encode(b"short").decode()}]),
        "signature_invalid",
        id="a signature of the wrong length is invalid",
    ),
    pytest.param(
        envelope_with(signatures=[]), "malformed_envelope", id="an empty signature list is malformed"
    ),
    pytest.param(
        envelope_with(signatures=[*[JUNK_SIG] * 15, GOOD_SIG]),
        "ok",
        id="16 entries, one of them good, are accepted",
    ),
    pytest.param(
        envelope_with(signatures=[JUNK_SIG] * 16),
        "signature_invalid",
        id="16 junk entries are verified and refused",
    ),
    pytest.param(
        envelope_with(signatures=[GOOD_SIG] * 17),
        "malformed_envelope",
        id="17 entries are malformed even when all are good",
    ),
    pytest.param(
        envelope_with(signatures=[JUNK_SIG] * 4000),
        "malformed_envelope",
        id="4000 junk entries are malformed",
    ),
    pytest.param(
        envelope_with(signatures=[{"sig": sig_b64(K1, GOOD_PAYLOAD, "application/json")}]),
        "signature_invalid",
        id="a signature made for another payload type is invalid",
    ),
]


@pytest.mark.parametrize(("data", "code"), ENVELOPE_CASES)
def test_envelope_rule(data: bytes, code: str) -> None:
    assert outcome(data) == code


def test_a_verifier_never_checks_a_signature_of_an_envelope_with_too_many_entries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # DESIGN section 2: "a verifier never does unbounded work". Counted on the real verify.
    calls = []
    real = PublicKey.verify

    def counting(self: PublicKey, signature: bytes, data: bytes) -> bool:
        calls.append(signature)
        return real(self, signature, data)

    monkeypatch.setattr(PublicKey, "verify", counting)
    assert outcome(envelope_with(signatures=[JUNK_SIG] * 4000), trusted=(P1, P2, P3)) == "malformed_envelope"
    assert calls == []
    assert outcome(envelope_with(signatures=[JUNK_SIG] * 16), trusted=(P1, P2, P3)) == "signature_invalid"
    assert len(calls) == 16 * 3  # the most a refused envelope can cost: entries x trusted keys


def test_no_trusted_keys_means_no_signature_verifies() -> None:
    assert outcome(GOOD, trusted=()) == "signature_invalid"


def test_threshold_below_one_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        verify_envelope(GOOD, [P1], threshold=0)


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(base64.b64encode, id="standard"),
        pytest.param(base64.urlsafe_b64encode, id="url-safe"),
        pytest.param(lambda b: base64.b64encode(b).rstrip(b"="), id="standard unpadded"),
        pytest.param(lambda b: base64.urlsafe_b64encode(b).rstrip(b"="), id="url-safe unpadded"),
    ],
)
def test_payload_and_signature_may_use_either_base64_alphabet(encode: Any) -> None:
    payload = payload_of(manifest_obj(changelog="~~~ ??? >>>"))
    assert b"+" in base64.b64encode(payload) or b"/" in base64.b64encode(payload)
    sig = K1.sign(pae(PAYLOAD_TYPE, payload))
    data = envelope_with(payload=encode(payload).decode(), signatures=[{"sig": encode(sig).decode()}])
    assert verify(data).raw == payload


def test_unknown_envelope_and_signature_fields_are_ignored() -> None:
    data = envelope_with(annotations={"ci": 1}, signatures=[{**GOOD_SIG, "comment": "release"}])
    assert verify(data).raw == GOOD_PAYLOAD


# ---------------------------------------------------------------- threshold counting


@pytest.mark.parametrize(
    ("signers", "trusted", "threshold", "code"),
    [
        pytest.param((K1, K2), (P1, P2), 2, "ok", id="two distinct trusted keys meet a threshold of two"),
        pytest.param(
            (K1,), (P1, P2, P3), 2, "threshold_not_met", id="one of three keys misses a threshold of two"
        ),
        pytest.param((K1, K1), (P1, P2), 2, "threshold_not_met", id="the same key signing twice counts once"),
        pytest.param(
            (K1, K1, K1), (P1, P1, P2), 2, "threshold_not_met", id="a key trusted twice still counts once"
        ),
        pytest.param(
            (K1, OUTSIDER),
            (P1, P2),
            2,
            "threshold_not_met",
            id="an untrusted key's valid signature counts zero",
        ),
        pytest.param(
            (OUTSIDER,), (P1, P2), 2, "signature_invalid", id="no trusted signature is signature_invalid"
        ),
        pytest.param(
            (OUTSIDER, K3, K1),
            (P1, P2, P3),
            2,
            "ok",
            id="two of three trusted keys plus an outsider meet two",
        ),
        pytest.param((K1, K2, K3), (P1, P2, P3), 3, "ok", id="three of three meet three"),
        pytest.param((K2,), (P1, P2), 1, "ok", id="any one trusted key meets the default threshold"),
    ],
)
def test_threshold_counts_distinct_trusted_keys(
    signers: tuple[Ed25519PrivateKey, ...], trusted: tuple[PublicKey, ...], threshold: int, code: str
) -> None:
    assert outcome(signed(GOOD_PAYLOAD, *signers), trusted=trusted, threshold=threshold) == code


def test_a_keyid_hint_naming_another_key_still_verifies() -> None:
    data = envelope_with(signatures=[{"keyid": P2.keyid, "sig": sig_b64(K1, GOOD_PAYLOAD)}])
    assert verify(data, trusted=(P1, P2)).raw == GOOD_PAYLOAD
    assert verify(data, trusted=(P1,)).raw == GOOD_PAYLOAD


def test_two_signatures_with_swapped_hints_count_for_both_keys() -> None:
    data = envelope_with(
        signatures=[
            {"keyid": P2.keyid, "sig": sig_b64(K1, GOOD_PAYLOAD)},
            {"keyid": P1.keyid, "sig": sig_b64(K2, GOOD_PAYLOAD)},
        ]
    )
    assert verify(data, trusted=(P1, P2), threshold=2).raw == GOOD_PAYLOAD


def test_duplicate_entries_with_different_hints_count_once() -> None:
    sig = sig_b64(K1, GOOD_PAYLOAD)
    data = envelope_with(signatures=[{"keyid": P1.keyid, "sig": sig}, {"keyid": P2.keyid, "sig": sig}])
    assert outcome(data, trusted=(P1, P2), threshold=2) == "threshold_not_met"


# ---------------------------------------------------------------- payload rules


MALFORMED_PAYLOADS = [
    pytest.param(b"", id="an empty payload"),
    pytest.param(b"serial: 42", id="a payload that is not JSON"),
    pytest.param(b"[1, 2]", id="a payload that is a list"),
    pytest.param(b"null", id="a payload that is null"),
    pytest.param(GOOD_PAYLOAD.replace(b'"0.1.44"', b'"0.1.\xff44"'), id="a payload that is not UTF-8"),
    pytest.param(GOOD_PAYLOAD.replace(b'"serial":42', b'"serial":41,"serial":42'), id="a duplicate key"),
    pytest.param(
        GOOD_PAYLOAD.replace(b'"size":100', b'"size":100,"size":100'), id="a duplicate key in a binary entry"
    ),
    pytest.param(GOOD_PAYLOAD.replace(b'"serial":42', b'"serial":42.0'), id="a float serial"),
    pytest.param(GOOD_PAYLOAD.replace(b'"size":100', b'"size":1e2'), id="an exponent size"),
    pytest.param(GOOD_PAYLOAD.replace(b'"size":100', b'"size":NaN'), id="NaN"),
    pytest.param(GOOD_PAYLOAD.replace(b'"size":100', b'"size":Infinity'), id="Infinity"),
    pytest.param(GOOD_PAYLOAD.replace(b'"size":100', b'"size":-Infinity'), id="minus Infinity"),
    pytest.param(payload_of(manifest_obj(serial=True)), id="a bool for the serial"),
    pytest.param(payload_of(manifest_obj(schema=True)), id="a bool for the schema"),
    pytest.param(payload_of(with_binary(size=True)), id="a bool for a size"),
    pytest.param(payload_of(manifest_obj(serial="42")), id="a string serial"),
    pytest.param(payload_of(manifest_obj(serial=-1)), id="a negative serial"),
    pytest.param(payload_of(manifest_obj(serial=1 << 63)), id="a serial beyond int64"),
    pytest.param(payload_of(manifest_obj(serial=None)), id="a null serial"),
    pytest.param(payload_of(manifest_obj(schema=2)), id="an unknown schema"),
    pytest.param(payload_of(manifest_obj(schema=0)), id="schema zero"),
    pytest.param(payload_of(manifest_obj(schema="1")), id="a string schema"),
    *[
        pytest.param(payload_of(without(manifest_obj(), name)), id=f"a missing {name}")
        for name in ("schema", "serial", "version", "released_at", "expires", "binaries")
    ],
    pytest.param(payload_of(manifest_obj(version="not a version")), id="a version that is not PEP 440"),
    pytest.param(payload_of(manifest_obj(version="")), id="an empty version"),
    pytest.param(payload_of(manifest_obj(version=44)), id="a numeric version"),
    pytest.param(payload_of(manifest_obj(min_version="latest")), id="a min_version that is not PEP 440"),
    pytest.param(payload_of(manifest_obj(released_at="yesterday")), id="a released_at that is not a time"),
    pytest.param(payload_of(manifest_obj(expires="2026-03-17")), id="an expires without a time"),
    pytest.param(payload_of(manifest_obj(expires="2026-03-17T20:00:00")), id="an expires without an offset"),
    pytest.param(payload_of(manifest_obj(expires="2026-02-30T20:00:00Z")), id="an expires on February 30"),
    pytest.param(payload_of(manifest_obj(expires="2026-03-17T20:00:00+24:00")), id="an offset of 24 hours"),
    pytest.param(payload_of(manifest_obj(expires=1773777600)), id="an expires as epoch seconds"),
    pytest.param(payload_of(manifest_obj(binaries=[])), id="binaries as a list"),
    pytest.param(
        payload_of(manifest_obj(binaries={"linux-amd64": "url"})), id="a binary entry that is a string"
    ),
    pytest.param(payload_of(manifest_obj(binaries={"Linux AMD64": {}})), id="a platform name with a space"),
    pytest.param(
        payload_of(manifest_obj(binaries={"linux-amd64\n": manifest_obj()["binaries"]["linux-amd64"]})),
        id="a platform name with a trailing newline",
    ),
    pytest.param(payload_of(with_binary(sha256="a" * 63)), id="a sha256 of 63 digits"),
    pytest.param(payload_of(with_binary(sha256="A" * 64)), id="an uppercase sha256"),
    pytest.param(payload_of(with_binary(sha256="g" * 64)), id="a sha256 that is not hex"),
    pytest.param(payload_of(with_binary(sha256="a" * 64 + "\n")), id="a sha256 with a trailing newline"),
    pytest.param(payload_of(with_binary(size=-1)), id="a negative size"),
    pytest.param(payload_of(with_binary(size=0)), id="a zero size"),
    pytest.param(payload_of(with_binary(size="100")), id="a string size"),
    pytest.param(
        payload_of(manifest_obj(binaries={"linux-amd64": {"sha256": SHA_A, "size": 1}})),
        id="a binary without url",
    ),
    pytest.param(payload_of(with_binary(url=7)), id="a numeric url"),
    pytest.param(payload_of(manifest_obj(rollout={"percent": 101})), id="a rollout percent of 101"),
    pytest.param(payload_of(manifest_obj(rollout={"percent": -1})), id="a negative rollout percent"),
    pytest.param(payload_of(manifest_obj(rollout={"percent": True})), id="a bool rollout percent"),
    pytest.param(payload_of(manifest_obj(rollout={"salt": 5})), id="a numeric rollout salt"),
    pytest.param(payload_of(manifest_obj(rollout=50)), id="a rollout that is a number"),
    pytest.param(payload_of(manifest_obj(downgrade=1)), id="a downgrade of 1"),
    pytest.param(payload_of(manifest_obj(downgrade="false")), id="a downgrade string"),
    pytest.param(payload_of(manifest_obj(changelog=["a"])), id="a changelog list"),
    pytest.param(payload_of(manifest_obj(container_image=1)), id="a numeric container_image"),
    pytest.param(payload_of(manifest_obj(reports_url={})), id="a reports_url object"),
]


@pytest.mark.parametrize("payload", MALFORMED_PAYLOADS)
def test_payload_off_the_schema_is_malformed_manifest(payload: bytes) -> None:
    assert outcome(signed(payload)) == "malformed_manifest"
    with pytest.raises(m.MalformedManifest):
        parse_manifest(payload)


OPTIONAL_FIELDS = (
    "container_image",
    "container_digest",
    "min_version",
    "changelog",
    "rollout",
    "downgrade",
    "reports_url",
    "signed_at",
    "rollout_plan",
)


def _optional_values(manifest: m.Manifest) -> tuple[Any, ...]:
    return tuple(getattr(manifest, name) for name in OPTIONAL_FIELDS)


DEFAULTS = (None, None, None, "", m.Rollout(percent=100, salt=""), False, None, None, None)


def test_optional_fields_take_their_defaults() -> None:
    assert _optional_values(parse_manifest(GOOD_PAYLOAD)) == DEFAULTS


def test_null_optional_fields_take_their_defaults() -> None:
    manifest = parse_manifest(payload_of(manifest_obj(**dict.fromkeys(OPTIONAL_FIELDS))))
    assert _optional_values(manifest) == DEFAULTS


def test_partial_rollout_fills_the_missing_half() -> None:
    assert parse_manifest(payload_of(manifest_obj(rollout={"percent": 5}))).rollout == m.Rollout(5, "")
    assert parse_manifest(payload_of(manifest_obj(rollout={"salt": "s"}))).rollout == m.Rollout(100, "s")


def test_unknown_payload_fields_are_ignored() -> None:
    obj = manifest_obj(future={"x": [1]}, rollout={"percent": 5, "salt": "s", "curve": "linear"})
    obj["binaries"]["linux-amd64"]["signature"] = "abc"
    manifest = verify(signed(payload_of(obj)))
    assert manifest.rollout == m.Rollout(5, "s")
    assert manifest.binaries["linux-amd64"] == m.Binary(obj["binaries"]["linux-amd64"]["url"], SHA_A, 100)


def test_every_field_is_read() -> None:
    obj = manifest_obj(
        container_image="hellodk/avika-agent:0.1.44",
        min_version="0.1.40",
        changelog="Fixed WAL directory creation",
        rollout={"percent": 25, "salt": "0.1.44"},
        downgrade=True,
        reports_url="https://reports.example.com/v1/reports",
        container_digest="sha256:" + "0123456789abcdef" * 4,
        signed_at="2026-02-20T08:30:00Z",
        rollout_plan={"steps": [1, 10, 50, 100], "soak": "2h", "max_failure_rate": "0.05", "min_agents": 20},
    )
    manifest = verify(signed(payload_of(obj)))
    assert set(obj) == set(manifest.to_dict())  # every field of the contract is in the test
    assert manifest.to_dict() == {
        **obj,
        "binaries": {k: dict(v) for k, v in sorted(obj["binaries"].items())},
    }
    assert manifest.signed_at == datetime(2026, 2, 20, 8, 30, tzinfo=timezone.utc)
    assert manifest.rollout_plan == m.RolloutPlan(steps=(1, 10, 50, 100), soak="2h", max_failure_rate="0.05")
    assert manifest.rollout_plan.soak_seconds == 7200


DIGEST = "sha256:" + "0123456789abcdef" * 4
PLAN = {"steps": [1, 10, 50, 100], "soak": "2h", "max_failure_rate": "0.05", "min_agents": 20}


def plan(**changes: Any) -> dict[str, Any]:
    return {**PLAN, **changes}


# DESIGN section 2: the optional fields the controller and `progress` read. Agents parse them
# strictly (decide nothing from them): every confusion of types a JSON writer can make is refused.
NEW_FIELD_CASES = [
    # -- container_digest: sha256:<64 lowercase hex>
    pytest.param({"container_digest": DIGEST}, "ok", id="digest: sha256 and 64 hex"),
    pytest.param({"container_digest": DIGEST.upper()}, "malformed_manifest", id="digest: upper case"),
    pytest.param({"container_digest": DIGEST[7:]}, "malformed_manifest", id="digest: without sha256:"),
    pytest.param({"container_digest": DIGEST[:-1]}, "malformed_manifest", id="digest: 63 hex"),
    pytest.param({"container_digest": DIGEST + "0"}, "malformed_manifest", id="digest: 65 hex"),
    pytest.param({"container_digest": DIGEST + "\n"}, "malformed_manifest", id="digest: trailing newline"),
    pytest.param({"container_digest": "sha512:" + "0" * 64}, "malformed_manifest", id="digest: sha512"),
    pytest.param({"container_digest": "sha256:" + "g" * 64}, "malformed_manifest", id="digest: not hex"),
    pytest.param(
        {"container_digest": "hellodk/avika-agent@" + DIGEST}, "malformed_manifest", id="digest: a ref"
    ),
    pytest.param({"container_digest": True}, "malformed_manifest", id="digest: a bool"),
    pytest.param({"container_digest": ["sha256:"]}, "malformed_manifest", id="digest: a list"),
    # -- signed_at: RFC 3339 with an offset
    pytest.param({"signed_at": "2026-02-20T08:30:00Z"}, "ok", id="signed_at: UTC"),
    pytest.param({"signed_at": "2026-02-20T10:30:00.5+02:00"}, "ok", id="signed_at: offset and fraction"),
    pytest.param({"signed_at": "2026-02-20"}, "malformed_manifest", id="signed_at: a date"),
    pytest.param({"signed_at": "2026-02-20T08:30:00"}, "malformed_manifest", id="signed_at: no offset"),
    pytest.param({"signed_at": "yesterday"}, "malformed_manifest", id="signed_at: words"),
    pytest.param({"signed_at": 1771576200}, "malformed_manifest", id="signed_at: epoch seconds"),
    pytest.param({"signed_at": False}, "malformed_manifest", id="signed_at: a bool"),
    pytest.param({"signed_at": ""}, "malformed_manifest", id="signed_at: empty"),
    # -- rollout_plan
    pytest.param({"rollout_plan": PLAN}, "ok", id="plan: the contract's example"),
    pytest.param({"rollout_plan": plan(steps=[100])}, "ok", id="plan: one step at 100"),
    pytest.param({"rollout_plan": plan(steps=list(range(1, 101)))}, "ok", id="plan: 100 steps"),
    pytest.param({"rollout_plan": plan(soak="1h30m", min_agents=0)}, "ok", id="plan: 1h30m, min_agents 0"),
    pytest.param({"rollout_plan": plan(max_failure_rate="0")}, "ok", id="plan: rate 0"),
    pytest.param({"rollout_plan": plan(max_failure_rate="1.0")}, "ok", id="plan: rate 1.0"),
    pytest.param({"rollout_plan": plan(soak="365d")}, "ok", id="plan: a soak of a year"),
    pytest.param({"rollout_plan": {**PLAN, "future": 1}}, "ok", id="plan: unknown fields ignored"),
    pytest.param({"rollout_plan": [1, 10, 100]}, "malformed_manifest", id="plan: a list"),
    pytest.param({"rollout_plan": "1,10,100"}, "malformed_manifest", id="plan: a string"),
    pytest.param({"rollout_plan": {}}, "malformed_manifest", id="plan: empty"),
    *[
        pytest.param(
            {"rollout_plan": {k: v for k, v in PLAN.items() if k != name}},
            "malformed_manifest",
            id=f"plan: no {name}",
        )
        for name in PLAN
    ],
    pytest.param({"rollout_plan": plan(steps=[])}, "malformed_manifest", id="plan: no steps"),
    pytest.param(
        {"rollout_plan": plan(steps=[10, 10, 100])}, "malformed_manifest", id="plan: a repeated step"
    ),
    pytest.param({"rollout_plan": plan(steps=[50, 10, 100])}, "malformed_manifest", id="plan: decreasing"),
    pytest.param(
        {"rollout_plan": plan(steps=[1, 10, 50])}, "malformed_manifest", id="plan: not ending at 100"
    ),
    pytest.param({"rollout_plan": plan(steps=[0, 10, 100])}, "malformed_manifest", id="plan: a step of 0"),
    pytest.param({"rollout_plan": plan(steps=[1, 101])}, "malformed_manifest", id="plan: a step of 101"),
    pytest.param({"rollout_plan": plan(steps=[-1, 100])}, "malformed_manifest", id="plan: a negative step"),
    pytest.param({"rollout_plan": plan(steps=[True, 100])}, "malformed_manifest", id="plan: a bool step"),
    pytest.param({"rollout_plan": plan(steps=["10", "100"])}, "malformed_manifest", id="plan: string steps"),
    pytest.param({"rollout_plan": plan(steps=100)}, "malformed_manifest", id="plan: steps a number"),
    pytest.param({"rollout_plan": plan(soak=7200)}, "malformed_manifest", id="plan: soak as seconds"),
    pytest.param({"rollout_plan": plan(soak="2 hours")}, "malformed_manifest", id="plan: soak in words"),
    pytest.param({"rollout_plan": plan(soak=" 2h")}, "malformed_manifest", id="plan: soak with a space"),
    pytest.param({"rollout_plan": plan(soak="2H")}, "malformed_manifest", id="plan: soak unit in capitals"),
    pytest.param({"rollout_plan": plan(soak="1.5h")}, "malformed_manifest", id="plan: soak with a fraction"),
    pytest.param({"rollout_plan": plan(soak="")}, "malformed_manifest", id="plan: an empty soak"),
    pytest.param({"rollout_plan": plan(soak="366d")}, "malformed_manifest", id="plan: a soak over a year"),
    pytest.param({"rollout_plan": plan(soak="1234567890s")}, "malformed_manifest", id="plan: 10 digits"),
    pytest.param({"rollout_plan": plan(soak=True)}, "malformed_manifest", id="plan: a bool soak"),
    pytest.param({"rollout_plan": plan(max_failure_rate=0)}, "malformed_manifest", id="plan: rate the int 0"),
    pytest.param({"rollout_plan": plan(max_failure_rate=1)}, "malformed_manifest", id="plan: rate the int 1"),
    pytest.param({"rollout_plan": plan(max_failure_rate=True)}, "malformed_manifest", id="plan: rate a bool"),
    pytest.param(
        {"rollout_plan": plan(max_failure_rate="1.5")}, "malformed_manifest", id="plan: rate over 1"
    ),
    pytest.param({"rollout_plan": plan(max_failure_rate="-0.05")}, "malformed_manifest", id="plan: rate < 0"),
    pytest.param({"rollout_plan": plan(max_failure_rate=".05")}, "malformed_manifest", id="plan: rate .05"),
    pytest.param({"rollout_plan": plan(max_failure_rate="0.")}, "malformed_manifest", id="plan: rate 0."),
    pytest.param({"rollout_plan": plan(max_failure_rate="5e-2")}, "malformed_manifest", id="plan: rate 5e-2"),
    pytest.param({"rollout_plan": plan(max_failure_rate="5%")}, "malformed_manifest", id="plan: rate 5%"),
    pytest.param({"rollout_plan": plan(max_failure_rate="0,05")}, "malformed_manifest", id="plan: rate 0,05"),
    pytest.param(
        {"rollout_plan": plan(max_failure_rate=" 0.05")}, "malformed_manifest", id="plan: rate space"
    ),
    pytest.param({"rollout_plan": plan(max_failure_rate="NaN")}, "malformed_manifest", id="plan: rate NaN"),
    pytest.param(
        {"rollout_plan": plan(max_failure_rate="0.0000001")}, "malformed_manifest", id="plan: rate 7 decimals"
    ),
    pytest.param(
        {"rollout_plan": plan(min_agents="20")}, "malformed_manifest", id="plan: min_agents a string"
    ),
    pytest.param({"rollout_plan": plan(min_agents=True)}, "malformed_manifest", id="plan: min_agents a bool"),
    pytest.param({"rollout_plan": plan(min_agents=-1)}, "malformed_manifest", id="plan: min_agents < 0"),
    pytest.param({"rollout_plan": plan(min_agents=None)}, "malformed_manifest", id="plan: min_agents null"),
]


@pytest.mark.parametrize(("fields", "code"), NEW_FIELD_CASES)
def test_container_digest_signed_at_and_rollout_plan_are_parsed_strictly(
    fields: dict[str, Any], code: str
) -> None:
    assert outcome(signed(payload_of(manifest_obj(**fields)))) == code


def test_floats_in_a_rollout_plan_are_refused_by_strict_json() -> None:
    # max_failure_rate is a decimal *string*: the payload has no floats anywhere (DESIGN section 2).
    payload = payload_of(manifest_obj(rollout_plan=PLAN)).replace(b'"0.05"', b"0.05")
    assert b'"max_failure_rate":0.05' in payload
    assert outcome(signed(payload)) == "malformed_manifest"
    payload = payload_of(manifest_obj(rollout_plan=plan(steps=[1, 100]))).replace(b"[1,100]", b"[1.0,100]")
    assert outcome(signed(payload)) == "malformed_manifest"


def test_a_plan_and_a_halt_together_are_still_a_valid_manifest() -> None:
    # A halted release keeps its plan (progress says "halted"); the agent decides nothing from it.
    manifest = verify(
        signed(payload_of(manifest_obj(rollout={"percent": 0, "salt": "s"}, rollout_plan=PLAN)))
    )
    assert manifest.rollout.halted
    assert manifest.rollout_plan is not None and manifest.rollout_plan.steps == (1, 10, 50, 100)


MAX_SERIAL = (1 << 53) - 1


@pytest.mark.parametrize(
    ("serial", "code"),
    [
        pytest.param(1, "ok", id="serial 1 is the lowest"),
        pytest.param(MAX_SERIAL, "ok", id="2^53-1 is the highest (exact as a JSON double)"),
        pytest.param(0, "malformed_manifest", id="serial 0 is malformed"),
        pytest.param(MAX_SERIAL + 1, "malformed_manifest", id="2^53 is malformed"),
        pytest.param(
            9223372036854775806,
            "malformed_manifest",
            id="the lock-out serial 2^63-2 of issue 10 is malformed",
        ),
        pytest.param((1 << 63) - 1, "malformed_manifest", id="the int64 maximum is malformed"),
    ],
)
def test_serial_is_between_1_and_2_53_minus_1(serial: int, code: str) -> None:
    assert outcome(signed(payload_of(manifest_obj(serial=serial)))) == code
    # Even an agent that never accepted anything cannot be pushed above 2^53-1.
    assert outcome(signed(payload_of(manifest_obj(serial=serial))), trust=TrustState(None, None)) == code


def test_times_with_offsets_and_fractions_are_instants() -> None:
    manifest = parse_manifest(
        payload_of(
            manifest_obj(
                released_at="2026-02-15T22:00:00.123456789+02:00", expires="2026-03-17T15:00:00-05:00"
            )
        )
    )
    assert manifest.released_at == datetime(2026, 2, 15, 20, 0, 0, 123456, tzinfo=timezone.utc)
    assert manifest.expires == datetime(2026, 3, 17, 20, 0, tzinfo=timezone.utc)


# ---------------------------------------------------------------- expiry


@pytest.mark.parametrize(
    ("expires", "code"),
    [
        pytest.param(NOW + timedelta(days=30), "ok", id="an expiry in the future is accepted"),
        pytest.param(NOW, "ok", id="an expiry of exactly now is inside the slack"),
        pytest.param(
            NOW - CLOCK_SLACK + timedelta(seconds=1), "ok", id="4 min 59 s past expiry is inside the slack"
        ),
        pytest.param(
            NOW - CLOCK_SLACK + timedelta(microseconds=1),
            "ok",
            id="one microsecond inside the slack is accepted",
        ),
        pytest.param(NOW - CLOCK_SLACK, "expired", id="exactly 5 min past expiry is expired"),
        pytest.param(
            NOW - CLOCK_SLACK - timedelta(seconds=1), "expired", id="5 min 1 s past expiry is expired"
        ),
        pytest.param(NOW - timedelta(days=365), "expired", id="a year past expiry is expired"),
    ],
)
def test_expiry_has_five_minutes_of_clock_slack(expires: datetime, code: str) -> None:
    text = expires.isoformat().replace("+00:00", "Z")
    assert outcome(signed(payload_of(manifest_obj(expires=text)))) == code


def test_an_expiry_at_the_start_of_time_is_expired_not_a_crash() -> None:
    # 0001-01-01T00:00+01:00 is year 0 in UTC: Python cannot format it, a Go agent can.
    data = signed(
        payload_of(manifest_obj(released_at="0001-01-01T00:00:00Z", expires="0001-01-01T00:00:00+01:00"))
    )
    assert outcome(data) == "expired"


def test_an_expiry_at_the_end_of_time_is_accepted() -> None:
    assert outcome(signed(payload_of(manifest_obj(expires="9999-12-31T23:59:59-01:00")))) == "ok"


# ---------------------------------------------------------------- serial


DIGEST_42 = hashlib.sha256(GOOD_PAYLOAD).hexdigest()
OTHER_42 = signed(payload_of(manifest_obj(changelog="same serial, other bytes")))


@pytest.mark.parametrize(
    ("data", "trust", "code"),
    [
        pytest.param(GOOD, TrustState(), "ok", id="a first manifest sets no bound"),
        pytest.param(GOOD, TrustState(41, "x" * 64), "ok", id="a higher serial is accepted"),
        pytest.param(
            GOOD, TrustState(42, DIGEST_42), "ok", id="the same serial with the same bytes is accepted"
        ),
        pytest.param(
            GOOD, TrustState(43, "x" * 64), "serial_rollback", id="a replayed lower serial is rejected"
        ),
        pytest.param(
            OTHER_42,
            TrustState(42, DIGEST_42),
            "serial_rollback",
            id="the same serial with other bytes is rejected",
        ),
        pytest.param(
            OTHER_42, TrustState(42, None), "ok", id="an equal serial without a recorded digest is accepted"
        ),
        pytest.param(GOOD, TrustState(0, None), "ok", id="a highest serial of zero still bounds from below"),
        pytest.param(
            signed(payload_of(manifest_obj(serial=1))),
            TrustState(2, None),
            "serial_rollback",
            id="serial one after serial two is rejected",
        ),
    ],
)
def test_serial_never_goes_back(data: bytes, trust: TrustState, code: str) -> None:
    assert outcome(data, trust=trust) == code


def test_whitespace_in_the_envelope_does_not_change_the_digest() -> None:
    respaced = raw_envelope(json.loads(GOOD))
    assert respaced != GOOD
    assert verify(respaced, trust=TrustState(42, DIGEST_42)).digest == DIGEST_42


# ---------------------------------------------------------------- URLs and platform


@pytest.mark.parametrize(
    ("url", "code"),
    [
        pytest.param("binaries/0.1.44/x/avika-agent", "ok", id="a relative path is allowed"),
        pytest.param("/updates/avika-agent", "ok", id="a root-relative path is allowed"),
        pytest.param("../shared/avika-agent", "ok", id="a dot-dot path is allowed"),
        pytest.param("../../../../a", "ok", id="dot-dot never climbs off the origin"),
        pytest.param(
            "///evil.example/a", "bad_url", id="three slashes are refused: a WHATWG parser reads a host there"
        ),
        pytest.param("file:///etc/passwd", "bad_url", id="a file URL is refused"),
        pytest.param("javascript:alert(1)", "bad_url", id="a javascript URL is refused"),
        pytest.param("ftp://mirror.example.com/a", "bad_url", id="an ftp URL is refused"),
        pytest.param("data:application/octet-stream;base64,AA==", "bad_url", id="a data URL is refused"),
        pytest.param("binaries/avika agent", "bad_url", id="a URL with a space is refused"),
        pytest.param("binaries/a\nb", "bad_url", id="a URL with a newline is refused"),
        pytest.param("binaries/a\tb", "bad_url", id="a URL with a tab is refused"),
        pytest.param("binaries\\a", "bad_url", id="a URL with a backslash is refused"),
        pytest.param("binaries/a\x7f", "bad_url", id="a URL with DEL is refused"),
        pytest.param("", "bad_url", id="an empty URL is refused"),
        pytest.param("http:/avika-agent", "bad_url", id="an http URL without a host is refused"),
        pytest.param("https:avika-agent", "bad_url", id="an https URL without slashes is refused"),
        pytest.param("//", "bad_url", id="two slashes and no host are refused"),
        pytest.param("https://[::1/a", "bad_url", id="a URL that does not parse is refused"),
    ],
)
def test_binary_urls_must_be_relative_or_http(url: str, code: str) -> None:
    assert outcome(signed(payload_of(with_binary(url=url)))) == code


CDN = "https://cdn.example.net"


# (url, manifest URL, UPDATE_BINARY_ORIGINS, expected): DESIGN section 2, "every binary url must be
# relative ..., or absolute http(s) on the manifest's own origin or on an origin listed in
# UPDATE_BINARY_ORIGINS". An origin is scheme + host + port; whoever can only re-sign must never
# point the fleet at another host.
ORIGIN_CASES = [
    pytest.param("https://updates.example.com/avika/b/a", SERVED_FROM, (), "ok", id="own origin"),
    pytest.param(
        "https://updates.example.com:443/b/a", SERVED_FROM, (), "ok", id="own origin, port 443 written"
    ),
    pytest.param("HTTPS://UPDATES.Example.COM/b/a", SERVED_FROM, (), "ok", id="own origin, upper case"),
    pytest.param("//updates.example.com/b/a", SERVED_FROM, (), "ok", id="scheme-relative to the own host"),
    pytest.param(
        "http://10.0.0.1:5021/updates/a",
        "http://10.0.0.1:5021/updates/manifest.json",
        (),
        "ok",
        id="own origin, an IPv4 gateway with a port",
    ),
    pytest.param(
        "http://[2001:db8::1]:5021/u/a",
        "http://[2001:DB8::1]:5021/u/manifest.json",
        (),
        "ok",
        id="own IPv6 origin",
    ),
    pytest.param(
        "http://gw:5021/u/a", "http://gw:5021/u/manifest.json", (), "ok", id="own origin, http with its port"
    ),
    pytest.param("https://cdn.example.net/avika/a", SERVED_FROM, (CDN,), "ok", id="a CDN in BINARY_ORIGINS"),
    pytest.param("https://CDN.example.net:443/a", SERVED_FROM, (CDN,), "ok", id="the CDN, port 443 written"),
    pytest.param("//cdn.example.net/a", SERVED_FROM, (CDN,), "ok", id="scheme-relative to the allowed CDN"),
    pytest.param(
        "http://[2001:db8::7]:8080/a",
        SERVED_FROM,
        ("http://[2001:db8::7]:8080",),
        "ok",
        id="an allowed IPv6 origin",
    ),
    pytest.param("https://cdn.example.net/a", SERVED_FROM, (), "bad_url", id="another host"),
    pytest.param("https://cdn.example.net/a", None, (), "bad_url", id="no manifest URL: only relative"),
    pytest.param("https://updates.example.com:8443/a", SERVED_FROM, (), "bad_url", id="own host, other port"),
    pytest.param(
        "https://updates.example.com:80/a", SERVED_FROM, (), "bad_url", id="own host, port 80 on https"
    ),
    pytest.param("http://updates.example.com/a", SERVED_FROM, (), "bad_url", id="own host over plain http"),
    pytest.param("//mirror.example.org/a", SERVED_FROM, (), "bad_url", id="scheme-relative to another host"),
    pytest.param(
        "https://updates.example.com.evil.example/a", SERVED_FROM, (), "bad_url", id="own host as a prefix"
    ),
    pytest.param("https://evil-updates.example.com/a", SERVED_FROM, (), "bad_url", id="a look-alike host"),
    pytest.param(
        "https://updates.example.com./a", SERVED_FROM, (), "bad_url", id="own host with a trailing dot"
    ),
    pytest.param(
        "https://updates.example.com@evil.example/a",
        SERVED_FROM,
        (),
        "bad_url",
        id="userinfo: the host is evil",
    ),
    pytest.param(
        "https://updates.example.com:443@evil.example/a",
        SERVED_FROM,
        (),
        "bad_url",
        id="userinfo with a port",
    ),
    pytest.param(
        "https://evil.example@updates.example.com/a",
        SERVED_FROM,
        (),
        "bad_url",
        id="userinfo even on own host",
    ),
    pytest.param("https://a@b@updates.example.com/a", SERVED_FROM, (), "bad_url", id="two @ signs"),
    pytest.param("https://updates%2Eexample.com/a", SERVED_FROM, (), "bad_url", id="a percent-escaped host"),
    pytest.param(
        "https://updates.ex\u0430mple.com/a", SERVED_FROM, (), "bad_url", id="a non-ASCII look-alike"
    ),
    pytest.param("https://updates.example.com:/a", SERVED_FROM, (), "bad_url", id="an empty port"),
    pytest.param("https://updates.example.com:99999/a", SERVED_FROM, (), "bad_url", id="a port beyond 65535"),
    pytest.param(
        "https://updates.example.com:4x3/a", SERVED_FROM, (), "bad_url", id="a port that is not a number"
    ),
    pytest.param("http://[2001:db8::2]/a", SERVED_FROM, (), "bad_url", id="an IPv6 literal not allowed"),
    pytest.param(
        "http://[::1]:8080/a", "http://[::1]:8081/u/manifest.json", (), "bad_url", id="own IPv6, other port"
    ),
    pytest.param("http://cdn.example.net/a", SERVED_FROM, (CDN,), "bad_url", id="the CDN host over http"),
    pytest.param(
        "https://cdn.example.net:8443/a", SERVED_FROM, (CDN,), "bad_url", id="the CDN host, other port"
    ),
    pytest.param(
        "https://img.cdn.example.net/a", SERVED_FROM, (CDN,), "bad_url", id="a subdomain of the CDN"
    ),
]


@pytest.mark.parametrize(("url", "served_from", "origins", "code"), ORIGIN_CASES)
def test_absolute_binary_urls_stay_on_the_manifests_origin_or_an_allowed_one(
    url: str, served_from: str | None, origins: tuple[str, ...], code: str
) -> None:
    data = signed(payload_of(with_binary(url=url)))
    assert outcome(data, manifest_url=served_from, binary_origins=origins) == code


def test_a_bad_url_names_the_url_and_the_allowed_origins() -> None:
    data = signed(payload_of(with_binary(url="https://evil.example/a")))
    with pytest.raises(m.BadUrl) as caught:
        verify(data, binary_origins=(CDN,))
    assert "https://evil.example/a" in caught.value.message
    assert "https://updates.example.com" in caught.value.message and CDN in caught.value.message


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://updates.example.com/a", "https://updates.example.com"),
        ("HTTPS://Updates.Example.com:443/a", "https://updates.example.com"),
        ("http://updates.example.com:80", "http://updates.example.com"),
        ("http://updates.example.com:443", "http://updates.example.com:443"),
        ("http://[2001:DB8::1]:8080/x", "http://[2001:db8::1]:8080"),
        ("ftp://updates.example.com/", None),
        ("binaries/a", None),
        ("https://:443/", None),
        ("https://x:70000/", None),
    ],
)
def test_url_origin_is_scheme_host_and_non_default_port(url: str, origin: str | None) -> None:
    assert m.url_origin(url) == origin


def test_every_binary_url_is_checked_not_only_this_platforms() -> None:
    data = signed(payload_of(with_binary("linux-arm64", url="file:///x")))
    assert outcome(data, platform="linux-amd64") == "bad_url"
    assert outcome(data, platform=None) == "bad_url"


@pytest.mark.parametrize(
    ("binaries", "platform", "code"),
    [
        pytest.param(
            ("linux-amd64",), "linux-amd64", "ok", id="a VM agent with its platform listed is accepted"
        ),
        pytest.param(
            ("linux-amd64",), "linux-arm64", "no_binary_for_platform", id="a VM agent without its platform"
        ),
        pytest.param((), "linux-amd64", "no_binary_for_platform", id="a VM agent and no binaries at all"),
        pytest.param(("linux-amd64",), None, "ok", id="a container agent needs no binary"),
        pytest.param((), None, "ok", id="a container agent accepts an empty binaries object"),
    ],
)
def test_a_vm_agent_needs_a_binary_for_its_platform(
    binaries: tuple[str, ...], platform: str | None, code: str
) -> None:
    obj = manifest_obj()
    obj["binaries"] = {k: v for k, v in obj["binaries"].items() if k in binaries}
    assert outcome(signed(payload_of(obj)), platform=platform) == code


# ---------------------------------------------------------------- order of the rules


@pytest.mark.parametrize(
    ("data", "kw", "code"),
    [
        pytest.param(b"{" * (MAX_ENVELOPE_BYTES + 1), {}, "too_large", id="size comes before JSON"),
        pytest.param(
            signed(b"not json", OUTSIDER) + b" " * MAX_ENVELOPE_BYTES,
            {},
            "too_large",
            id="size comes before signatures",
        ),
        pytest.param(
            envelope_with(payloadType="text/plain", signatures=[{"sig": "!"}]),
            {},
            "malformed_envelope",
            id="envelope shape comes before payload type",
        ),
        pytest.param(
            signed(GOOD_PAYLOAD, OUTSIDER, payload_type="text/plain"),
            {},
            "wrong_payload_type",
            id="payload type comes before signatures",
        ),
        pytest.param(
            signed(b"not json", OUTSIDER), {}, "signature_invalid", id="signatures come before the payload"
        ),
        pytest.param(
            signed(b"not json", K1),
            {"trusted": (P1, P2), "threshold": 2},
            "threshold_not_met",
            id="the threshold comes before the payload",
        ),
        pytest.param(
            signed(payload_of(manifest_obj(schema=2, expires="2020-01-01T00:00:00Z"))),
            {},
            "malformed_manifest",
            id="schema comes before expiry",
        ),
        pytest.param(
            signed(payload_of(manifest_obj(serial=7, expires="2020-01-01T00:00:00Z"))),
            {"trust": TrustState(42, "x" * 64)},
            "expired",
            id="expiry comes before serial rollback",
        ),
        pytest.param(
            signed(payload_of({**with_binary(url="file:///x"), "serial": 7})),
            {"trust": TrustState(42, "x" * 64)},
            "serial_rollback",
            id="serial rollback comes before bad URLs",
        ),
        pytest.param(
            signed(payload_of(with_binary(url="file:///x"))),
            {"platform": "linux-riscv64"},
            "bad_url",
            id="bad URLs come before a missing platform",
        ),
    ],
)
def test_the_first_failing_rule_is_the_error(data: bytes, kw: dict[str, Any], code: str) -> None:
    assert outcome(data, **kw) == code


# ---------------------------------------------------------------- keys


def test_public_key_base64_is_the_raw_32_bytes_and_key_id_their_sha256() -> None:
    raw = K1.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert P1.raw == raw and len(raw) == 32
    assert base64.b64decode(P1.b64) == raw
    assert PublicKey.from_b64(P1.b64) == P1
    assert PublicKey.from_b64(f"  {P1.b64}\n") == P1
    assert P1.keyid == key_id(raw) == hashlib.sha256(raw).hexdigest()
    assert P1.keyid == P1.keyid.lower() and len(P1.keyid) == 64


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("not base64!", id="not base64"),
        pytest.param(base64.b64encode(b"\x01" * 31).decode(), id="31 bytes"),
        pytest.param(base64.b64encode(b"\x01" * 33).decode(), id="33 bytes"),
        pytest.param("", id="empty"),
        pytest.param(P1.b64[:-2], id="truncated"),
    ],
)
def test_a_bad_public_key_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        PublicKey.from_b64(text)


def test_public_key_lists_are_comma_separated_and_fold_duplicates() -> None:
    assert parse_public_keys(f"{P1.b64}, {P2.b64},,{P1.b64}") == [P1, P2]
    assert parse_public_keys("") == []
    with pytest.raises(ValueError):
        parse_public_keys(f"{P1.b64},nope")


def test_signed_envelopes_name_each_signer_by_key_id() -> None:
    env = json.loads(signed(GOOD_PAYLOAD, K1, K2))
    assert env["payloadType"] == PAYLOAD_TYPE
    assert base64.b64decode(env["payload"]) == GOOD_PAYLOAD
    assert [s["keyid"] for s in env["signatures"]] == [P1.keyid, P2.keyid]
    with pytest.raises(ValueError):
        sign_envelope(GOOD_PAYLOAD, [])


# ---------------------------------------------------------------- versions


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        pytest.param("0.1.9", "0.1.10", id="numeric not lexical: 0.1.9 < 0.1.10"),
        pytest.param("1.0.0rc1", "1.0.0", id="a release candidate comes before the release"),
        pytest.param("1.0.0a1", "1.0.0b1", id="alpha before beta"),
        pytest.param("1.0.0.dev0", "1.0.0a1", id="dev before alpha"),
        pytest.param("1.0.0", "1.0.0.post1", id="a post release comes after the release"),
        pytest.param("v0.1.43", "0.1.44", id="a leading v is ignored"),
        pytest.param("0.9", "0.10.0", id="missing parts are zero"),
    ],
)
def test_versions_compare_by_pep_440(lower: str, higher: str) -> None:
    assert parse_version(lower) < parse_version(higher)


@pytest.mark.parametrize(
    ("text", "normal"),
    [("v0.1.44", "0.1.44"), ("V1.2", "1.2"), ("0.1.44", "0.1.44"), ("1.0.0-rc.1", "1.0.0rc1")],
)
def test_versions_normalize_for_publishing(text: str, normal: str) -> None:
    assert normalize_version(text) == normal
    assert parse_version(text) == Version(normal)


@pytest.mark.parametrize("text", ["", "v", "latest", "1.0.0-", "1..0", "1.0 final"])
def test_an_invalid_version_does_not_parse(text: str) -> None:
    with pytest.raises(InvalidVersion):
        parse_version(text)


def test_equal_pep_440_versions_compare_equal() -> None:
    assert parse_version("1.0") == parse_version("v1.0.0")


# ---------------------------------------------------------------- URL resolution

MANIFEST_URL = "https://updates.example.com/avika/manifest.json"


@pytest.mark.parametrize(
    ("url", "resolved"),
    [
        pytest.param(
            "binaries/0.1.44/x/a",
            "https://updates.example.com/avika/binaries/0.1.44/x/a",
            id="a relative path resolves beside the manifest",
        ),
        pytest.param("https://cdn.example.net/a", "https://cdn.example.net/a", id="an absolute URL is kept"),
        pytest.param(
            "/root/a", "https://updates.example.com/root/a", id="a root-relative path keeps the host"
        ),
        pytest.param(
            "../shared/a", "https://updates.example.com/shared/a", id="dot-dot goes one directory up"
        ),
        pytest.param("../../../a", "https://updates.example.com/a", id="dot-dot never climbs above the root"),
        pytest.param("./a", "https://updates.example.com/avika/a", id="dot stays in the directory"),
        pytest.param(
            "//mirror.example.org/a", "https://mirror.example.org/a", id="scheme-relative keeps https"
        ),
    ],
)
def test_binary_urls_resolve_against_the_manifest_url(url: str, resolved: str) -> None:
    assert resolve_url(MANIFEST_URL, url) == resolved


@pytest.mark.parametrize("server", ["http://gw:5021/updates", "http://gw:5021/updates/"])
def test_the_manifest_lives_inside_the_update_server_directory(server: str) -> None:
    url = manifest_url(server)
    assert url == "http://gw:5021/updates/manifest.json"
    # Resolving against the manifest URL (not the bare directory URL) keeps /updates/.
    assert resolve_url(url, "binaries/a") == "http://gw:5021/updates/binaries/a"
