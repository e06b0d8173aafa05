#!/usr/bin/env python3
"""Generate the manifest conformance vectors (DESIGN section 2, contract).

Run from the repository root:

    .venv/bin/python tests/vectors/generate.py            # rewrites tests/vectors/ in place
    .venv/bin/python tests/vectors/generate.py --out DIR  # writes a fresh copy elsewhere

The output is deterministic: the Ed25519 keys are fixed seeds (RFC 8032 section 7.1 test keys plus
one derived "untrusted" key), Ed25519 signatures are deterministic, every time is fixed, and
every JSON file is written with a fixed layout. ``tests/test_manifest_vectors.py`` regenerates
the vectors into a temporary directory and requires byte-identical files, so this script and the
committed files cannot drift apart.

This script deliberately does NOT import ``agent.manifest``: it builds PAE, envelopes, FNV-1a
and the expected results on its own, so the vectors check the agent's code rather than echo it.
Only ``cryptography`` is used, for Ed25519.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

PAYLOAD_TYPE = "application/vnd.avika.manifest+json"
MAX_ENVELOPE_BYTES = 1 << 20
CLOCK_SLACK = timedelta(minutes=5)
NOW = "2026-03-01T12:00:00Z"
MANIFEST_URL = "https://updates.example.com/avika/manifest.json"
MANIFEST_DIR = MANIFEST_URL.rsplit("/", 1)[0] + "/"
VM_PLATFORM = "linux-amd64"

# name -> (32-byte seed as hex, trusted in some case, where the seed comes from)
KEY_SEEDS: dict[str, tuple[str, bool, str]] = {
    "k1": (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        True,
        "RFC 8032 section 7.1, TEST 1",
    ),
    "k2": (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        True,
        "RFC 8032 section 7.1, TEST 2",
    ),
    "k3": (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        True,
        "RFC 8032 section 7.1, TEST 3",
    ),
    "untrusted": (
        hashlib.sha256(b"avika conformance vectors: untrusted key").hexdigest(),
        False,
        'sha256("avika conformance vectors: untrusted key")',
    ),
}


# ---------------------------------------------------------------- keys and envelopes


@dataclass(frozen=True)
class Key:
    name: str
    seed_hex: str
    trusted: bool
    origin: str

    @functools.cached_property
    def private(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(self.seed_hex))

    @property
    def raw_public(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.raw_public).decode("ascii")

    @property
    def keyid(self) -> str:
        return hashlib.sha256(self.raw_public).hexdigest()


KEYS = {name: Key(name, seed, trusted, origin) for name, (seed, trusted, origin) in KEY_SEEDS.items()}


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding, written out from the spec."""
    ptype = payload_type.encode("utf-8")
    return b"".join(
        [
            b"DSSEv1",
            b" ",
            str(len(ptype)).encode(),
            b" ",
            ptype,
            b" ",
            str(len(payload)).encode(),
            b" ",
            payload,
        ]
    )


def sign(key_name: str, payload: bytes, payload_type: str = PAYLOAD_TYPE) -> bytes:
    return KEYS[key_name].private.sign(pae(payload_type, payload))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def sig_entry(key_name: str, payload: bytes, **overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"keyid": KEYS[key_name].keyid, "sig": b64(sign(key_name, payload))}
    entry.update(overrides)
    return entry


def envelope_bytes(obj: Any) -> bytes:
    """How the vectors serve an envelope: 2-space indented JSON and a final newline."""
    return json.dumps(obj, indent=2).encode("utf-8") + b"\n"


def envelope(payload: bytes, signers: tuple[str, ...] = ("k1",), payload_type: str = PAYLOAD_TYPE) -> bytes:
    return envelope_bytes(
        {
            "payloadType": payload_type,
            "payload": b64(payload),
            "signatures": [
                {"keyid": KEYS[k].keyid, "sig": b64(sign(k, payload, payload_type))} for k in signers
            ],
        }
    )


# ---------------------------------------------------------------- payloads


def fake_sha256(label: str) -> str:
    return hashlib.sha256(label.encode("utf-8")).hexdigest()


def compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def binary(platform: str, version: str = "0.1.44", size: int = 18500000) -> dict[str, Any]:
    digest = fake_sha256(f"avika-agent-{platform} {version}")
    return {"url": f"binaries/{version}/{digest}/avika-agent-{platform}", "sha256": digest, "size": size}


def minimal(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "schema": 1,
        "serial": 42,
        "version": "0.1.44",
        "released_at": "2026-02-15T20:00:00Z",
        "expires": "2026-03-17T20:00:00Z",
        "binaries": {"linux-amd64": binary("linux-amd64")},
    }
    obj.update(changes)
    return obj


def full(**changes: Any) -> dict[str, Any]:
    obj = minimal(
        binaries={
            "linux-amd64": binary("linux-amd64"),
            "linux-arm64": binary("linux-arm64", size=17800000),
        }
    )
    obj.update(
        {
            "container_image": "hellodk/avika-agent:0.1.44",
            "min_version": "0.1.40",
            "changelog": "Fixed WAL directory creation",
            "rollout": {"percent": 25, "salt": "0.1.44"},
            "downgrade": False,
            "reports_url": "https://reports.example.com/v1/reports",
            "container_digest": "sha256:" + fake_sha256("hellodk/avika-agent:0.1.44 image"),
            "signed_at": "2026-02-15T20:00:05Z",
            "rollout_plan": {
                "steps": [1, 10, 50, 100],
                "soak": "2h",
                "max_failure_rate": "0.05",
                "min_agents": 20,
            },
        }
    )
    obj.update(changes)
    return obj


def without(obj: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in names}


def replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1, (old, data)
    return data.replace(old, new)


def at(delta: timedelta) -> str:
    """A time relative to NOW, as RFC 3339 UTC."""
    moment = datetime.fromisoformat(NOW.replace("Z", "+00:00")) + delta
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def utc(text: str) -> str:
    # Six fraction digits: Python 3.9's fromisoformat takes no other count.
    text = re.sub(r"\.(\d+)", lambda m: "." + m[1][:6].ljust(6, "0"), text.replace("Z", "+00:00"))
    return datetime.fromisoformat(text).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def expected_fields(obj: dict[str, Any]) -> dict[str, Any]:
    """The manifest an agent must read from ``obj``: defaults applied, times in UTC."""
    rollout = obj.get("rollout") or {}
    return {
        "schema": obj["schema"],
        "serial": obj["serial"],
        "version": obj["version"],
        "released_at": utc(obj["released_at"]),
        "expires": utc(obj["expires"]),
        "binaries": {
            platform: {"url": entry["url"], "sha256": entry["sha256"], "size": entry["size"]}
            for platform, entry in sorted(obj["binaries"].items())
        },
        "container_image": obj.get("container_image"),
        "min_version": obj.get("min_version"),
        "changelog": obj.get("changelog", ""),
        "rollout": {"percent": rollout.get("percent", 100), "salt": rollout.get("salt", "")},
        "downgrade": obj.get("downgrade", False),
        "reports_url": obj.get("reports_url"),
        "container_digest": obj.get("container_digest"),
        "signed_at": None if obj.get("signed_at") is None else utc(obj["signed_at"]),
        "rollout_plan": expected_plan(obj.get("rollout_plan")),
    }


def expected_plan(plan: dict[str, Any] | None) -> dict[str, Any] | None:
    """The four fields of a plan, unknown ones dropped; null when there is none."""
    if plan is None:
        return None
    return {name: plan[name] for name in ("steps", "soak", "max_failure_rate", "min_agents")}


def resolved(obj: dict[str, Any], explicit: dict[str, str] | None = None) -> dict[str, str]:
    """Each binary URL resolved against MANIFEST_URL (RFC 3986); tricky ones are given explicitly."""
    out: dict[str, str] = {}
    for platform, entry in sorted(obj["binaries"].items()):
        url = entry["url"]
        if explicit and platform in explicit:
            out[platform] = explicit[platform]
        elif url.startswith(("http://", "https://")):
            assert url == url.lower(), "give mixed-case absolute URLs explicitly"
            out[platform] = url
        else:
            assert not url.startswith(("/", ".")) and ".." not in url, url
            out[platform] = MANIFEST_DIR + url
    return out


# ---------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    description: str
    envelope: bytes
    expected: dict[str, Any]
    trusted: tuple[str, ...] = ("k1",)
    threshold: int = 1
    now: str = NOW
    highest_serial: int | None = None
    digest: str | None = None
    platform: str | None = VM_PLATFORM
    binary_origins: tuple[str, ...] = ()
    tags: list[str] = field(default_factory=list)


def ok(obj: dict[str, Any], payload: bytes, urls: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "result": "ok",
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "manifest": expected_fields(obj),
        "resolved_urls": resolved(obj, urls),
    }


def error(code: str) -> dict[str, Any]:
    return {"result": "error", "error": code}


def pad_to(data: bytes, size: int) -> bytes:
    """Trailing JSON whitespace, so the envelope stays valid apart from its size."""
    assert len(data) <= size
    return data + b" " * (size - len(data))


PLAN: dict[str, Any] = {"steps": [1, 10, 50, 100], "soak": "2h", "max_failure_rate": "0.05", "min_agents": 20}
# (case suffix, what is wrong, the fields that make it wrong): every one is malformed_manifest.
PLAN_MISTAKES: list[tuple[str, str, dict[str, Any]]] = [
    ("steps_empty", "no steps", {"steps": []}),
    ("steps_not_increasing", "steps 1, 10, 10, 100 repeat a percent", {"steps": [1, 10, 10, 100]}),
    ("steps_decreasing", "steps 50, 10, 100 go down", {"steps": [50, 10, 100]}),
    ("steps_not_ending_at_100", "steps 1, 10, 50 stop short of 100", {"steps": [1, 10, 50]}),
    ("step_zero", "a step of 0 (percent 0 is a halt, not a step)", {"steps": [0, 50, 100]}),
    ("step_101", "a step of 101", {"steps": [1, 101]}),
    ("step_bool", "a step that is true", {"steps": [True, 100]}),
    ("step_string", 'steps as strings "10", "100"', {"steps": ["10", "100"]}),
    ("soak_seconds_number", "soak as the number 7200", {"soak": 7200}),
    ("soak_words", 'soak "2 hours"', {"soak": "2 hours"}),
    ("soak_space", 'soak " 2h" (no spaces)', {"soak": " 2h"}),
    ("soak_uppercase", 'soak "2H" (units are lower case)', {"soak": "2H"}),
    ("soak_over_a_year", 'soak "366d" (at most 365d)', {"soak": "366d"}),
    ("rate_number_zero", "max_failure_rate as the number 0", {"max_failure_rate": 0}),
    ("rate_bool", "max_failure_rate true", {"max_failure_rate": True}),
    ("rate_over_one", 'max_failure_rate "1.5"', {"max_failure_rate": "1.5"}),
    ("rate_negative", 'max_failure_rate "-0.05"', {"max_failure_rate": "-0.05"}),
    ("rate_no_leading_zero", 'max_failure_rate ".05"', {"max_failure_rate": ".05"}),
    ("rate_exponent", 'max_failure_rate "5e-2"', {"max_failure_rate": "5e-2"}),
    ("rate_percent", 'max_failure_rate "5%"', {"max_failure_rate": "5%"}),
    (
        "rate_seven_decimals",
        'max_failure_rate "0.0000001" (at most 6 decimals)',
        {"max_failure_rate": "0.0000001"},
    ),
    ("min_agents_string", 'min_agents "20"', {"min_agents": "20"}),
    ("min_agents_bool", "min_agents true", {"min_agents": True}),
    ("min_agents_negative", "min_agents -1", {"min_agents": -1}),
]


def build_cases() -> list[Case]:
    cases: list[Case] = []

    def add(name: str, description: str, env: bytes, expected: dict[str, Any], **kw: Any) -> None:
        cases.append(Case(name, description, env, expected, **kw))

    # ------------------------------------------------------------ accepted
    obj = minimal()
    payload = compact(obj)
    add(
        "ok_minimal_defaults",
        "Only the required fields: every optional field takes its default.",
        envelope(payload),
        ok(obj, payload),
    )
    minimal_payload = payload

    obj = full()
    payload = compact(obj)
    full_envelope = envelope(payload)
    add("ok_full", "Every field of the contract, with values.", full_envelope, ok(obj, payload))

    obj = full(
        container_image=None,
        min_version=None,
        reports_url=None,
        container_digest=None,
        signed_at=None,
        rollout_plan=None,
    )
    payload = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    add(
        "ok_publisher_canonical_nulls",
        "Sorted keys, and null for the optional container_image, min_version, reports_url,"
        " container_digest, signed_at and rollout_plan (null means the default).",
        envelope(payload),
        ok(obj, payload),
    )

    obj = minimal(
        binaries={
            "linux-amd64": binary("linux-amd64"),
            "linux-386": {**binary("linux-386"), "url": "/mirror/avika-agent-linux-386"},
            "linux-ppc64le": {**binary("linux-ppc64le"), "url": "../shared/avika-agent-linux-ppc64le"},
            "linux-s390x": {**binary("linux-s390x"), "url": "../../../../avika-agent-linux-s390x"},
            "linux-riscv64": {**binary("linux-riscv64"), "url": "./riscv64/avika-agent?x=1#frag"},
        }
    )
    payload = compact(obj)
    add(
        "ok_relative_urls",
        "Relative, root-relative and dot-dot URLs stay on the manifest's own origin; each resolves"
        " against manifest_url (RFC 3986; dot-dot never climbs above the root).",
        envelope(payload),
        ok(
            obj,
            payload,
            {
                "linux-386": "https://updates.example.com/mirror/avika-agent-linux-386",
                "linux-ppc64le": "https://updates.example.com/shared/avika-agent-linux-ppc64le",
                "linux-s390x": "https://updates.example.com/avika-agent-linux-s390x",
                "linux-riscv64": "https://updates.example.com/avika/riscv64/avika-agent?x=1#frag",
            },
        ),
    )

    obj = minimal(
        binaries={
            "linux-amd64": {**binary("linux-amd64"), "url": "https://updates.example.com/avika/b/amd64"},
            "linux-arm64": {**binary("linux-arm64"), "url": "HTTPS://UPDATES.Example.COM:443/avika/b/arm64"},
            "linux-386": {**binary("linux-386"), "url": "//updates.example.com/avika/b/386"},
        }
    )
    payload = compact(obj)
    add(
        "ok_absolute_urls_on_own_origin",
        "Absolute and scheme-relative URLs on the manifest's own origin (https://updates.example.com):"
        " scheme and host compare case-insensitively, the default port may be written.",
        envelope(payload),
        ok(
            obj,
            payload,
            {
                "linux-arm64": "https://UPDATES.Example.COM:443/avika/b/arm64",
                "linux-386": "https://updates.example.com/avika/b/386",
            },
        ),
    )

    obj = minimal(
        binaries={
            "linux-amd64": {**binary("linux-amd64"), "url": "https://cdn.example.net/avika/amd64"},
            "linux-arm64": {**binary("linux-arm64"), "url": "//cdn.example.net/avika/arm64"},
            "linux-386": {**binary("linux-386"), "url": "http://[2001:db8::7]:8080/avika/386"},
            "linux-ppc64le": {**binary("linux-ppc64le"), "url": "binaries/ppc64le"},
        }
    )
    payload = compact(obj)
    add(
        "ok_absolute_urls_on_allowed_origins",
        "URLs on origins the agent allows (binary_origins, UPDATE_BINARY_ORIGINS): a CDN, also"
        " scheme-relative, and an IPv6 literal with its port; relative URLs are still fine.",
        envelope(payload),
        ok(obj, payload, {"linux-arm64": "https://cdn.example.net/avika/arm64"}),
        binary_origins=("https://cdn.example.net", "http://[2001:db8::7]:8080"),
    )

    obj = full()
    payload = compact(obj)
    add(
        "ok_threshold_2_of_2",
        "Two trusted keys, threshold 2, both signed.",
        envelope(payload, ("k1", "k2")),
        ok(obj, payload),
        trusted=("k1", "k2"),
        threshold=2,
    )
    add(
        "ok_threshold_2_of_3_untrusted_signature_ignored",
        "Threshold 2 of 3: k1 and k3 signed, plus a valid signature by an untrusted key (counts zero).",
        envelope(payload, ("untrusted", "k1", "k3")),
        ok(obj, payload),
        trusted=("k1", "k2", "k3"),
        threshold=2,
    )
    add(
        "ok_keyid_hint_wrong",
        "k1 signed but the keyid names k2: keyid is only a hint, the signature counts for k1.",
        envelope_bytes(
            {
                "payloadType": PAYLOAD_TYPE,
                "payload": b64(payload),
                "signatures": [sig_entry("k1", payload, keyid=KEYS["k2"].keyid)],
            }
        ),
        ok(obj, payload),
        trusted=("k1", "k2"),
    )
    add(
        "ok_keyid_absent",
        "DSSE keyid is optional.",
        envelope_bytes(
            {
                "payloadType": PAYLOAD_TYPE,
                "payload": b64(payload),
                "signatures": [{"sig": b64(sign("k1", payload))}],
            }
        ),
        ok(obj, payload),
    )
    add(
        "ok_16_signatures_one_valid",
        "16 signature entries, the most allowed: 15 by the untrusted key (naming k1) and k1's own last.",
        envelope_bytes(
            {
                "payloadType": PAYLOAD_TYPE,
                "payload": b64(payload),
                "signatures": [{"keyid": KEYS["k1"].keyid, "sig": b64(sign("untrusted", payload))}] * 15
                + [sig_entry("k1", payload)],
            }
        ),
        ok(obj, payload),
    )

    obj = full(
        future_field={"nested": [1, 2, 3]},
        binaries={"linux-amd64": {**binary("linux-amd64"), "signature_url": "x.sig"}},
        rollout={"percent": 50, "salt": "s", "strategy": "linear"},
    )
    payload = compact(obj)
    add(
        "ok_unknown_fields_ignored",
        "Unknown fields in the payload, a binary entry, rollout, the envelope and a signature entry"
        " are ignored (forward compatibility).",
        envelope_bytes(
            {
                "payloadType": PAYLOAD_TYPE,
                "payload": b64(payload),
                "signatures": [sig_entry("k1", payload, comment="release 0.1.44")],
                "annotations": {"ci": "run 17"},
            }
        ),
        ok(obj, payload),
    )

    obj = full(changelog="Fixes: ~~~ ??? >>> <<< ~~")
    payload = compact(obj)
    standard = b64(payload)
    assert "+" in standard and "/" in standard, "pick a changelog whose base64 has + and /"
    add(
        "ok_url_safe_base64",
        "Payload and signature in URL-safe base64 (- and _), as DSSE allows.",
        envelope_bytes(
            {
                "payloadType": PAYLOAD_TYPE,
                "payload": base64.urlsafe_b64encode(payload).decode(),
                "signatures": [
                    {"keyid": KEYS["k1"].keyid, "sig": base64.urlsafe_b64encode(sign("k1", payload)).decode()}
                ],
            }
        ),
        ok(obj, payload),
    )

    obj = full(changelog="unpadded!")
    payload = compact(obj)
    assert len(payload) % 3 != 0, "pick a changelog that makes the payload need padding"
    add(
        "ok_unpadded_base64",
        "Payload and signature in standard base64 without = padding.",
        envelope_bytes(
            {
                "payloadType": PAYLOAD_TYPE,
                "payload": b64(payload).rstrip("="),
                "signatures": [{"keyid": KEYS["k1"].keyid, "sig": b64(sign("k1", payload)).rstrip("=")}],
            }
        ),
        ok(obj, payload),
    )

    obj = minimal()
    payload = compact(obj)
    add(
        "ok_container_needs_no_platform_binary",
        "A container agent (platform null) accepts a manifest without a binary for it.",
        envelope(payload),
        ok(obj, payload),
        platform=None,
    )
    add(
        "ok_other_platform",
        "An arm64 agent reads the same full manifest.",
        full_envelope,
        ok(full(), compact(full())),
        platform="linux-arm64",
    )

    obj = minimal(expires=at(-CLOCK_SLACK + timedelta(seconds=1)))
    payload = compact(obj)
    add(
        "ok_expired_within_slack",
        "expires is 4 min 59 s before now: inside the 5 minute clock slack.",
        envelope(payload),
        ok(obj, payload),
    )

    obj = minimal()
    payload = compact(obj)
    add(
        "ok_equal_serial_same_bytes",
        "The serial already accepted, with the very same payload bytes (a refetch).",
        envelope(payload),
        ok(obj, payload),
        highest_serial=42,
        digest=hashlib.sha256(payload).hexdigest(),
    )
    add(
        "ok_higher_serial",
        "A serial above the highest accepted.",
        envelope(payload),
        ok(obj, payload),
        highest_serial=41,
        digest=fake_sha256("some earlier payload"),
    )

    obj = full()
    payload = compact(obj)
    add(
        "ok_exactly_max_size",
        "The envelope is exactly 1 MiB (1048576 bytes, trailing whitespace): the limit is inclusive.",
        pad_to(envelope(payload), MAX_ENVELOPE_BYTES),
        ok(obj, payload),
    )

    obj = full(version="v0.1.44", min_version="V0.1.40")
    payload = compact(obj)
    add(
        "ok_leading_v_in_versions",
        "A leading v (a git tag) is ignored when versions are parsed; fields keep the text as written.",
        envelope(payload),
        ok(obj, payload),
    )

    obj = full(version="1.0.0rc1", min_version="0.1.10")
    payload = compact(obj)
    add(
        "ok_pep440_prerelease", "PEP 440 pre-release versions are valid.", envelope(payload), ok(obj, payload)
    )

    obj = minimal(released_at="2026-02-15T22:00:00+02:00", expires="2026-03-17T15:00:00-05:00")
    payload = compact(obj)
    add(
        "ok_time_offsets",
        "RFC 3339 times with numeric offsets; expected times are the same instants in UTC.",
        envelope(payload),
        ok(obj, payload),
    )

    obj = minimal(serial=(1 << 53) - 1)
    payload = compact(obj)
    add(
        "ok_serial_max",
        "The largest serial is 2^53-1 (exact as a double, so every JSON reader agrees).",
        envelope(payload),
        ok(obj, payload),
    )
    obj = minimal(serial=1)
    payload = compact(obj)
    add("ok_serial_min", "The smallest serial is 1.", envelope(payload), ok(obj, payload))

    obj = minimal(
        container_digest="sha256:" + fake_sha256("image"),
        signed_at="2026-02-15T22:00:05.25+02:00",
        rollout_plan={
            "steps": [100],
            "soak": "1h30m",
            "max_failure_rate": "1.0",
            "min_agents": 0,
            "next": "x",
        },
    )
    payload = compact(obj)
    add(
        "ok_digest_signed_at_and_plan",
        "container_digest, signed_at with an offset and a fraction (expected in UTC, whole seconds), and a"
        " one-step plan with an unknown field (ignored); agents parse these and decide nothing from them.",
        envelope(payload),
        ok(obj, payload),
    )

    obj = full(rollout={"percent": 0, "salt": "0.1.44"})
    payload = compact(obj)
    add(
        "ok_halted_with_plan",
        "A halted release (percent 0) keeps its plan: still a valid manifest.",
        envelope(payload),
        ok(obj, payload),
    )

    obj = minimal(changelog="Unicode: ü, 日本語, emoji \U0001f680", rollout={"percent": 0, "salt": "é"})
    payload = compact(obj)
    add(
        "ok_utf8_text_and_halted_rollout",
        "Non-ASCII UTF-8 strings; rollout percent 0 (a halted release) is still a valid manifest.",
        envelope(payload),
        ok(obj, payload),
    )

    # ------------------------------------------------------------ too_large
    add(
        "too_large_signed_envelope",
        "A validly signed envelope padded with whitespace to 1 MiB + 1 byte.",
        pad_to(full_envelope, MAX_ENVELOPE_BYTES + 1),
        error("too_large"),
    )

    # ------------------------------------------------------------ malformed_envelope
    add(
        "malformed_envelope_not_json",
        "The body is not JSON.",
        b"this is not json\n",
        error("malformed_envelope"),
    )
    add(
        "malformed_envelope_truncated",
        "A valid envelope cut in half.",
        full_envelope[: len(full_envelope) // 2],
        error("malformed_envelope"),
    )
    add(
        "malformed_envelope_not_an_object",
        "The body is a JSON array.",
        envelope_bytes([PAYLOAD_TYPE, b64(minimal_payload)]),
        error("malformed_envelope"),
    )
    add(
        "malformed_envelope_payload_not_base64",
        "payload is not base64.",
        envelope_bytes(
            {
                "payloadType": PAYLOAD_TYPE,
                "payload": "this is not base64!",
                "signatures": [sig_entry("k1", minimal_payload)],
            }
        ),
        error("malformed_envelope"),
    )
    noncanonical = b64(minimal_payload)
    assert noncanonical.endswith("=") and not noncanonical.endswith("==")
    last = noncanonical[-2]  # the last data character carries 2 unused bits: set one
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    noncanonical = noncanonical[:-2] + alphabet[alphabet.index(last) | 1] + "="
    add(
        "malformed_envelope_payload_noncanonical_base64",
        "payload base64 with non-zero padding bits (decodes to the signed bytes, but is not canonical:"
        " RFC 4648 section 3.5; Go: base64.StdEncoding.Strict()).",
        envelope_bytes(
            {
                "payloadType": PAYLOAD_TYPE,
                "payload": noncanonical,
                "signatures": [sig_entry("k1", minimal_payload)],
            }
        ),
        error("malformed_envelope"),
    )
    add(
        "malformed_envelope_payload_missing",
        "No payload field.",
        envelope_bytes({"payloadType": PAYLOAD_TYPE, "signatures": [sig_entry("k1", minimal_payload)]}),
        error("malformed_envelope"),
    )
    add(
        "malformed_envelope_signatures_not_a_list",
        "signatures is an object, not a list.",
        envelope_bytes(
            {
                "payloadType": PAYLOAD_TYPE,
                "payload": b64(minimal_payload),
                "signatures": sig_entry("k1", minimal_payload),
            }
        ),
        error("malformed_envelope"),
    )
    add(
        "malformed_envelope_sig_not_base64",
        "A signature's sig is not base64.",
        envelope_bytes(
            {
                "payloadType": PAYLOAD_TYPE,
                "payload": b64(minimal_payload),
                "signatures": [{"keyid": KEYS["k1"].keyid, "sig": "*** not base64 ***"}],
            }
        ),
        error("malformed_envelope"),
    )

    add(
        "malformed_envelope_no_signatures",
        "An empty signatures list: 1 to 16 entries are allowed.",
        envelope_bytes({"payloadType": PAYLOAD_TYPE, "payload": b64(minimal_payload), "signatures": []}),
        error("malformed_envelope"),
    )
    add(
        "malformed_envelope_17_signatures",
        "17 signature entries (all valid, by k1): more than 16, refused before any is verified.",
        envelope_bytes(
            {
                "payloadType": PAYLOAD_TYPE,
                "payload": b64(minimal_payload),
                "signatures": [sig_entry("k1", minimal_payload)] * 17,
            }
        ),
        error("malformed_envelope"),
    )

    # ------------------------------------------------------------ wrong_payload_type
    add(
        "wrong_payload_type",
        "payloadType application/json, correctly signed for that type.",
        envelope(minimal_payload, payload_type="application/json"),
        error("wrong_payload_type"),
    )
    add(
        "wrong_payload_type_case",
        "payloadType must match exactly, case included.",
        envelope(minimal_payload, payload_type=PAYLOAD_TYPE.upper()),
        error("wrong_payload_type"),
    )

    # ------------------------------------------------------------ signature_invalid
    add(
        "signature_invalid_wrong_key",
        "Signed by a key that is not trusted.",
        envelope(minimal_payload, ("untrusted",)),
        error("signature_invalid"),
    )
    tampered = replace_once(minimal_payload, b'"serial":42', b'"serial":43')
    add(
        "signature_invalid_tampered_payload",
        "One payload byte changed (serial 42 -> 43) after signing.",
        envelope_bytes(
            {
                "payloadType": PAYLOAD_TYPE,
                "payload": b64(tampered),
                "signatures": [sig_entry("k1", minimal_payload)],
            }
        ),
        error("signature_invalid"),
    )
    bad_sig = bytearray(sign("k1", minimal_payload))
    bad_sig[10] ^= 0x01
    add(
        "signature_invalid_tampered_signature",
        "One bit of the signature flipped.",
        envelope_bytes(
            {
                "payloadType": PAYLOAD_TYPE,
                "payload": b64(minimal_payload),
                "signatures": [{"keyid": KEYS["k1"].keyid, "sig": b64(bytes(bad_sig))}],
            }
        ),
        error("signature_invalid"),
    )
    junk = {"keyid": KEYS["k1"].keyid, "sig": b64(sign("untrusted", minimal_payload))}
    add(
        "signature_invalid_16_junk_signatures",
        "16 signature entries, all made by the untrusted key (naming k1): each is verified, none counts.",
        envelope_bytes(
            {"payloadType": PAYLOAD_TYPE, "payload": b64(minimal_payload), "signatures": [junk] * 16}
        ),
        error("signature_invalid"),
    )
    add(
        "signature_invalid_signed_other_type",
        "The signature covers the payload under another payloadType (PAE binds the type).",
        envelope_bytes(
            {
                "payloadType": PAYLOAD_TYPE,
                "payload": b64(minimal_payload),
                "signatures": [
                    {"keyid": KEYS["k1"].keyid, "sig": b64(sign("k1", minimal_payload, "application/json"))}
                ],
            }
        ),
        error("signature_invalid"),
    )

    # ------------------------------------------------------------ threshold_not_met
    add(
        "threshold_not_met_1_of_required_2",
        "Three trusted keys, threshold 2, only k1 signed.",
        envelope(minimal_payload, ("k1",)),
        error("threshold_not_met"),
        trusted=("k1", "k2", "k3"),
        threshold=2,
    )
    add(
        "threshold_not_met_same_key_twice",
        "k1's signature appears twice: one distinct key, threshold 2.",
        envelope(minimal_payload, ("k1", "k1")),
        error("threshold_not_met"),
        trusted=("k1", "k2"),
        threshold=2,
    )
    add(
        "threshold_not_met_untrusted_counts_zero",
        "k1 and an untrusted key signed; threshold 2 over k1, k2.",
        envelope(minimal_payload, ("k1", "untrusted")),
        error("threshold_not_met"),
        trusted=("k1", "k2"),
        threshold=2,
    )

    # ------------------------------------------------------------ malformed_manifest
    base = minimal_payload
    bad_payloads: list[tuple[str, str, bytes]] = [
        (
            "duplicate_key",
            "serial appears twice.",
            replace_once(base, b'"serial":42', b'"serial":41,"serial":42'),
        ),
        (
            "float",
            "serial is 42.0 (no floats anywhere).",
            replace_once(base, b'"serial":42', b'"serial":42.0'),
        ),
        ("float_exponent", "size is 1.85e7.", replace_once(base, b'"size":18500000', b'"size":1.85e7')),
        ("nan", "size is NaN.", replace_once(base, b'"size":18500000', b'"size":NaN')),
        ("infinity", "size is Infinity.", replace_once(base, b'"size":18500000', b'"size":Infinity')),
        ("bool_for_int", "serial is true.", replace_once(base, b'"serial":42', b'"serial":true')),
        ("string_serial", 'serial is the string "42".', replace_once(base, b'"serial":42', b'"serial":"42"')),
        ("negative_serial", "serial is -1.", replace_once(base, b'"serial":42', b'"serial":-1')),
        ("serial_above_int64", "serial is 2^63.", compact(minimal(serial=1 << 63))),
        ("serial_zero", "serial is 0 (serials start at 1).", compact(minimal(serial=0))),
        ("serial_2_53", "serial is 2^53, one above the largest.", compact(minimal(serial=1 << 53))),
        (
            "serial_int64_max",
            "serial is 2^63-1 (a Go int64 reads it, a JavaScript double does not).",
            compact(minimal(serial=(1 << 63) - 1)),
        ),
        (
            "container_digest_uppercase",
            "container_digest with upper-case hex.",
            compact(minimal(container_digest="sha256:" + fake_sha256("image").upper())),
        ),
        (
            "container_digest_no_algorithm",
            "container_digest without the sha256: prefix.",
            compact(minimal(container_digest=fake_sha256("image"))),
        ),
        (
            "container_digest_short",
            "container_digest with 63 hex digits.",
            compact(minimal(container_digest="sha256:" + fake_sha256("image")[:63])),
        ),
        (
            "container_digest_trailing_newline",
            "container_digest followed by a newline.",
            compact(minimal(container_digest="sha256:" + fake_sha256("image") + "\n")),
        ),
        (
            "signed_at_no_offset",
            "signed_at without an offset.",
            compact(minimal(signed_at="2026-02-15T20:00:05")),
        ),
        ("signed_at_epoch", "signed_at as epoch seconds.", compact(minimal(signed_at=1771185605))),
        ("signed_at_date_only", "signed_at is a date.", compact(minimal(signed_at="2026-02-15"))),
        ("rollout_plan_not_object", "rollout_plan is a list.", compact(minimal(rollout_plan=[1, 10, 100]))),
        *[
            (
                f"rollout_plan_{suffix}",
                f"rollout_plan: {what}.",
                compact(minimal(rollout_plan={**PLAN, **change})),
            )
            for suffix, what, change in PLAN_MISTAKES
        ],
        (
            "rollout_plan_missing_soak",
            "rollout_plan without soak (all four fields are required).",
            compact(minimal(rollout_plan=without(PLAN, "soak"))),
        ),
        (
            "rollout_plan_float_rate",
            "max_failure_rate as the JSON number 0.05 (no floats anywhere: it is a decimal string).",
            replace_once(compact(minimal(rollout_plan=PLAN)), b'"0.05"', b"0.05"),
        ),
        ("missing_field", "expires is missing.", compact(without(minimal(), "expires"))),
        ("missing_binaries", "binaries is missing.", compact(without(minimal(), "binaries"))),
        ("unknown_schema", "schema is 2.", compact(minimal(schema=2))),
        ("bad_version", "version is not PEP 440.", compact(minimal(version="not a version"))),
        ("bad_min_version", "min_version is not PEP 440.", compact(minimal(min_version="latest"))),
        (
            "bad_sha256",
            "sha256 has 63 hex digits.",
            compact(minimal(binaries={"linux-amd64": {**binary("linux-amd64"), "sha256": "a" * 63}})),
        ),
        (
            "uppercase_sha256",
            "sha256 must be lowercase hex.",
            compact(minimal(binaries={"linux-amd64": {**binary("linux-amd64"), "sha256": "A" * 64}})),
        ),
        (
            "sha256_trailing_newline",
            "sha256 is 64 hex digits followed by a newline.",
            compact(minimal(binaries={"linux-amd64": {**binary("linux-amd64"), "sha256": "a" * 64 + "\n"}})),
        ),
        (
            "negative_size",
            "size is -1.",
            compact(minimal(binaries={"linux-amd64": {**binary("linux-amd64"), "size": -1}})),
        ),
        (
            "zero_size",
            "size is 0 (a binary has at least one byte).",
            compact(minimal(binaries={"linux-amd64": {**binary("linux-amd64"), "size": 0}})),
        ),
        (
            "binary_without_url",
            "A binary entry has no url.",
            compact(minimal(binaries={"linux-amd64": without(binary("linux-amd64"), "url")})),
        ),
        ("bad_time", "expires is a date without a time.", compact(minimal(expires="2026-03-17"))),
        ("time_without_offset", "expires has no offset.", compact(minimal(expires="2026-03-17T20:00:00"))),
        ("rollout_percent_101", "rollout.percent is 101.", compact(minimal(rollout={"percent": 101}))),
        ("downgrade_not_bool", "downgrade is 1.", compact(minimal(downgrade=1))),
        ("changelog_not_string", "changelog is a list.", compact(minimal(changelog=["a"]))),
        ("not_an_object", "The payload is a JSON array.", b"[1,2,3]"),
        ("not_json", "The payload is not JSON.", b"serial: 42\n"),
        ("not_utf8", "The payload is not valid UTF-8.", replace_once(base, b'"0.1.44"', b'"0.1.\xff44"')),
    ]
    for suffix, description, bad in bad_payloads:
        add(f"malformed_manifest_{suffix}", description, envelope(bad), error("malformed_manifest"))

    # ------------------------------------------------------------ expired
    add(
        "expired_beyond_slack",
        "expires is 5 min 1 s before now.",
        envelope(compact(minimal(expires=at(-CLOCK_SLACK - timedelta(seconds=1))))),
        error("expired"),
    )
    add(
        "expired_exactly_at_slack",
        "expires is exactly 5 min before now: accepted only if expires > now - 5 min.",
        envelope(compact(minimal(expires=at(-CLOCK_SLACK)))),
        error("expired"),
    )
    add(
        "expired_long_ago",
        "expires a year before now.",
        envelope(compact(minimal(released_at="2024-01-01T00:00:00Z", expires="2025-03-01T12:00:00Z"))),
        error("expired"),
    )

    # ------------------------------------------------------------ serial_rollback
    add(
        "serial_rollback_lower_serial",
        "serial 42 when 43 was accepted before (a replay).",
        envelope(minimal_payload),
        error("serial_rollback"),
        highest_serial=43,
        digest=fake_sha256("serial 43 payload"),
    )
    add(
        "serial_rollback_equal_serial_other_bytes",
        "serial 42 was accepted before with other payload bytes.",
        envelope(minimal_payload),
        error("serial_rollback"),
        highest_serial=42,
        digest=hashlib.sha256(compact(full())).hexdigest(),
    )

    # ------------------------------------------------------------ bad_url
    for suffix, url, what in [
        ("file", "file:///etc/passwd", "a file:// URL"),
        ("javascript", "javascript:alert(1)", "a javascript: URL"),
        ("ftp", "ftp://mirror.example.org/avika-agent-linux-amd64", "an ftp:// URL"),
        ("space", "binaries/0.1.44/avika agent", "a URL with a space"),
        ("http_without_host", "http:/avika-agent-linux-amd64", "an http URL without a host"),
        ("empty", "", "an empty URL"),
    ]:
        obj = minimal(binaries={"linux-amd64": {**binary("linux-amd64"), "url": url}})
        add(f"bad_url_{suffix}", f"The binary URL is {what}.", envelope(compact(obj)), error("bad_url"))
    obj = minimal(
        binaries={
            "linux-amd64": binary("linux-amd64"),
            "linux-arm64": {**binary("linux-arm64"), "url": "file:///srv/avika-agent-linux-arm64"},
        }
    )
    add(
        "bad_url_in_another_platform_entry",
        "Every binary URL is checked, not only this agent's platform.",
        envelope(compact(obj)),
        error("bad_url"),
    )
    add(
        "bad_url_in_container",
        "A container agent checks the URLs too.",
        envelope(compact(obj)),
        error("bad_url"),
        platform=None,
    )
    cdn = ("https://cdn.example.net",)
    for suffix, url, what, origins in [
        ("other_host", "https://cdn.example.net/avika/a", "on another host, with no origin allowed", ()),
        (
            "other_port",
            "https://updates.example.com:8443/avika/a",
            "on the manifest's host, another port",
            (),
        ),
        ("port_80_on_https", "https://updates.example.com:80/avika/a", "on https with port 80", ()),
        ("plain_http", "http://updates.example.com/avika/a", "on the manifest's host over plain http", ()),
        ("scheme_relative_other_host", "//mirror.example.org/avika/a", "scheme-relative to another host", ()),
        ("three_slashes", "///evil.example/avika/a", "///host (a WHATWG URL parser reads a host there)", ()),
        ("host_prefix", "https://updates.example.com.evil.example/a", "the manifest's host as a prefix", ()),
        ("trailing_dot", "https://updates.example.com./a", "the manifest's host with a trailing dot", ()),
        ("userinfo", "https://updates.example.com@evil.example/a", "userinfo: the host is evil.example", ()),
        (
            "userinfo_own_host",
            "https://user@updates.example.com/a",
            "the manifest's host with userinfo (never allowed)",
            (),
        ),
        ("percent_escaped_host", "https://updates%2Eexample.com/a", "a percent-escaped host", ()),
        ("non_ascii_host", "https://updates.ex\u0430mple.com/a", "a host with a Cyrillic letter", ()),
        ("empty_port", "https://updates.example.com:/a", "an empty port", ()),
        ("port_out_of_range", "https://updates.example.com:65536/a", "port 65536", ()),
        ("ipv6_not_allowed", "http://[2001:db8::7]:8080/a", "an IPv6 literal no origin allows", ()),
        ("allowed_host_over_http", "http://cdn.example.net/a", "an allowed host over another scheme", cdn),
        ("allowed_host_other_port", "https://cdn.example.net:8443/a", "an allowed host, another port", cdn),
        ("subdomain_of_allowed", "https://img.cdn.example.net/a", "a subdomain of an allowed host", cdn),
    ]:
        obj = minimal(binaries={"linux-amd64": {**binary("linux-amd64"), "url": url}})
        add(
            f"bad_url_{suffix}",
            f"The binary URL is {what}.",
            envelope(compact(obj)),
            error("bad_url"),
            binary_origins=origins,
        )

    # ------------------------------------------------------------ no_binary_for_platform
    add(
        "no_binary_for_platform",
        "An arm64 VM agent and a manifest with only linux-amd64.",
        envelope(minimal_payload),
        error("no_binary_for_platform"),
        platform="linux-arm64",
    )
    obj = minimal(binaries={})
    add(
        "no_binary_for_platform_empty_binaries",
        "An empty binaries object is valid JSON but a VM agent has nothing to install.",
        envelope(compact(obj)),
        error("no_binary_for_platform"),
    )

    # ------------------------------------------------------------ rule order
    add(
        "order_payload_type_before_signature",
        "Wrong payloadType and a signature by an untrusted key: wrong_payload_type.",
        envelope(minimal_payload, ("untrusted",), payload_type="application/json"),
        error("wrong_payload_type"),
    )
    add(
        "order_signature_before_payload",
        "A payload that is not JSON, signed by an untrusted key: verify first, parse second.",
        envelope(b"not json at all", ("untrusted",)),
        error("signature_invalid"),
    )
    add(
        "order_threshold_before_payload",
        "A payload that is not JSON, one of two required keys signed.",
        envelope(b"not json at all", ("k1",)),
        error("threshold_not_met"),
        trusted=("k1", "k2"),
        threshold=2,
    )
    add(
        "order_malformed_before_expired",
        "Expired and with a float size: malformed_manifest.",
        envelope(
            replace_once(
                compact(minimal(expires="2025-01-01T00:00:00Z")), b'"size":18500000', b'"size":18500000.0'
            )
        ),
        error("malformed_manifest"),
    )
    add(
        "order_expired_before_serial_rollback",
        "Expired and below the highest serial: expired.",
        envelope(compact(minimal(serial=7, expires="2025-01-01T00:00:00Z"))),
        error("expired"),
        highest_serial=42,
        digest=fake_sha256("serial 42 payload"),
    )
    add(
        "order_serial_rollback_before_bad_url",
        "Below the highest serial and a file:// URL: serial_rollback.",
        envelope(
            compact(
                minimal(serial=7, binaries={"linux-amd64": {**binary("linux-amd64"), "url": "file:///x"}})
            )
        ),
        error("serial_rollback"),
        highest_serial=42,
        digest=fake_sha256("serial 42 payload"),
    )
    add(
        "order_bad_url_before_no_binary_for_platform",
        "An arm64 agent, no arm64 entry, and a file:// URL in the amd64 entry: bad_url.",
        envelope(compact(minimal(binaries={"linux-amd64": {**binary("linux-amd64"), "url": "file:///x"}}))),
        error("bad_url"),
        platform="linux-arm64",
    )

    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


# ---------------------------------------------------------------- rollout


def fnv1a32(data: bytes) -> int:
    """FNV-1a 32-bit, from the definition (offset basis 2166136261, prime 16777619)."""
    return functools.reduce(lambda h, octet: ((h ^ octet) * 16777619) % 2**32, data, 2166136261)


ROLLOUT_INPUTS: list[tuple[str, str]] = [
    # FNV-1a published values, salt "" (the seed's shouldUpdateInWave).
    ("", ""),
    ("", "a"),
    ("", "b"),
    ("", "ab"),
    ("", "foo"),
    ("", "foobar"),
    # The hash covers salt + agent_id with no separator: these three hash alike.
    ("ab", "c"),
    ("a", "bc"),
    ("", "abc"),
    # Realistic ids, with and without a release salt.
    ("", "web-01.prod.example.com-3f2a9c1b0d4e"),
    ("0.1.44", "web-01.prod.example.com-3f2a9c1b0d4e"),
    ("0.1.45", "web-01.prod.example.com-3f2a9c1b0d4e"),
    ("", "k8s-node-17"),
    ("0.1.44", "k8s-node-17"),
    ("0.1.44", "agent-0001"),
    ("0.1.44", "agent-0002"),
    ("0.1.44", "agent-0003"),
    ("0.1.44", "i-0abc123def4567890"),
    ("1.0.0rc1", "db-replica-3.eu-west-1:5020"),
    ("0.1.44", "user@host/instance+1=2"),
    ("", "x" * 128),
    # Non-ASCII: UTF-8 bytes are hashed (Go hashes the bytes of a string, Python encodes first).
    ("é", "agent-1"),
    ("0.1.44", "agent-ü"),
    ("", "ホスト-1"),
    ("\U0001f680", "rocket"),
]


def rollout_rows() -> list[dict[str, Any]]:
    rows = []
    for salt, agent_id in ROLLOUT_INPUTS:
        h = fnv1a32((salt + agent_id).encode("utf-8"))
        rows.append(
            {"salt": salt, "agent_id": agent_id, "fnv1a32": h, "fnv1a32_hex": f"0x{h:08x}", "bucket": h % 100}
        )
    return rows


# ---------------------------------------------------------------- output


def dump_json(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, ensure_ascii=True).encode("ascii") + b"\n"


def keys_document() -> dict[str, Any]:
    return {
        "about": "Ed25519 test keys for the conformance vectors. NEVER trust these keys outside tests:"
        " the seeds are public.",
        "keys": [
            {
                "name": key.name,
                "seed_hex": key.seed_hex,
                "seed_origin": key.origin,
                "public_key_b64": key.public_b64,
                "keyid": key.keyid,
                "trusted": key.trusted,
            }
            for key in KEYS.values()
        ],
    }


def cases_document(cases: list[Case]) -> dict[str, Any]:
    return {
        "about": "Manifest conformance vectors (DESIGN section 2); see README.md for how to run them.",
        "payload_type": PAYLOAD_TYPE,
        "max_envelope_bytes": MAX_ENVELOPE_BYTES,
        "clock_slack_seconds": int(CLOCK_SLACK.total_seconds()),
        "manifest_url": MANIFEST_URL,
        "cases": [
            {
                "name": case.name,
                "description": case.description,
                "envelope": f"cases/{case.name}.envelope.json",
                "envelope_sha256": hashlib.sha256(case.envelope).hexdigest(),
                "trusted_keys": [KEYS[name].public_b64 for name in case.trusted],
                "trusted_key_names": list(case.trusted),
                "threshold": case.threshold,
                "now": case.now,
                "trust": {"highest_serial": case.highest_serial, "digest": case.digest},
                "platform": case.platform,
                "binary_origins": list(case.binary_origins),
                "expected": case.expected,
            }
            for case in cases
        ],
    }


def rollout_document() -> dict[str, Any]:
    return {
        "about": "Rollout buckets: fnv1a32 is FNV-1a 32-bit (Go hash/fnv New32a) over the UTF-8 bytes of"
        " salt + agent_id; bucket = fnv1a32 % 100; an agent is in the wave iff bucket < min(rollout.percent,"
        " UPDATE_ROLLOUT_PERCENT).",
        "rows": rollout_rows(),
    }


def write(out: Path) -> list[Path]:
    """Write every generated file under ``out``; return their paths."""
    cases = build_cases()
    case_dir = out / "cases"
    case_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for case in cases:
        path = case_dir / f"{case.name}.envelope.json"
        path.write_bytes(case.envelope)
        written.append(path)
    for stale in case_dir.glob("*.envelope.json"):
        if stale not in written:
            stale.unlink()
    for name, doc in [
        ("keys.json", keys_document()),
        ("cases.json", cases_document(cases)),
        ("rollout.json", rollout_document()),
    ]:
        (out / name).write_bytes(dump_json(doc))
        written.append(out / name)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output directory")
    args = parser.parse_args()
    written = write(args.out)
    print(f"wrote {len(written)} files under {args.out}")


if __name__ == "__main__":
    main()
