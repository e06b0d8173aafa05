"""Signers (publisher/signing.py): a local key file and AWS KMS behind one interface.

KMS is exercised with botocore's Stubber (moto's KMS has no Ed25519): the stub answers with the
DER public key and real signatures of a local Ed25519 key, and its ``expected_params`` insist on
``MessageType=RAW`` and ``SigningAlgorithm=ED25519_SHA_512`` over the exact DSSE PAE bytes.
The resulting envelopes must verify with ``agent.manifest`` like any other.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.stub import ANY, Stubber
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.manifest import (
    PAYLOAD_TYPE,
    LocalSigner,
    generate_private_key,
    pae,
    public_key_of,
    sign_envelope,
    verify_envelope,
    verify_manifest,
)
from publisher import release as publishing
from publisher.errors import PublishError, Refused
from publisher.signing import (
    KeyFileError,
    KmsSigner,
    SigningError,
    load_key_file,
    load_private_key_pem,
    load_signers,
    private_key_to_pem,
    write_new_key,
)
from publisher.stores import DirStore
from tests.publisher_fixtures import NOW, make_binary, snapshot

KEY_ID = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


@pytest.fixture
def kms() -> Iterator[tuple[object, Stubber]]:
    client = boto3.client(
        "kms", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def _der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _expect_public_key(stubber: Stubber, der: bytes) -> None:
    stubber.add_response(
        "get_public_key",
        {"KeyId": KEY_ID, "PublicKey": der, "KeySpec": "ECC_NIST_EDWARDS25519", "KeyUsage": "SIGN_VERIFY"},
        expected_params={"KeyId": KEY_ID},
    )


def _expect_sign(stubber: Stubber, message: object, signature: bytes) -> None:
    stubber.add_response(
        "sign",
        {"KeyId": KEY_ID, "Signature": signature, "SigningAlgorithm": "ED25519_SHA_512"},
        expected_params={
            "KeyId": KEY_ID,
            "Message": message,
            "MessageType": "RAW",
            "SigningAlgorithm": "ED25519_SHA_512",
        },
    )


def test_kms_signer_signs_the_pae_bytes_raw_and_the_envelope_verifies(kms) -> None:
    client, stubber = kms
    local = generate_private_key()
    payload = b'{"schema":1}'
    message = pae(PAYLOAD_TYPE, payload)
    _expect_public_key(stubber, _der(local.public_key()))
    _expect_sign(stubber, message, local.sign(message))
    signer = KmsSigner(KEY_ID, client=client)

    envelope = sign_envelope(payload, [signer])

    assert signer.public_key == public_key_of(local)
    # The envelope is checked by the agent's own code: signature over exactly these bytes.
    assert verify_envelope(envelope, [public_key_of(local)]) == payload


def test_a_release_signed_in_kms_verifies_with_the_agent_verifier(kms, tmp_path: Path) -> None:
    client, stubber = kms
    local = generate_private_key()
    make_binary(tmp_path / "amd64", 4096, "amd64")
    spec = publishing.ReleaseSpec("0.1.44", {"linux-amd64": tmp_path / "amd64"}, init=True)
    store = DirStore(tmp_path / "store")
    # What will be signed is deterministic for a given clock: learn it from an unsigned dry run.
    planned = publishing.release(store, [], spec, now=NOW, dry_run=True).manifest
    message = pae(PAYLOAD_TYPE, planned.to_payload())
    _expect_public_key(stubber, _der(local.public_key()))
    _expect_sign(stubber, message, local.sign(message))

    outcome = publishing.release(store, [KmsSigner(KEY_ID, client=client)], spec, now=NOW)

    live = store.read("manifest.json")
    assert outcome.status == "published" and live == outcome.envelope
    manifest = verify_manifest(live, trusted=[public_key_of(local)], now=NOW)
    assert manifest.serial == 1 and manifest.version == "0.1.44"


def test_a_kms_signature_that_does_not_verify_publishes_nothing(kms, tmp_path: Path) -> None:
    client, stubber = kms
    local = generate_private_key()
    make_binary(tmp_path / "amd64", 4096, "amd64")
    store = DirStore(tmp_path / "store")
    _expect_public_key(stubber, _der(local.public_key()))
    _expect_sign(stubber, ANY, generate_private_key().sign(b"something else"))  # a wrong signature

    spec = publishing.ReleaseSpec("0.1.44", {"linux-amd64": tmp_path / "amd64"}, init=True)
    with pytest.raises(PublishError, match="failed re-verification"):
        publishing.release(store, [KmsSigner(KEY_ID, client=client)], spec, now=NOW)
    assert store.read("manifest.json") is None and store.list("manifests/") == []


def test_a_kms_key_that_is_not_ed25519_is_refused(kms) -> None:
    client, stubber = kms
    _expect_public_key(stubber, _der(ec.generate_private_key(ec.SECP256R1()).public_key()))
    with pytest.raises(SigningError, match="not Ed25519"):
        _ = KmsSigner(KEY_ID, client=client).public_key


def test_kms_errors_are_operational_failures(kms) -> None:
    client, stubber = kms
    stubber.add_client_error("sign", service_error_code="AccessDeniedException", http_status_code=400)
    with pytest.raises(SigningError, match="AccessDeniedException") as info:
        KmsSigner(KEY_ID, client=client).sign(b"message")
    assert info.value.exit_code == 1


def test_kms_refuses_messages_over_its_raw_limit_without_calling_it(kms) -> None:
    client, _ = kms  # no responses queued: any call would fail the stubber
    with pytest.raises(SigningError, match="at most 4096"):
        KmsSigner(KEY_ID, client=client).sign(b"x" * 4097)


def test_new_key_file_is_0600_whatever_the_umask_and_loads_back(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        public = write_new_key(tmp_path / "k.pem")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    assert load_key_file(tmp_path / "k.pem").public_key == public
    assert public_key_of(load_private_key_pem((tmp_path / "k.pem").read_bytes())) == public


def test_new_key_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "k.pem").write_bytes(b"precious")
    with pytest.raises(KeyFileError, match="refusing to overwrite") as info:
        write_new_key(tmp_path / "k.pem")
    assert info.value.exit_code == 2
    assert (tmp_path / "k.pem").read_bytes() == b"precious"


@pytest.mark.parametrize(
    "content, message",
    [(None, "No such file"), (b"not a key", "not an unencrypted PEM"), ("ec", "not Ed25519")],
    ids=["missing", "garbage", "wrong-type"],
)
def test_unusable_key_files_are_usage_errors(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "k.pem"
    if content == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
        content = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    if content is not None:
        path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(KeyFileError, match=message) as info:
        load_key_file(path)
    assert info.value.exit_code == 2


def test_signing_needs_at_least_one_key(tmp_path: Path) -> None:
    with pytest.raises(Refused, match="no signing key"):
        load_signers([], [])
    write_new_key(tmp_path / "a.pem")
    write_new_key(tmp_path / "b.pem")
    signers = load_signers([str(tmp_path / "a.pem"), str(tmp_path / "b.pem")], [KEY_ID])
    assert [type(s).__name__ for s in signers] == ["LocalSigner", "LocalSigner", "KmsSigner"]
    assert snapshot(tmp_path).keys() == {"a.pem", "b.pem"}


# ---------------------------------------------------------------- key files (PEM)


K1 = generate_private_key()


def test_private_key_pem_round_trips() -> None:
    pem = private_key_to_pem(K1)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_private_key_pem(pem)
    assert public_key_of(loaded) == public_key_of(K1)
    assert LocalSigner(loaded).sign(b"x") == K1.sign(b"x")


@pytest.mark.parametrize(
    "pem",
    [
        pytest.param(b"not a pem", id="garbage"),
        pytest.param(
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            id="an EC key",
        ),
        pytest.param(
            K1.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
            id="an encrypted key",
        ),
    ],
)
def test_loading_anything_but_an_unencrypted_ed25519_pem_is_a_value_error(pem: bytes) -> None:
    with pytest.raises(ValueError):
        load_private_key_pem(pem)
