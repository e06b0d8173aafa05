"""Properties of the manifest verifier (DESIGN section 2) over generated inputs.

- ``verify_envelope``, ``parse_manifest`` and ``verify_manifest`` raise nothing but
  ``ManifestError`` subclasses, whatever the bytes: arbitrary bytes, arbitrary JSON-like
  structures, schema-shaped payloads with one field replaced, and mutated valid envelopes;
- a mutated valid envelope is either refused or, when the mutation left the signed payload
  bytes as they were (whitespace, a keyid hint, base64 padding), gives back the same manifest;
- any manifest built from the schema's value ranges (serials 1..2^53-1, binary URLs relative or on
  an allowed origin, the optional ``container_digest``, ``signed_at`` and ``rollout_plan``) survives
  to_payload -> sign -> verify;
- ``check_url`` raises nothing but ``BadUrl`` for any text, and a URL it accepts resolves to an
  allowed origin -- also according to another URL parser (urllib3's), so the host that was checked
  is the host that is fetched.
"""

from __future__ import annotations

import base64
import contextlib
import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urljoin

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from urllib3.util import parse_url

from agent.manifest import (
    MAX_INT,
    MAX_SERIAL,
    BadUrl,
    Binary,
    LocalSigner,
    Manifest,
    ManifestError,
    Rollout,
    RolloutPlan,
    TrustState,
    check_url,
    parse_manifest,
    public_key_of,
    sign_envelope,
    url_origin,
    verify_envelope,
    verify_manifest,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
KEY = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)
SIGNER = LocalSigner(KEY)
TRUSTED = [public_key_of(KEY)]
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID_OBJ: dict[str, Any] = {
    "schema": 1,
    "serial": 42,
    "version": "0.1.44",
    "released_at": "2026-02-15T20:00:00Z",
    "expires": "2026-03-17T20:00:00Z",
    "binaries": {"linux-amd64": {"url": "binaries/a", "sha256": "ab" * 32, "size": 10}},
    "container_image": "img:0.1.44",
    "min_version": "0.1.40",
    "changelog": "x",
    "rollout": {"percent": 50, "salt": "s"},
    "downgrade": False,
    "reports_url": "https://r.example.com/v1/reports",
    "container_digest": "sha256:" + "cd" * 32,
    "signed_at": "2026-02-16T08:00:00Z",
    "rollout_plan": {"steps": [1, 10, 50, 100], "soak": "2h", "max_failure_rate": "0.05", "min_agents": 20},
}
VALID_PAYLOAD = json.dumps(VALID_OBJ, separators=(",", ":")).encode()
VALID_ENVELOPE = sign_envelope(VALID_PAYLOAD, [SIGNER])
VALID_MANIFEST = verify_manifest(VALID_ENVELOPE, trusted=TRUSTED, now=NOW, platform="linux-amd64")


def run_everything(data: bytes) -> Manifest | None:
    """Feed ``data`` to each entry point; only ManifestError may come out."""
    with contextlib.suppress(ManifestError):
        verify_envelope(data, TRUSTED)
    with contextlib.suppress(ManifestError):
        parse_manifest(data)
    try:
        return verify_manifest(
            data, trusted=TRUSTED, now=NOW, trust=TrustState(41, None), platform="linux-amd64"
        )
    except ManifestError:
        return None


def sign_payload(payload: bytes) -> bytes:
    return sign_envelope(payload, [SIGNER])


# ---------------------------------------------------------------- strategies

text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=20)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | text
json_like = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
# Times that stress the parser: the edges of the calendar and of the offsets.
times = st.one_of(
    st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(timezone.utc)
    ).map(lambda d: d.isoformat()),
    st.builds(
        "{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:{:02d}{}".format,
        st.sampled_from([0, 1, 2026, 9999]),
        st.integers(0, 13),
        st.integers(0, 32),
        st.integers(0, 25),
        st.integers(0, 61),
        st.integers(0, 61),
        st.sampled_from(["Z", "z", "+00:00", "+01:00", "-01:00", "+23:59", "-23:59", "+24:00", ""]),
    ),
)


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8")


# ---------------------------------------------------------------- never anything but ManifestError


@SETTINGS
@given(st.binary(max_size=512))
@example(b"")
@example(b"\xff")
@example(b"[" * 100_000)
@example(b"1" * 5000)
def test_arbitrary_bytes_raise_only_manifest_errors(data: bytes) -> None:
    assert run_everything(data) is None


@SETTINGS
@given(json_like)
def test_arbitrary_json_raises_only_manifest_errors(value: Any) -> None:
    data = json_bytes(value)
    run_everything(data)
    run_everything(sign_payload(data))


@SETTINGS
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "payloadType": st.just("application/vnd.avika.manifest+json") | json_like,
            "payload": st.just(base64.b64encode(VALID_PAYLOAD).decode()) | json_like,
            "signatures": st.lists(
                st.fixed_dictionaries({}, optional={"keyid": json_like, "sig": text | json_like}) | json_like,
                max_size=3,
            )
            | json_like,
        },
    )
)
def test_envelope_shaped_json_raises_only_manifest_errors(envelope: dict[str, Any]) -> None:
    assert run_everything(json_bytes(envelope)) is None


@SETTINGS
@given(
    st.sampled_from(sorted(VALID_OBJ))
    | st.sampled_from(["binaries.url", "binaries.sha256", "binaries.size"])
    | st.sampled_from(["rollout_plan.steps", "rollout_plan.soak", "rollout_plan.max_failure_rate"])
    | st.sampled_from(["rollout_plan.min_agents"]),
    json_like | times,
)
@example("expires", "0001-01-01T00:00:00+01:00")
@example("released_at", "0001-01-01T00:00:00+01:00")
@example("expires", "9999-12-31T23:59:59-01:00")
@example("serial", 2**64)
@example("binaries.size", 10**5000)
@example("rollout_plan.soak", "999999999d" * 1000)
@example("rollout_plan.steps", [1, 2**64, 100])
def test_signed_payload_with_one_field_replaced_raises_only_manifest_errors(name: str, value: Any) -> None:
    obj = json.loads(VALID_PAYLOAD)
    if name.startswith("binaries."):
        obj["binaries"]["linux-amd64"][name.split(".")[1]] = value
    elif name.startswith("rollout_plan."):
        obj["rollout_plan"][name.split(".")[1]] = value
    else:
        obj[name] = value
    try:
        payload = json_bytes(obj)
    except ValueError:  # an int too long for json.dumps
        payload = VALID_PAYLOAD.replace(b'"size":10', b'"size":' + b"9" * 5000)
    run_everything(payload)
    result = run_everything(sign_payload(payload))
    if result is not None:
        assert result.raw == payload


# ---------------------------------------------------------------- mutations of a valid envelope

mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete"]),
        st.integers(0, len(VALID_ENVELOPE) - 1),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, steps: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for op, pos, value in steps:
        pos %= max(len(out), 1)
        if op == "flip" and out:
            out[pos] ^= value or 1
        elif op == "insert":
            out.insert(pos, value)
        elif op == "delete" and out:
            del out[pos]
    return bytes(out)


@SETTINGS
@given(mutations)
@example([("insert", 0, ord(" "))])
@example([("insert", len(VALID_ENVELOPE) - 1, ord("\t"))])
@example([("flip", VALID_ENVELOPE.index(b'"keyid":"') + 10, 1)])
def test_a_mutated_envelope_is_refused_or_still_the_same_manifest(steps: list[tuple[str, int, int]]) -> None:
    data = mutate(VALID_ENVELOPE, steps)
    result = run_everything(data)
    if result is not None:
        # Only the signed payload bytes matter: a mutation that verifies kept them identical.
        assert result == VALID_MANIFEST


def test_whitespace_and_keyid_mutations_do_verify() -> None:
    # The examples above must really reach the "same manifest" branch, not only refusals.
    respaced = b"  " + VALID_ENVELOPE.replace(b'": "', b'":"')
    assert run_everything(respaced) == VALID_MANIFEST
    hint = VALID_ENVELOPE.index(b'"keyid":"') + 10
    assert run_everything(mutate(VALID_ENVELOPE, [("flip", hint, 1)])) == VALID_MANIFEST


# ---------------------------------------------------------------- round trip

platforms = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,20}", fullmatch=True)
versions = st.builds(
    "{}{}.{}.{}{}".format,
    st.sampled_from(["", "v"]),
    st.integers(0, 20),
    st.integers(0, 200),
    st.integers(0, 10_000),
    st.sampled_from(["", "rc1", "a2", "b3", ".post1", ".dev4"]),
)
seconds = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(timezone.utc)
).map(lambda d: d.replace(microsecond=0))
# Where the envelopes are served from, and the one other origin UPDATE_BINARY_ORIGINS allows.
SERVED_FROM = "https://updates.example.com/avika/manifest.json"
ORIGINS = ("http://cdn.example.net:8080",)
urls = st.one_of(
    st.from_regex(r"[a-z0-9._-][a-z0-9._/-]{0,39}", fullmatch=True),
    st.builds(
        "{}/{}".format,
        st.sampled_from(
            [
                "https://updates.example.com",
                "HTTPS://Updates.Example.com:443",
                "//updates.example.com",
                *ORIGINS,
            ]
        ),
        st.from_regex(r"[a-zA-Z0-9._~/-]{0,30}", fullmatch=True),
    ),
)
binaries = st.builds(
    Binary,
    url=urls,
    sha256=st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
    size=st.integers(1, MAX_INT),
)


@st.composite
def rollout_plans(draw: st.DrawFn) -> RolloutPlan:
    steps = [*sorted(draw(st.sets(st.integers(1, 99), max_size=10))), 100]
    soak = "".join(draw(st.lists(st.from_regex(r"[0-9]{1,2}[smhd]", fullmatch=True), min_size=1, max_size=3)))
    return RolloutPlan(
        steps=tuple(steps),
        soak=soak,
        max_failure_rate=draw(st.from_regex(r"0(\.[0-9]{1,6})?|1(\.0{1,6})?", fullmatch=True)),
        min_agents=draw(st.integers(0, 1_000_000)),
    )


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    released = draw(seconds)
    return Manifest(
        serial=draw(st.integers(1, MAX_SERIAL)),
        version=draw(versions),
        released_at=released,
        expires=NOW + timedelta(seconds=draw(st.integers(1, 10**9))),
        binaries=draw(st.dictionaries(platforms, binaries, max_size=4)),
        container_image=draw(st.none() | text),
        min_version=draw(st.none() | versions),
        changelog=draw(text),
        rollout=Rollout(percent=draw(st.integers(0, 100)), salt=draw(text)),
        downgrade=draw(st.booleans()),
        reports_url=draw(st.none() | text),
        container_digest=draw(st.none() | st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True)),
        signed_at=draw(st.none() | seconds),
        rollout_plan=draw(st.none() | rollout_plans()),
    )


def verify_served(data: bytes, **kw: Any) -> Manifest:
    return verify_manifest(
        data, trusted=TRUSTED, now=NOW, manifest_url=SERVED_FROM, binary_origins=ORIGINS, **kw
    )


@SETTINGS
@given(manifests())
def test_any_manifest_round_trips_through_sign_and_verify(original: Manifest) -> None:
    payload = original.to_payload()
    platform = next(iter(original.binaries), None)
    verified = verify_served(sign_envelope(payload, [SIGNER]), platform=platform)
    assert verified.raw == payload
    assert replace(verified, raw=b"") == original
    assert verified.to_payload() == payload


@SETTINGS
@given(manifests())
def test_a_round_tripped_manifest_accepts_itself_again_as_the_highest_serial(original: Manifest) -> None:
    data = sign_envelope(original.to_payload(), [SIGNER])
    first = verify_served(data)
    again = verify_served(data, trust=TrustState(first.serial, first.digest))
    assert again == first


# ---------------------------------------------------------------- binary URLs

ALLOWED = {url_origin(SERVED_FROM), *ORIGINS}
url_text = st.one_of(
    st.text(max_size=60),
    st.builds(
        "{}{}{}{}".format,
        st.sampled_from(["", "http://", "https://", "HTTPS://", "//", "///", "http:", "ftp://"]),
        st.sampled_from(["", "updates.example.com", "cdn.example.net", "evil.example", "[::1]", "user@"]),
        st.text(alphabet="@:/.%[]?#0123456789abcdefxyz\u0430", max_size=20),
        st.sampled_from(["", "/a", "/../b", "?q=1#f"]),
    ),
    st.builds(
        "{}{}{}/{}".format,
        st.sampled_from(["http://", "https://", "HTTP://", "//"]),
        st.sampled_from(["updates.example.com", "UPDATES.example.COM", "cdn.example.net", "evil.example"]),
        st.sampled_from(["", ":80", ":443", ":8080", ":08080", ":0"]),
        st.text(alphabet="@:/.%?#abc", max_size=10),
    ),
)


@SETTINGS
@given(url_text)
@example("https://updates.example.com@evil.example/a")
@example("https://updates.example.com:443@cdn.example.net:8080/a")
@example("http://cdn.example.net:8080#@evil.example/")
@example("http://cdn.example.net:8080?@evil.example/")
@example("//updates.example.com:443/a")
def test_an_accepted_binary_url_always_resolves_to_an_allowed_origin(url: str) -> None:
    try:
        check_url(url, SERVED_FROM, ORIGINS)
    except BadUrl:
        return
    resolved = urljoin(SERVED_FROM, url)
    assert url_origin(resolved) in ALLOWED
    # A second, independent parser finds the same scheme, host and port.
    other = parse_url(resolved)
    port = other.port or {"http": 80, "https": 443}[other.scheme]
    assert (other.scheme, other.host.lower(), port) in {
        (
            parse_url(o).scheme,
            parse_url(o).host,
            parse_url(o).port or {"http": 80, "https": 443}[parse_url(o).scheme],
        )
        for o in ALLOWED
    }
