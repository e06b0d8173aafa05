"""Report tokens (DESIGN §5): `hex(HMAC-SHA256(fleet_secret, agent_id))`.

A token is derived, not stored, so the endpoint needs no per-agent table and an agent cannot report
as another. Two secrets (current, previous) are accepted so the fleet secret can rotate without a
flag day. Pure and standard-library only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence

MIN_SECRET_BYTES = 16
MAX_SECRETS = 2  # current, previous
TOKEN_RE = re.compile(r"[0-9a-fA-F]{64}")
_BEARER_RE = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([0-9a-fA-F]{64}) *")


class ConfigError(Exception):
    """The endpoint is misconfigured (no or weak secret); the client gets a 500, the log the detail."""


def parse_secrets(value: str | None) -> list[bytes]:
    """Parse `current` or `current,previous` into secret bytes, current first.

    Surrounding whitespace is ignored (secret files end with a newline); each secret must be at
    least 16 bytes of UTF-8, so a typo cannot leave the fleet guarded by a guessable key.
    """
    if value is None or not value.strip():
        raise ConfigError("fleet secret is empty or not configured")
    parts = [part.strip() for part in value.strip().split(",")]
    if len(parts) > MAX_SECRETS:
        raise ConfigError(f"fleet secret holds {len(parts)} values; expected 'current' or 'current,previous'")
    secrets = [part.encode("utf-8") for part in parts]
    for name, secret in zip(("current", "previous"), secrets):
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"{name} fleet secret is shorter than {MIN_SECRET_BYTES} bytes")
    return secrets


def make_token(secret: str | bytes, agent_id: str) -> str:
    """The report token of `agent_id` (what `avika-publish enroll` prints): 64 lowercase hex digits."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return hmac.new(key, agent_id.encode("utf-8"), hashlib.sha256).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    """The lowercase token from `Authorization: Bearer <64 hex>`, or None when missing/malformed."""
    if authorization is None:
        return None
    m = _BEARER_RE.fullmatch(authorization.strip())
    return m.group(1).lower() if m else None


def token_matches(token: str, agent_id: str, secrets: Sequence[bytes]) -> bool:
    """Constant-time check of `token` against every accepted secret (no early exit on a match)."""
    ok = False
    for secret in secrets:
        ok |= hmac.compare_digest(make_token(secret, agent_id), token)
    return ok
