"""Who may use the operator API (DESIGN section 9): scopes `read` and `operate`. Pure, stdlib only.

- Locally (`avika-publish serve --console`), tokens come from `AVIKA_CONSOLE_TOKENS`:
  `name:scope:secret` entries, comma-separated, scope `read` or `operate`. The caller sends
  `Authorization: Bearer <secret>`; the entry's name is who acted (the audit's `who`). Secrets are
  compared in constant time against every entry (their SHA-256, so lengths leak nothing).
- In AWS, the HTTP API's JWT authorizer has validated the token (issuer, audience, expiry,
  signature) before the Lambda runs; the Lambda reads the claims it passes on (payload 2.0:
  `requestContext.authorizer.jwt.claims`) and looks for `avika/read` / `avika/operate` in `scope`
  (space-separated) or `scp` (a list, which API Gateway hands over as the text `[a b]`). Who acted
  is `sub`. Optional defence in depth: with `AVIKA_CONSOLE_JWT_ISSUER` / `AVIKA_CONSOLE_JWT_AUDIENCE`
  set, claims from another issuer or audience are refused too.
- `operate` includes `read`. No credentials: 401; credentials without the route's scope: 403.
- An agent's report token (`infra.reports.auth`) is a different thing and is never looked at here,
  so it can never open the console.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .auth import ConfigError

READ, OPERATE = "read", "operate"
SCOPES = (READ, OPERATE)
JWT_SCOPES = {"avika/read": READ, "avika/operate": OPERATE}
MIN_SECRET_CHARS = 16
MAX_TOKEN_CHARS = 4096
NAME_RE = re.compile(r"[A-Za-z0-9._@+-]{1,64}")
SECRET_RE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")  # printable ASCII without space and comma
_BEARER_RE = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([\x21-\x7e]+) *")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: who (token name or JWT `sub`) and the scopes it holds."""

    who: str
    scopes: frozenset[str]

    def can(self, scope: str) -> bool:
        return scope in self.scopes or (scope == READ and OPERATE in self.scopes)

    def to_json(self) -> dict[str, Any]:
        return {"who": self.who, "scopes": [s for s in SCOPES if self.can(s)]}


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class ConsoleTokens:
    """The local tokens (`AVIKA_CONSOLE_TOKENS`); `authenticate` checks an Authorization header."""

    def __init__(self, entries: list[tuple[str, str, str]]) -> None:
        if not entries:
            raise ConfigError("no console tokens: set AVIKA_CONSOLE_TOKENS to name:scope:secret[,...]")
        self._entries = [(name, scope, _digest(secret)) for name, scope, secret in entries]

    @classmethod
    def parse(cls, text: str | None) -> ConsoleTokens:
        """Parse `name:scope:secret,...`; a bad entry is named by position and name, never its secret."""
        if text is None or not text.strip():
            raise ConfigError("no console tokens: set AVIKA_CONSOLE_TOKENS to name:scope:secret[,...]")
        entries: list[tuple[str, str, str]] = []
        for i, raw in enumerate(text.strip().split(","), 1):
            name, _, rest = raw.strip().partition(":")
            scope, sep, secret = rest.partition(":")
            where = f"AVIKA_CONSOLE_TOKENS entry {i}"
            if not sep:
                raise ConfigError(f"{where}: expected name:scope:secret")
            if not NAME_RE.fullmatch(name):
                raise ConfigError(f"{where}: name must be 1-64 characters of A-Z a-z 0-9 . _ @ + -")
            where += f" ({name})"
            if scope not in SCOPES:
                raise ConfigError(f"{where}: scope must be read or operate, not {scope!r}")
            if len(secret) < MIN_SECRET_CHARS or not SECRET_RE.fullmatch(secret):
                raise ConfigError(
                    f"{where}: secret must be at least {MIN_SECRET_CHARS} printable characters"
                    " without spaces (e.g. `openssl rand -hex 24`)"
                )
            if any(n == name for n, _, _ in entries):
                raise ConfigError(f"{where}: the name is given twice")
            if any(s == secret for _, _, s in entries):
                raise ConfigError(f"{where}: the secret is given twice")
            entries.append((name, scope, secret))
        return cls(entries)

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal of `Authorization: Bearer <secret>`, or None (401)."""
        if authorization is None or len(authorization) > MAX_TOKEN_CHARS:
            return None
        m = _BEARER_RE.fullmatch(authorization.strip())
        if m is None:
            return None
        offered = _digest(m.group(1))
        found: Principal | None = None
        for name, scope, digest in self._entries:  # no early exit: every entry is compared
            if hmac.compare_digest(digest, offered):
                found = Principal(name, frozenset({scope}))
        return found


def _claim_list(value: Any) -> list[str]:
    """A claim that may be a list, `a b`, `a,b` or API Gateway's rendering of a list, `[a b]`."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if not isinstance(value, str):
        return []
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [part for part in re.split(r"[\s,]+", text) if part]


def principal_from_claims(
    claims: Any, *, issuer: str | None = None, audience: str | None = None
) -> Principal | None:
    """The principal of validated JWT claims, or None (401) when they are missing or foreign."""
    if not isinstance(claims, Mapping):
        return None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.strip():
        return None
    if issuer and claims.get("iss") != issuer:
        return None
    if audience and audience not in _claim_list(claims.get("aud")) + _claim_list(claims.get("client_id")):
        return None
    granted = _claim_list(claims.get("scope")) + _claim_list(claims.get("scp"))
    scopes = frozenset(JWT_SCOPES[s] for s in granted if s in JWT_SCOPES)
    return Principal(sub.strip()[:128], scopes)


def claims_of(event: Mapping[str, Any]) -> Any:
    """The JWT claims an HTTP API authorizer put in a payload-2.0 event (None without any)."""
    context = event.get("requestContext")
    authorizer = context.get("authorizer") if isinstance(context, Mapping) else None
    jwt = authorizer.get("jwt") if isinstance(authorizer, Mapping) else None
    return jwt.get("claims") if isinstance(jwt, Mapping) else None
