"""``history`` and ``rollback-to`` (DESIGN section 6; issue 12), on a directory and on S3 (moto).

- ``history`` lists every archived serial, newest first: serial, version, rollout, expires,
  released_at, signed_at, the key ids its signatures name, whether it verifies with the trusted
  keys (the signing key's, ``--trusted-key``, ``AVIKA_PUBLIC_KEYS``) and which of them signed it;
  a ``manifest.json`` that is no archived envelope is a row of its own. It needs a trusted key.
- ``rollback-to VERSION`` signs the newest verified archived manifest of an older VERSION again
  (serial + 1, ``downgrade: true``, fresh expiry and ``signed_at``, the live release's
  ``reports_url``, no rollout plan, ``helm-values.yaml`` for its image) after re-hashing its
  binaries in the store; refused with exit 2 and the store untouched when the version is not
  archived, not older than the live one, or its binaries are missing or different. At the same
  version and percent again: nothing signed. ``expect_serial`` (the operator API's If-Match) is
  refused when the live serial moved, for ``resign`` and ``rollback_to`` alike.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.manifest import sign_envelope, verify_manifest
from publisher import release as publishing
from publisher import resign as resigning
from publisher.archive import read_store
from publisher.errors import Refused
from publisher.signing import load_key_file
from publisher.stores import DirStore, Store
from tests.publisher_fixtures import cli, make_binary, new_key_file, new_signer
from tests.test_publisher_s3 import STORE, moto_s3_store

OLD_REPORTS = "https://reports-old.example.com/v1/reports"
REPORTS = "https://reports.example.com/v1/reports"


@dataclass
class Site:
    store: Store
    url: str
    tmp: Path
    key: Any

    def args(self, *extra: str) -> list[str]:
        return ["--key", str(self.key.path), "--store", self.url, *extra]

    def build(self, version: str, platform: str = "linux-amd64", seed: str = "") -> Path:
        path = self.tmp / "dist" / version / f"avika-agent-{platform}"
        make_binary(path, 5000, f"{version}-{platform}{seed}")
        return path

    def release(self, version: str, *extra: str) -> None:
        binaries = [f"--binary={p}={self.build(version, p)}" for p in ("linux-amd64", "linux-arm64")]
        image = ["--image", f"hellodk/avika-agent:{version}"]
        done = cli("release", version, *binaries, *image, "--init", "--no-inspect", *self.args(*extra))
        assert done.exit_code == 0, done.stderr

    def live(self) -> Any:
        data = self.store.read("manifest.json")
        return verify_manifest(data, trusted=[self.key.public], now=datetime.now(UTC))

    def contents(self) -> dict[str, str]:
        return {k: hashlib.sha256(self.store.read(k) or b"").hexdigest() for k in self.store.list("")}


@pytest.fixture(params=["dir", "s3"])
def site(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    """0.1.43 (serial 1), then 0.1.44 at 10 % with another reports URL (serial 2), rollout 50 (3)."""
    key = new_key_file(tmp_path)
    with (
        moto_s3_store(monkeypatch)
        if request.param == "s3"
        else nullcontext(DirStore(tmp_path / "store")) as store
    ):
        url = STORE if request.param == "s3" else str(tmp_path / "store")
        s = Site(store, url, tmp_path, key)
        s.release("0.1.43", "--reports-url", OLD_REPORTS)
        s.release("0.1.44", "--rollout", "10", "--reports-url", REPORTS)
        assert cli("rollout", "50", *s.args()).exit_code == 0
        yield s


# ---------------------------------------------------------------- history


def test_history_lists_every_archived_serial_newest_first(site: Site) -> None:
    result = cli("history", *site.args("--json"))
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    keyid = site.key.public.keyid
    assert [(r["serial"], r["version"], r["rollout"], r["live"]) for r in rows] == [
        (3, "0.1.44", 50, True),
        (2, "0.1.44", 10, False),
        (1, "0.1.43", 100, False),
    ]
    for row in rows:
        assert row["verified"] is True and row["error"] is None
        assert row["key_ids"] == [keyid] and row["verified_by"] == [keyid]
        assert row["key"] == f"manifests/{row['serial']}.json"
        for name in ("expires", "released_at", "signed_at"):
            assert datetime.fromisoformat(row[name].replace("Z", "+00:00")).tzinfo is not None
    assert rows[0]["signed_at"] >= rows[1]["signed_at"] and rows[0]["released_at"] == rows[1]["released_at"]


def test_history_shows_what_does_not_verify_without_using_it(site: Site) -> None:
    intruder = new_signer()
    forged = replace(site.live(), serial=9, version="6.6.6", raw=b"")
    site.store.put_immutable("manifests/9.json", sign_envelope(forged.to_payload(), [intruder]))
    site.store.put_immutable("manifests/7.json", b"junk")
    site.store.put_mutable("manifest.json", b"{}")

    rows = json.loads(cli("history", *site.args("--json")).stdout)

    by_key = {r["key"]: r for r in rows}
    assert (by_key["manifests/9.json"]["verified"], by_key["manifests/9.json"]["error"]) == (
        False,
        "signature_invalid",
    )
    assert by_key["manifests/9.json"]["version"] == "6.6.6"  # what it claims, marked as unverified
    assert by_key["manifests/9.json"]["key_ids"] == [intruder.public_key.keyid]
    assert by_key["manifests/9.json"]["verified_by"] == []
    assert (by_key["manifests/7.json"]["serial"], by_key["manifests/7.json"]["error"]) == (
        7,
        "malformed_envelope",
    )
    assert by_key["manifest.json"]["live"] is True and by_key["manifest.json"]["verified"] is False
    assert not any(r["live"] for r in rows if r["key"] != "manifest.json")

    text = cli("history", *site.args())
    assert text.exit_code == 0
    assert "NO (signature_invalid)" in text.stdout and "3 object(s) do not verify" in text.stdout
    assert text.stdout.splitlines()[1].split() == [
        "SERIAL", "VERSION", "ROLLOUT", "RELEASED", "SIGNED", "EXPIRES", "SIGNERS", "VERIFIES", "LIVE"
    ]  # fmt: skip


def test_history_needs_a_trusted_key_and_takes_one_without_a_private_key(site: Site) -> None:
    none = cli("history", "--store", site.url)
    assert none.exit_code == 2 and "--trusted-key" in none.stderr
    env = {"AVIKA_PUBLIC_KEYS": site.key.public.b64}
    rows = json.loads(cli("history", "--store", site.url, "--json", env=env).stdout)
    assert all(r["verified"] for r in rows) and len(rows) == 3
    other = json.loads(
        cli("history", "--store", site.url, "--json", "--trusted-key", new_signer().public_key.b64).stdout
    )
    assert not any(r["verified"] for r in other)


# ---------------------------------------------------------------- rollback-to


def test_rollback_to_signs_the_archived_version_again_as_a_downgrade(site: Site) -> None:
    archived = verify_manifest(
        site.store.read("manifests/1.json"), trusted=[site.key.public], now=datetime.now(UTC)
    )
    result = cli("rollback-to", "v0.1.43", *site.args("--json"))
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["status"], out["serial"], out["version"], out["percent"]) == ("published", 4, "0.1.43", 100)

    live = site.live()
    assert (live.serial, live.version, live.downgrade, live.rollout.percent) == (4, "0.1.43", True, 100)
    assert live.binaries == archived.binaries and live.rollout.salt == archived.rollout.salt
    assert live.container_image == "hellodk/avika-agent:0.1.43" and live.rollout_plan is None
    assert live.reports_url == REPORTS  # the live release's, not the archived one's
    assert live.signed_at is not None and live.expires - live.signed_at == timedelta(days=30)
    assert 'tag: "0.1.43"' in site.store.read("helm-values.yaml").decode()
    assert site.store.read("manifests/4.json") == site.store.read("manifest.json")


def test_rollback_to_at_the_same_percent_again_signs_nothing_and_can_be_staged(site: Site) -> None:
    assert cli("rollback-to", "0.1.43", "--rollout", "10", *site.args()).exit_code == 0
    assert (site.live().serial, site.live().rollout.percent) == (4, 10)
    before = site.contents()
    again = cli("rollback-to", "0.1.43", "--rollout", "10", *site.args())
    assert again.exit_code == 0 and "already rolled back to 0.1.43 at 10%" in again.stdout
    assert site.contents() == before
    assert cli("rollout", "100", *site.args()).exit_code == 0
    assert (site.live().serial, site.live().version, site.live().downgrade) == (5, "0.1.43", True)


@pytest.mark.parametrize(
    "version, message",
    [
        ("0.1.40", "no archived manifest of 0.1.40"),
        ("0.1.44", "not older than the current release 0.1.44"),
        ("0.2.0", "not older than the current release 0.1.44"),
        ("not-a-version", "is not a version"),
    ],
)
def test_rollback_to_what_cannot_be_rolled_back_to_is_refused(site: Site, version: str, message: str) -> None:
    before = site.contents()
    result = cli("rollback-to", version, *site.args())
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert site.contents() == before


@pytest.mark.parametrize("damage", ["missing", "other-bytes"])
def test_rollback_to_rehashes_the_binaries_and_refuses_when_they_changed(site: Site, damage: str) -> None:
    archived = verify_manifest(
        site.store.read("manifests/1.json"), trusted=[site.key.public], now=datetime.now(UTC)
    )
    key = archived.binaries["linux-arm64"].url
    if isinstance(site.store, DirStore):
        path = site.store.path(key)
        path.unlink() if damage == "missing" else path.write_bytes(
            b"\0" * archived.binaries["linux-arm64"].size
        )
    else:
        client = site.store.client
        if damage == "missing":
            client.delete_object(Bucket=site.store.bucket, Key=site.store.name(key))
        else:
            client.put_object(Bucket=site.store.bucket, Key=site.store.name(key), Body=b"\0" * 5000)
    before = site.contents()

    result = cli("rollback-to", "0.1.43", *site.args())

    assert result.exit_code == 2, result.stderr
    assert "linux-arm64" in result.stderr and "nothing was signed" in result.stderr
    assert ("is missing" if damage == "missing" else "expected 5000 bytes") in result.stderr
    assert site.contents() == before


def test_rollback_to_uses_only_verified_archives(site: Site) -> None:
    intruder = new_signer()
    fake = replace(site.live(), serial=8, version="0.1.40", raw=b"")
    site.store.put_immutable("manifests/8.json", sign_envelope(fake.to_payload(), [intruder]))
    result = cli("rollback-to", "0.1.40", *site.args())
    assert result.exit_code == 2 and "no archived manifest of 0.1.40" in result.stderr


def test_rollback_to_takes_the_newest_bytes_of_a_version_replaced_with_force(site: Site) -> None:
    forced = site.build("0.1.43", "linux-amd64", seed="-rebuilt")
    arm = site.build("0.1.43", "linux-arm64")
    done = cli(
        "release", "0.1.43", f"--binary=linux-amd64={forced}", f"--binary=linux-arm64={arm}", "--downgrade",
        "--force", "--no-inspect", *site.args(),
    )  # fmt: skip
    assert done.exit_code == 0, done.stderr
    site.release("0.1.44")
    assert cli("rollback-to", "0.1.43", *site.args()).exit_code == 0
    assert site.live().binaries["linux-amd64"].sha256 == hashlib.sha256(forced.read_bytes()).hexdigest()


# ---------------------------------------------------------------- the library, as the operator API calls it


def test_the_serial_the_caller_saw_must_still_be_live(tmp_path: Path) -> None:
    key = new_key_file(tmp_path)
    signer = load_key_file(key.path)
    store = DirStore(tmp_path / "store")
    build = tmp_path / "amd64"
    make_binary(build, 3000, "0.1.43")
    publishing.release(store, [signer], publishing.ReleaseSpec("0.1.43", {"linux-amd64": build}, init=True))
    make_binary(build, 3000, "0.1.44")
    publishing.release(store, [signer], publishing.ReleaseSpec("0.1.44", {"linux-amd64": build}))
    before = {k: store.read(k) for k in store.list("")}

    with pytest.raises(resigning.SerialMoved) as moved:
        resigning.resign(store, [signer], percent=0, expect_serial=1)
    assert moved.value.live_serial == 2 and moved.value.exit_code == 1
    with pytest.raises(resigning.SerialMoved):
        resigning.rollback_to(store, [signer], "0.1.43", expect_serial=1)
    assert {k: store.read(k) for k in store.list("")} == before

    assert resigning.resign(store, [signer], percent=0, expect_serial=2).manifest.serial == 3
    assert resigning.rollback_to(store, [signer], "0.1.43", expect_serial=3).manifest.serial == 4


def test_rollback_source_is_pure_over_a_store_view(tmp_path: Path) -> None:
    key = new_key_file(tmp_path)
    signer = load_key_file(key.path)
    store = DirStore(tmp_path / "store")
    build = tmp_path / "amd64"
    for version in ("0.1.42", "0.1.43", "0.1.44"):
        make_binary(build, 3000, version)
        publishing.release(
            store, [signer], publishing.ReleaseSpec(version, {"linux-amd64": build}, init=True)
        )
    view = read_store(store, [signer.public_key])

    assert resigning.rollback_source(view, "0.1.42").serial == 1
    planned = resigning.rolled_back(
        resigning.rollback_source(view, "0.1.43"),
        serial=view.next_serial(),
        now=datetime(2026, 3, 1, tzinfo=UTC),
        expires_in=timedelta(days=7),
        percent=25,
        reports_url=None,
    )
    assert (planned.serial, planned.version, planned.downgrade, planned.rollout.percent) == (
        4,
        "0.1.43",
        True,
        25,
    )
    assert planned.expires == datetime(2026, 3, 8, tzinfo=UTC)
    with pytest.raises(Refused, match="not older"):
        resigning.rollback_source(view, "0.1.44")
