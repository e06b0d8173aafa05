"""Publishing (publisher/release.py) against a real directory store and real Ed25519 keys.

Rules under test (DESIGN sections 1, 2, 6): binaries first, ``manifests/<serial>.json`` next
(create-only), ``manifest.json`` last (compare-and-swap); serial = 1 + max(live, archived); every
re-sign bumps the serial and resets expiry; a CI retry is a no-op; new bytes for a published
version, an older version without ``--downgrade`` and ``min_version`` above the version are
refused with the store untouched; ``verify`` audits the signature, expiry and every binary.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest

from agent.manifest import ManifestError, Rollout, verify_manifest
from publisher import release as publishing
from publisher import resign as resigning
from publisher.archive import read_store
from publisher.errors import PublishError, Refused, VerificationFailed
from publisher.release import ReleaseSpec
from publisher.stores import CHUNK, DirStore, archive_key
from tests.publisher_fixtures import NOW, make_binary, new_signer, sha256, snapshot


class RecordingStore(DirStore):
    """The real directory store, noting the order of its writes."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writes: list[str] = []

    def put_immutable(self, key, source, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().put_immutable(key, source, **kwargs)
        self.writes.append(key)

    def put_mutable(self, key, data, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().put_mutable(key, data, **kwargs)
        self.writes.append(key)


@pytest.fixture
def store(tmp_path: Path) -> RecordingStore:
    return RecordingStore(tmp_path / "store")


@pytest.fixture
def signer():
    return new_signer()


@pytest.fixture
def builds(tmp_path: Path) -> dict[str, Path]:
    make_binary(tmp_path / "dist" / "amd64", 5000, "amd64-0.1.44")
    make_binary(tmp_path / "dist" / "arm64", 3000, "arm64-0.1.44")
    return {"linux-amd64": tmp_path / "dist" / "amd64", "linux-arm64": tmp_path / "dist" / "arm64"}


def spec(builds: dict[str, Path], version: str = "0.1.44", **kwargs) -> ReleaseSpec:  # type: ignore[no-untyped-def]
    return ReleaseSpec(version=version, binaries=builds, **{"init": True, **kwargs})


def live(store: DirStore, signer, now=NOW):  # type: ignore[no-untyped-def]
    """The live manifest, through the agent's own verifier."""
    return verify_manifest(store.read("manifest.json"), trusted=[signer.public_key], now=now)


def test_release_uploads_binaries_then_archives_then_makes_the_manifest_live(store, signer, builds) -> None:
    outcome = publishing.release(store, [signer], spec(builds, image="hellodk/avika-agent:0.1.44"), now=NOW)

    assert sorted(store.writes[:2]) == sorted(outcome.uploaded) and len(outcome.uploaded) == 2
    assert store.writes[2:] == ["manifests/1.json", "helm-values.yaml", "manifest.json"]
    assert store.read("manifest.json") == store.read("manifests/1.json") == outcome.envelope
    manifest = live(store, signer)
    assert manifest.serial == 1
    for platform, path in builds.items():
        data = path.read_bytes()
        entry = manifest.binaries[platform]
        assert (entry.sha256, entry.size) == (sha256(data), len(data))
        assert entry.url == f"binaries/0.1.44/{sha256(data)}/avika-agent-{platform}"
        assert store.read(entry.url) == data


def test_manifest_carries_every_option_through_the_agent_verifier(store, signer, builds) -> None:
    publishing.release(
        store, [signer],
        spec(builds, image="hellodk/avika-agent:0.1.44", min_version="v0.1.40", changelog="Fixed WAL",
             rollout_percent=10, reports_url="https://reports.example.com/v1/reports",
             expires_in=timedelta(days=7)),
        now=NOW,
    )  # fmt: skip
    m = live(store, signer)
    assert (m.version, m.min_version, m.changelog, m.container_image) == (
        "0.1.44", "0.1.40", "Fixed WAL", "hellodk/avika-agent:0.1.44",
    )  # fmt: skip
    assert m.rollout == Rollout(10, "0.1.44")  # the salt defaults to the version
    assert (m.released_at, m.expires) == (NOW, NOW + timedelta(days=7))
    assert m.reports_url == "https://reports.example.com/v1/reports" and m.downgrade is False


def test_a_version_given_as_a_tag_is_published_without_the_v(store, signer, builds) -> None:
    outcome = publishing.release(store, [signer], spec(builds, version="v0.1.44"), now=NOW)
    assert live(store, signer).version == "0.1.44"
    assert all(key.startswith("binaries/0.1.44/") for key in outcome.uploaded)


def test_serial_increments_across_release_rollout_halt_and_refresh(store, signer, builds) -> None:
    publishing.release(store, [signer], spec(builds, rollout_percent=10), now=NOW)
    first = live(store, signer)
    later = NOW + timedelta(days=3)

    resigning.resign(store, [signer], percent=50, now=later)
    assert (live(store, signer, later).serial, live(store, signer, later).rollout) == (
        2,
        Rollout(50, "0.1.44"),
    )
    resigning.resign(store, [signer], percent=0, now=later)  # halt
    assert (live(store, signer, later).serial, live(store, signer, later).rollout.percent) == (3, 0)
    resigning.resign(store, [signer], expires_in=timedelta(days=7), now=later)  # refresh
    final = live(store, signer, later)

    assert final.serial == 4 and final.expires == later + timedelta(days=7)
    assert final.rollout.percent == 0  # refresh keeps the halt
    assert (first.signed_at, final.signed_at) == (NOW, later)  # every signing records when
    # Everything but serial, expiry, signing time and rollout is the original release.
    unchanged = dict(serial=1, expires=first.expires, rollout=first.rollout, signed_at=NOW, raw=b"")
    assert dataclasses.replace(final, **unchanged) == dataclasses.replace(first, raw=b"")
    assert store.list("manifests/") == [archive_key(n) for n in (1, 2, 3, 4)]
    assert store.read("manifest.json") == store.read("manifests/4.json")


def test_next_serial_is_above_an_archive_left_by_an_interrupted_publish(store, signer, builds) -> None:
    publishing.release(store, [signer], spec(builds), now=NOW)
    interrupted = dataclasses.replace(live(store, signer), serial=7, raw=b"")
    _, envelope = publishing.sign_checked(interrupted, [signer], NOW)
    store.put_immutable("manifests/7.json", envelope)  # archived, then the publish died
    publishing.release(store, [signer], spec(builds, rollout_percent=20), now=NOW)
    assert live(store, signer).serial == 8


def test_losing_the_race_for_a_serial_fails_clearly_and_leaves_manifest_json(store, signer, builds) -> None:
    publishing.release(store, [signer], spec(builds), now=NOW)
    current = read_store(store, [signer.public_key])
    manifest = dataclasses.replace(current.live_release, serial=2, raw=b"")
    _, envelope = publishing.sign_checked(manifest, [signer], NOW)
    store.put_immutable("manifests/2.json", b"claimed by another publisher a moment ago")
    before = snapshot(store.root)

    with pytest.raises(PublishError, match="serial 2 was claimed by a concurrent publish") as info:
        publishing.publish_envelope(store, manifest, envelope, current.live_token)

    assert info.value.exit_code == 1 and snapshot(store.root) == before


def test_manifest_json_never_moves_back_when_a_newer_publish_landed_first(store, signer, builds) -> None:
    publishing.release(store, [signer], spec(builds), now=NOW)
    stale = read_store(store, [signer.public_key])  # a slow publisher read serial 1 ...
    resigning.resign(store, [signer], percent=50, now=NOW)  # ... a fast one published serial 2
    manifest = dataclasses.replace(stale.live_release, serial=3, raw=b"")
    _, envelope = publishing.sign_checked(manifest, [signer], NOW)

    with pytest.raises(PublishError, match="changed while serial 3 was being published"):
        publishing.publish_envelope(store, manifest, envelope, stale.live_token)
    assert live(store, signer).serial == 2  # the live pointer stayed at the newer publish


def test_an_identical_rerelease_is_a_no_op(store, signer, builds) -> None:
    publishing.release(store, [signer], spec(builds, rollout_percent=10), now=NOW)
    before = snapshot(store.root)

    outcome = publishing.release(
        store, [signer], spec(builds, rollout_percent=10), now=NOW + timedelta(hours=1)
    )

    assert outcome.status == "unchanged" and outcome.manifest.serial == 1
    assert snapshot(store.root) == before


def test_a_rerelease_with_other_options_signs_a_new_serial(store, signer, builds) -> None:
    publishing.release(store, [signer], spec(builds, rollout_percent=10), now=NOW)
    outcome = publishing.release(store, [signer], spec(builds, rollout_percent=20), now=NOW)
    assert outcome.status == "published" and outcome.uploaded == [] and len(outcome.present) == 2
    assert live(store, signer).serial == 2


def test_a_rerelease_signed_by_another_key_is_not_a_no_op(store, signer, builds) -> None:
    publishing.release(store, [signer], spec(builds), now=NOW)
    rotated = new_signer()
    # After a rotation the old key's envelopes are believed only when it is named as trusted.
    outcome = publishing.release(store, [rotated], spec(builds), trusted=[signer.public_key], now=NOW)
    assert outcome.status == "published" and outcome.warnings == []
    assert live(store, rotated).serial == 2


def test_new_bytes_for_a_published_version_are_refused_and_the_store_untouched(
    store, signer, builds, tmp_path
) -> None:
    publishing.release(store, [signer], spec(builds), now=NOW)
    before = snapshot(store.root)
    make_binary(tmp_path / "dist" / "amd64", 5000, "a rebuild with other bytes")

    with pytest.raises(Refused, match=r"already published with other bytes.*linux-amd64") as info:
        publishing.release(store, [signer], spec(builds), now=NOW)

    assert info.value.exit_code == 2 and snapshot(store.root) == before


def test_force_replaces_a_versions_bytes_and_a_retry_of_that_is_a_no_op(
    store, signer, builds, tmp_path
) -> None:
    publishing.release(store, [signer], spec(builds), now=NOW)
    original = (tmp_path / "dist" / "amd64").read_bytes()
    rebuilt = make_binary(tmp_path / "dist" / "amd64", 6000, "rebuilt")

    publishing.release(store, [signer], spec(builds, force=True), now=NOW)
    m = live(store, signer)
    assert m.serial == 2 and m.binaries["linux-amd64"].sha256 == sha256(rebuilt)
    assert store.read(f"binaries/0.1.44/{sha256(original)}/avika-agent-linux-amd64") == original  # immutable

    assert publishing.release(store, [signer], spec(builds), now=NOW).status == "unchanged"  # the CI retry
    (tmp_path / "dist" / "amd64").write_bytes(original)
    with pytest.raises(Refused, match="already published with other bytes"):
        publishing.release(store, [signer], spec(builds), now=NOW)


def test_an_older_version_needs_downgrade_then_points_at_the_binaries_already_there(
    store, signer, builds, tmp_path
) -> None:
    publishing.release(store, [signer], spec(builds, version="0.1.43"), now=NOW)
    newer = {"linux-amd64": tmp_path / "new-amd64"}
    make_binary(newer["linux-amd64"], 4000, "0.1.44")
    arm_dropped = frozenset({"linux-arm64"})
    publishing.release(store, [signer], spec(newer, version="0.1.44", drop_platforms=arm_dropped), now=NOW)
    before = snapshot(store.root)

    with pytest.raises(Refused, match=r"older than the current release 0\.1\.44.*--downgrade") as info:
        publishing.release(store, [signer], spec(builds, version="0.1.43"), now=NOW)
    assert info.value.exit_code == 2 and snapshot(store.root) == before

    outcome = publishing.release(store, [signer], spec(builds, version="0.1.43", downgrade=True), now=NOW)
    m = live(store, signer)
    assert (m.serial, m.version, m.downgrade) == (3, "0.1.43", True)
    assert outcome.uploaded == [] and len(outcome.present) == 2


def test_a_downgrade_with_other_bytes_than_the_archived_release_is_refused(
    store, signer, builds, tmp_path
) -> None:
    publishing.release(store, [signer], spec(builds, version="0.1.43"), now=NOW)
    newer = {"linux-amd64": tmp_path / "new-amd64"}
    make_binary(newer["linux-amd64"], 4000, "0.1.44")
    arm_dropped = frozenset({"linux-arm64"})
    publishing.release(store, [signer], spec(newer, version="0.1.44", drop_platforms=arm_dropped), now=NOW)
    make_binary(builds["linux-arm64"], 3000, "not what 0.1.43 shipped")
    with pytest.raises(Refused, match="linux-arm64"):
        publishing.release(store, [signer], spec(builds, version="0.1.43", downgrade=True), now=NOW)


@pytest.mark.parametrize(
    "min_version, accepted",
    [("0.1.45", False), ("1.0", False), ("0.1.44", True), ("v0.1.40", True)],
)
def test_min_version_may_not_exceed_the_release(store, signer, builds, min_version, accepted) -> None:
    run = lambda: publishing.release(store, [signer], spec(builds, min_version=min_version), now=NOW)  # noqa: E731
    if accepted:
        run()
        assert live(store, signer).min_version == min_version.lstrip("v")
    else:
        with pytest.raises(Refused, match="above the release's own version") as info:
            run()
        assert info.value.exit_code == 2 and snapshot(store.root) == {}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"version": "not-a-version"}, "not a version"),
        ({"min_version": "latest"}, "not a version"),
        ({"binaries": {"Linux AMD64": None}}, "not a platform agents run on"),
        ({"rollout_percent": 101}, "rollout.percent"),
        ({"expires_in": timedelta(0)}, "must be positive"),
    ],
)
def test_invalid_releases_are_refused_before_any_write(store, signer, builds, change, message) -> None:
    if "binaries" in change:
        change = {"binaries": {"Linux AMD64": builds["linux-amd64"]}}
    with pytest.raises(Refused, match=message):
        publishing.release(store, [signer], dataclasses.replace(spec(builds), **change), now=NOW)
    assert snapshot(store.root) == {}


def test_a_dry_run_computes_and_signs_but_writes_nothing(store, signer, builds) -> None:
    publishing.release(store, [signer], spec(builds, version="0.1.43"), now=NOW)
    before = snapshot(store.root)

    outcome = publishing.release(
        store, [signer], spec(builds, image="hellodk/avika-agent:0.1.44"), now=NOW, dry_run=True
    )

    assert snapshot(store.root) == before
    assert outcome.status == "dry_run" and outcome.manifest.serial == 2
    assert outcome.written == ["manifests/2.json", "helm-values.yaml", "manifest.json"]
    assert len(outcome.uploaded) == 2
    assert verify_manifest(outcome.envelope, trusted=[signer.public_key], now=NOW).version == "0.1.44"


def test_a_dry_run_of_an_empty_store_creates_nothing(tmp_path, builds) -> None:
    store = DirStore(tmp_path / "nothing-here")
    outcome = publishing.release(store, [], spec(builds), now=NOW, dry_run=True)
    assert not store.root.exists() and outcome.envelope is None and outcome.manifest.serial == 1


@pytest.mark.parametrize(
    "image, repository, tag",
    [
        ("hellodk/avika-agent:0.1.44", "hellodk/avika-agent", '"0.1.44"'),
        ("registry.local:5000/avika:1.10", "registry.local:5000/avika", '"1.10"'),
        ("hellodk/avika-agent", "hellodk/avika-agent", '"latest"'),
    ],
)
def test_helm_values_name_the_image_repository_and_tag(store, signer, builds, image, repository, tag) -> None:
    publishing.release(store, [signer], spec(builds, image=image), now=NOW)
    text = store.read("helm-values.yaml").decode()
    assert f'\n  repository: "{repository}"\n' in text and f"\n  tag: {tag}\n" in text


def test_no_helm_values_without_an_image(store, signer, builds) -> None:
    publishing.release(store, [signer], spec(builds), now=NOW)
    assert store.read("helm-values.yaml") is None


def test_reports_url_carries_over_unless_cleared(store, signer, builds) -> None:
    url = "https://reports.example.com/v1/reports"
    publishing.release(store, [signer], spec(builds, version="0.1.43", reports_url=url), now=NOW)
    publishing.release(store, [signer], spec(builds), now=NOW)
    assert live(store, signer).reports_url == url
    publishing.release(store, [signer], spec(builds, reports_url=""), now=NOW)
    assert live(store, signer).reports_url is None


def test_resign_refuses_a_live_manifest_it_cannot_verify(store, signer, builds) -> None:
    intruder = new_signer()
    publishing.release(store, [intruder], spec(builds), now=NOW)  # e.g. written by someone else
    before = snapshot(store.root)

    with pytest.raises(VerificationFailed, match="refusing to re-sign") as info:
        resigning.resign(store, [signer], percent=100, now=NOW)
    assert (info.value.exit_code, info.value.code) == (3, "signature_invalid") and snapshot(
        store.root
    ) == before

    # After a key rotation the operator vouches for the old key explicitly.
    resigning.resign(store, [signer], percent=50, trusted=[intruder.public_key], now=NOW)
    assert live(store, signer).serial == 2


def test_resign_of_an_empty_store_fails(store, signer) -> None:
    with pytest.raises(PublishError, match="nothing to re-sign"):
        resigning.resign(store, [signer], now=NOW)


# ---------------------------------------------------------------- verify


def test_verify_passes_a_good_store_and_streams_every_binary(store, signer, tmp_path) -> None:
    big = make_binary(tmp_path / "big", 3 * CHUNK + 123, "big")
    publishing.release(store, [signer], spec({"linux-amd64": tmp_path / "big"}), now=NOW)
    chunks: list[int] = []

    def progress(label, total):  # type: ignore[no-untyped-def]
        import contextlib

        assert (label, total) == ("verifying", len(big))
        return contextlib.nullcontext(chunks.append)

    report = publishing.verify(store, [signer.public_key], now=NOW, progress=progress)

    assert report.exit_code == 0 and report.failures == []
    assert sum(chunks) == len(big) and len(chunks) >= 4 and max(chunks) <= CHUNK


def test_verify_fails_an_expired_manifest(store, signer, builds) -> None:
    publishing.release(store, [signer], spec(builds), now=NOW - timedelta(days=40))
    report = publishing.verify(store, [signer.public_key], now=NOW)
    assert (report.exit_code, report.error) == (3, "expired")


def test_verify_fails_a_manifest_signed_by_an_untrusted_key(store, signer, builds) -> None:
    publishing.release(store, [signer], spec(builds), now=NOW)
    report = publishing.verify(store, [new_signer().public_key], now=NOW)
    assert (report.exit_code, report.error) == (3, "signature_invalid")


@pytest.mark.parametrize(
    "tamper, code",
    [
        (lambda p: p.write_bytes(b"X" + p.read_bytes()[1:]), "checksum_mismatch"),
        (lambda p: p.write_bytes(p.read_bytes()[:-1]), "size_mismatch"),
        (lambda p: p.write_bytes(p.read_bytes() + b"!"), "size_exceeded"),
        (lambda p: p.unlink(), "binary_missing"),
    ],
    ids=["byte-changed", "truncated", "extended", "deleted"],
)
def test_verify_names_what_is_wrong_with_a_binary(store, signer, builds, tamper, code) -> None:
    publishing.release(store, [signer], spec(builds), now=NOW)
    entry = live(store, signer).binaries["linux-arm64"]
    tamper(store.path(entry.url))

    report = publishing.verify(store, [signer.public_key], now=NOW)

    assert report.exit_code == 3
    assert [(b.platform, b.error) for b in report.binaries] == [("linux-amd64", None), ("linux-arm64", code)]
    assert report.to_json()["error"] == code and report.to_json()["ok"] is False


def test_no_single_byte_change_to_the_envelope_is_accepted_as_other_content(store, signer, builds) -> None:
    """Flip each byte of manifest.json: verification fails, or the byte was in the keyid hint (DSSE:
    only a hint) or in base64's unused trailing bits, and the verified payload is the signed one."""
    publishing.release(store, [signer], spec(builds), now=NOW)
    envelope = store.read("manifest.json")
    signed = live(store, signer).raw
    hint = range(envelope.index(b'"keyid"'), envelope.index(b'"sig"'))  # '"keyid": "<64 hex>",'
    for i in range(len(envelope)):
        tampered = envelope[:i] + bytes([envelope[i] ^ 0x01]) + envelope[i + 1 :]
        try:
            manifest = verify_manifest(tampered, trusted=[signer.public_key], now=NOW)
        except ManifestError:
            continue
        assert manifest.raw == signed, f"byte {i} changed the content and still verified"
        assert i in hint or envelope[i + 1 : i + 2] == b"=", (
            f"byte {i} ({envelope[i : i + 1]!r}) was not covered"
        )
