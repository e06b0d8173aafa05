"""Who signs manifests: a local key file or an AWS KMS key, one interface (``agent.manifest.Signer``).

A key file is an unencrypted PKCS#8 PEM Ed25519 key (``avika-publish keygen``), loaded into
``agent.manifest.LocalSigner``. A KMS key is an ``ECC_NIST_EDWARDS25519`` key used with
``SigningAlgorithm=ED25519_SHA_512`` over the RAW message (the DSSE PAE bytes), so the signature
is plain Ed25519 and verifies with the same public key an agent pins. boto3 is imported only
when a KMS key is used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.manifest import LocalSigner, PublicKey, Signer, generate_private_key, public_key_of
from publisher.errors import PublishError, Refused


class SigningError(PublishError):
    """Signing failed (KMS unreachable, denied, wrong key type): exit 1."""

    code = "signing_failed"


class KeyFileError(Refused):
    """A key file that cannot be used (missing, not Ed25519, or would be overwritten): exit 2."""

    code = "bad_key"


def private_key_to_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key_pem(data: bytes) -> Ed25519PrivateKey:
    """Load an unencrypted PKCS#8 PEM; ``ValueError`` if it is not an Ed25519 private key."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"key is {type(key).__name__}, not Ed25519")
    return key


def load_key_file(path: str | Path) -> LocalSigner:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"signing key {path}: {exc.strerror or exc}") from None
    try:
        return LocalSigner(load_private_key_pem(data))
    except ValueError as exc:
        raise KeyFileError(f"signing key {path}: {exc}") from None


def write_new_key(path: str | Path) -> PublicKey:
    """Generate an Ed25519 key into a new file (mode 0600, never overwriting); return its public key."""
    key = generate_private_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)  # whatever the umask
        out.write(private_key_to_pem(key))
        out.flush()
        os.fsync(out.fileno())
    return public_key_of(key)


class KmsSigner:
    """Signs with an AWS KMS Ed25519 key; the public key is fetched once from KMS."""

    SIGNING_ALGORITHM = "ED25519_SHA_512"
    # KMS signs RAW messages of at most 4096 bytes; a manifest with a huge changelog could exceed it.
    MAX_MESSAGE_BYTES = 4096

    def __init__(self, key_id: str, *, client: Any = None, region_name: str | None = None) -> None:
        self.key_id = key_id
        self._client = client
        self._region_name = region_name
        self._public: PublicKey | None = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3

            self._client = boto3.client("kms", region_name=self._region_name)
        return self._client

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(KeyId=self.key_id, **params)
        except (BotoCoreError, ClientError) as exc:
            raise SigningError(f"KMS {operation} with key {self.key_id}: {exc}") from None

    @property
    def public_key(self) -> PublicKey:
        if self._public is None:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

            der = self._call("get_public_key")["PublicKey"]
            try:
                key = serialization.load_der_public_key(der)
            except ValueError as exc:
                raise SigningError(f"KMS key {self.key_id}: unreadable public key: {exc}") from None
            if not isinstance(key, Ed25519PublicKey):
                raise SigningError(
                    f"KMS key {self.key_id} is {type(key).__name__}, not Ed25519 (ECC_NIST_EDWARDS25519)"
                )
            self._public = PublicKey(
                key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            )
        return self._public

    def sign(self, data: bytes) -> bytes:
        if len(data) > self.MAX_MESSAGE_BYTES:
            raise SigningError(
                f"the message to sign is {len(data)} bytes; KMS signs at most {self.MAX_MESSAGE_BYTES} "
                "(shorten the changelog)"
            )
        signature = self._call(
            "sign", Message=data, MessageType="RAW", SigningAlgorithm=self.SIGNING_ALGORITHM
        )["Signature"]
        if len(signature) != 64:
            raise SigningError(
                f"KMS key {self.key_id} returned a {len(signature)}-byte signature, not Ed25519"
            )
        return signature


def load_signers(key_files: Sequence[str], kms_key_ids: Sequence[str]) -> list[Signer]:
    """Every ``--key`` and ``--kms-key-id`` signs (several make a threshold signature)."""
    if not key_files and not kms_key_ids:
        raise Refused(
            "no signing key: pass --key KEY or --kms-key-id ID (or set AVIKA_SIGNING_KEY / AVIKA_KMS_KEY_ID)"
        )
    # A CI variable that is unset arrives as --kms-key-id "" (or --key ""): name it, not botocore.
    if any(not path.strip() for path in key_files):
        raise Refused("--key is empty (is AVIKA_SIGNING_KEY set?): give the path of the signing key file")
    if any(not key_id.strip() for key_id in kms_key_ids):
        raise Refused("--kms-key-id is empty (is AVIKA_KMS_KEY_ID set?): give the KMS key id, ARN or alias")
    signers: list[Signer] = [load_key_file(path) for path in key_files]
    signers += [KmsSigner(key_id) for key_id in kms_key_ids]
    return signers
