"""The store is not trusted by the publisher (DESIGN section 2, end; issue 10's store findings).

Whoever can write to the bucket can add, replace and delete objects but cannot sign. What holds,
on a directory and on S3 (moto), through the real CLI:
- the next serial comes only from envelopes that verify with the signer's key or a trusted key
  (never from object names, never from an unsigned payload); a name held by junk is skipped; a
  serial more than 1,000 above the highest verified one is refused (exit 2);
- every inherited field (``reports_url`` for a release; everything for a re-sign) comes only from
  envelopes that verify; with nothing verifiable, a release needs ``--reports-url``;
- an older signed manifest put back as ``manifest.json`` is never re-signed (that would let the
  store choose what is signed);
- unverifiable objects get a warning naming them and are never used, never deleted.

The store is seeded by hand (signed envelopes written with the agent's own ``sign_envelope``) so
every test here also runs against the publisher as it was before this rule: the finding tests
failed there first (see the report of issue 10).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.manifest import (
    MAX_SERIAL,
    Binary,
    LocalSigner,
    Manifest,
    Rollout,
    TrustState,
    parse_manifest,
    read_envelope_unverified,
    sign_envelope,
    verify_manifest,
)
from publisher.signing import load_key_file
from publisher.stores import DirStore, Store
from tests.publisher_fixtures import cli, make_binary, new_key_file, new_signer
from tests.test_publisher_s3 import STORE, moto_s3_store

REPORTS = "https://reports.example.com/v1/reports"
EVIL_REPORTS = "https://reports.attacker.example/v1/reports"
LOCKOUT = "manifests/9223372036854775806.json"  # 2^63 - 2: the next serial would be 2^63 - 1


@dataclass
class Site:
    """A store seeded with real signed releases, and how the CLI names it."""

    store: Store
    url: str
    tmp: Path
    key: Any  # KeyFile
    signer: LocalSigner
    manifests: list[Manifest]

    def signing(self, *extra: str) -> list[str]:
        return ["--key", str(self.key.path), "--store", self.url, *extra]

    def live(self) -> Manifest:
        return verify_manifest(self.store.read("manifest.json"), trusted=[self.signer.public_key], now=now())

    def unverified_live(self) -> Manifest:
        return parse_manifest(read_envelope_unverified(self.store.read("manifest.json")))

    def contents(self) -> dict[str, str]:
        return {k: hashlib.sha256(self.store.read(k) or b"").hexdigest() for k in self.store.list("")}

    def publish_by_hand(self, manifest: Manifest, signers: list[Any], *, archive: bool = True) -> bytes:
        envelope = sign_envelope(manifest.to_payload(), signers)
        if archive:
            self.store.put_immutable(f"manifests/{manifest.serial}.json", envelope)
        self.store.put_mutable("manifest.json", envelope)
        return envelope

    def build(self, version: str, seed: str | None = None) -> Path:
        path = self.tmp / "dist" / version / "avika-agent-linux-amd64"
        make_binary(path, 3000, seed or version)
        return path


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def first_release(store: Store, signer: LocalSigner, tmp: Path, serials: int = 1) -> list[Manifest]:
    """0.1.44 as a publisher would have written it: binary, then serials 1..n (rollout changes)."""
    data = make_binary(tmp / "seed" / "amd64", 3000, "0.1.44")
    sha = hashlib.sha256(data).hexdigest()
    url = f"binaries/0.1.44/{sha}/avika-agent-linux-amd64"
    store.put_immutable(url, data)
    t = now() - timedelta(hours=1)
    base = Manifest(
        serial=1,
        version="0.1.44",
        released_at=t,
        expires=t + timedelta(days=30),
        binaries={"linux-amd64": Binary(url, sha, len(data))},
        container_image="hellodk/avika-agent:0.1.44",
        rollout=Rollout(10, "0.1.44"),
        reports_url=REPORTS,
    )
    out = []
    for serial in range(1, serials + 1):
        m = replace(base, serial=serial, rollout=Rollout(10 * serial, "0.1.44"))
        envelope = sign_envelope(m.to_payload(), [signer])
        store.put_immutable(f"manifests/{serial}.json", envelope)
        store.put_mutable("manifest.json", envelope)
        out.append(parse_manifest(read_envelope_unverified(envelope)))
    return out


@pytest.fixture(params=["dir", "s3"])
def site(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    key = new_key_file(tmp_path)
    signer = load_key_file(key.path)
    if request.param == "dir":
        store: Store = DirStore(tmp_path / "store")
        yield Site(
            store, str(tmp_path / "store"), tmp_path, key, signer, first_release(store, signer, tmp_path)
        )
        return
    with moto_s3_store(monkeypatch) as s3:
        yield Site(s3, STORE, tmp_path, key, signer, first_release(s3, signer, tmp_path))


def ok(result: Any) -> Any:
    assert result.exit_code == 0, result.stderr
    return result


# ---------------------------------------------------------------- the serial


def test_a_junk_archive_named_for_serial_2_63_cannot_lock_the_fleet_out(site: Site) -> None:
    """Issue 10, first finding: the daily refresh signed serial 2^63-1 because the next serial was
    taken from object names. Now the junk is skipped and the next real serial is signed."""
    site.store.put_immutable(LOCKOUT, b"junk dropped by someone with write access to the bucket")

    result = ok(cli("refresh", *site.signing()))

    live = site.live()
    assert live.serial == 2 and live.version == "0.1.44"
    assert LOCKOUT in result.stderr and "warning" in result.stderr
    assert site.store.read(LOCKOUT) == b"junk dropped by someone with write access to the bucket"
    # An agent that accepted serial 1 takes serial 2 (and so any later release).
    verify_manifest(
        site.store.read("manifest.json"),
        trusted=[site.signer.public_key],
        now=now(),
        trust=TrustState(highest_serial=1),
    )


def test_junk_archive_names_are_skipped_and_kept(site: Site) -> None:
    for serial in (2, 5):
        site.store.put_immutable(f"manifests/{serial}.json", b'{"payload": "not signed"}')
    before = {k: v for k, v in site.contents().items() if k.startswith("manifests/")}

    ok(cli("rollout", "50", *site.signing()))

    assert site.live().serial == 3  # 2 is taken by junk: skipped; 5 is above and irrelevant
    after = site.contents()
    assert all(after[k] == v for k, v in before.items())  # never deleted, never rewritten


def test_a_signed_envelope_of_another_key_does_not_count_for_the_serial(site: Site) -> None:
    intruder = new_signer()
    forged = replace(site.manifests[0], serial=MAX_SERIAL, raw=b"")
    site.publish_by_hand(forged, [intruder])  # manifest.json and manifests/<2^53-1>.json

    result = ok(
        cli(
            "release",
            "0.1.45",
            "--binary",
            f"linux-amd64={site.build('0.1.45')}",
            "--no-inspect",
            *site.signing(),
        )
    )

    live = site.live()
    assert (live.serial, live.version, live.reports_url) == (2, "0.1.45", REPORTS)
    assert f"manifests/{MAX_SERIAL}.json" in result.stderr


def test_a_serial_more_than_1000_above_the_highest_verified_is_refused(tmp_path: Path) -> None:
    key = new_key_file(tmp_path)
    store = DirStore(tmp_path / "store")
    first_release(store, load_key_file(key.path), tmp_path)
    for serial in range(2, 1003):  # 1,001 names in a row: the next free one is 1003
        (store.root / "manifests" / f"{serial}.json").write_bytes(b"junk")
    before = {k: hashlib.sha256(store.read(k)).hexdigest() for k in store.list("")}

    result = cli("refresh", "--key", str(key.path), "--store", str(store.root))

    assert result.exit_code == 2, result.stderr
    assert "more than 1000 above the highest verified serial 1" in result.stderr
    assert {k: hashlib.sha256(store.read(k)).hexdigest() for k in store.list("")} == before


# ---------------------------------------------------------------- inherited fields


def test_an_unsigned_live_edit_cannot_redirect_reports_or_raise_the_serial(site: Site) -> None:
    """``release`` took ``reports_url`` and the serial from the unsigned live manifest."""
    evil = replace(site.manifests[0], serial=500, reports_url=EVIL_REPORTS, raw=b"")
    envelope = {"payloadType": "application/vnd.avika.manifest+json", "signatures": [{"sig": "AA=="}]}
    envelope["payload"] = base64.b64encode(evil.to_payload()).decode()
    site.store.put_mutable("manifest.json", json.dumps(envelope).encode())

    result = ok(
        cli(
            "release",
            "0.1.45",
            "--binary",
            f"linux-amd64={site.build('0.1.45')}",
            "--no-inspect",
            *site.signing(),
        )
    )

    live = site.live()
    assert (live.serial, live.reports_url) == (2, REPORTS)
    assert "manifest.json" in result.stderr and "do not verify" in result.stderr


def test_a_live_manifest_signed_by_another_key_cannot_redirect_reports(site: Site) -> None:
    intruder = new_signer()
    site.publish_by_hand(replace(site.manifests[0], serial=7, reports_url=EVIL_REPORTS, raw=b""), [intruder])

    ok(
        cli(
            "release",
            "0.1.45",
            "--binary",
            f"linux-amd64={site.build('0.1.45')}",
            "--no-inspect",
            *site.signing(),
        )
    )

    live = site.live()
    assert live.reports_url == REPORTS and live.serial == 2  # 7 is taken, 2 is free


def test_with_nothing_verifiable_a_release_needs_reports_url(tmp_path: Path) -> None:
    store = DirStore(tmp_path / "store")
    intruder = new_signer()
    first_release(store, intruder, tmp_path)  # everything in the store is someone else's
    key = new_key_file(tmp_path)
    build = tmp_path / "dist" / "amd64"
    make_binary(build, 3000, "0.1.45")
    release = [
        "release",
        "0.1.45",
        "--binary",
        f"linux-amd64={build}",
        "--no-inspect",
        "--key",
        str(key.path),
    ]
    before = {k: hashlib.sha256(store.read(k)).hexdigest() for k in store.list("")}

    refused = cli(*release, "--store", str(store.root))

    assert refused.exit_code == 2 and "--reports-url" in refused.stderr
    assert {k: hashlib.sha256(store.read(k)).hexdigest() for k in store.list("")} == before

    ok(cli(*release, "--store", str(store.root), "--reports-url", "https://reports.new.example/v1/reports"))
    live = verify_manifest(store.read("manifest.json"), trusted=[key.public], now=now())
    assert live.reports_url == "https://reports.new.example/v1/reports"


def test_an_older_signed_manifest_put_back_is_never_re_signed(site: Site) -> None:
    """A replay: the store writer puts serial 1 back as manifest.json after serial 3 was live.
    Re-signing it would let the store choose what the key signs."""
    ok(cli("rollout", "20", *site.signing()))
    ok(cli("rollout", "30", *site.signing()))
    site.store.put_mutable("manifest.json", site.store.read("manifests/1.json"))
    before = site.contents()

    result = cli("refresh", *site.signing())

    assert result.exit_code == 1, result.stderr
    assert "manifests/3.json (serial 3, 0.1.44) verifies and is newer" in result.stderr
    assert site.contents() == before
    # A release is not steered by it either: it is checked against, and numbered above, serial 3.
    ok(
        cli(
            "release",
            "0.1.45",
            "--binary",
            f"linux-amd64={site.build('0.1.45')}",
            "--no-inspect",
            *site.signing(),
        )
    )
    assert site.live().serial == 4


def test_a_foreign_binary_url_signed_with_the_real_key_is_never_re_signed(site: Site) -> None:
    """What a role that can call KMS Sign directly could write: signed, but sending agents to
    another host. The publisher treats it as not verifying (agents refuse it as bad_url)."""
    foreign = replace(
        site.manifests[0],
        serial=2,
        binaries={
            "linux-amd64": replace(site.manifests[0].binaries["linux-amd64"], url="https://evil.example/a")
        },
        raw=b"",
    )
    site.publish_by_hand(foreign, [site.signer])
    before = site.contents()

    refused = cli("refresh", *site.signing())

    assert refused.exit_code == 3 and "bad_url" in refused.stderr
    assert site.contents() == before
    ok(
        cli(
            "release",
            "0.1.45",
            "--binary",
            f"linux-amd64={site.build('0.1.45')}",
            "--no-inspect",
            *site.signing(),
        )
    )
    live = site.live()
    assert live.serial == 3 and live.binaries["linux-amd64"].url.startswith("binaries/0.1.45/")


def test_an_object_too_large_to_be_a_manifest_is_skipped_unread(site: Site) -> None:
    site.store.put_immutable("manifests/2.json", b"{" + b" " * (2 << 20) + b"}")

    result = ok(cli("refresh", *site.signing()))

    assert site.live().serial == 3 and "manifests/2.json" in result.stderr
    assert "too large" in result.stderr


def test_a_rotation_believes_the_old_keys_envelopes_only_when_told(site: Site) -> None:
    rotated = new_key_file(site.tmp, "new.pem")
    build = site.build("0.1.45")
    new_key = ["--key", str(rotated.path), "--store", site.url]

    refused = cli("release", "0.1.45", "--binary", f"linux-amd64={build}", "--no-inspect", *new_key)
    assert refused.exit_code == 2 and "--trusted-key" in refused.stderr

    ok(
        cli(
            "release",
            "0.1.45",
            "--binary",
            f"linux-amd64={build}",
            "--no-inspect",
            *new_key,
            "--trusted-key",
            site.key.public.b64,
        )
    )
    live = verify_manifest(site.store.read("manifest.json"), trusted=[rotated.public], now=now())
    assert (live.serial, live.reports_url) == (2, REPORTS)
    # AVIKA_PUBLIC_KEYS works as --trusted-key does (comma-separated).
    env = {"AVIKA_PUBLIC_KEYS": f"{rotated.public.b64},{site.key.public.b64}"}
    ok(cli("rollout", "50", "--key", str(site.key.path), "--store", site.url, env=env))
    assert site.live().serial == 3
