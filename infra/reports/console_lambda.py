"""The operator API in AWS (DESIGN section 9): `handler.py` sends console routes here.

The HTTP API's JWT authorizer has validated the caller's token before the Lambda runs; this module
reads the claims it passed (`console_auth.principal_from_claims`) and never looks at the
Authorization header itself, so a console route deployed without the authorizer answers 401 to
everyone (fail closed). Configuration (environment), read once per container:

- the reports store: as the reports endpoint's (`AVIKA_REPORTS_TABLE`, else `AVIKA_REPORTS`);
- `AVIKA_STORE`: the release store (`s3://bucket/prefix`); without it the console shows the fleet
  but no release, and cannot act;
- `AVIKA_KMS_KEY_ID`: the KMS key that signs (`rollout`, `halt`); without it the console is
  read-only (actions answer 503). `AVIKA_SIGNING_KEY` (a key file) does the same when the handler
  runs outside AWS (tests, a local run); in AWS the key never leaves KMS;
- `AVIKA_PUBLIC_KEYS`: further keys the live manifest may be signed with (after a rotation);
- `AVIKA_CLOUDFRONT_DISTRIBUTION_ID`: the distribution whose `/<prefix>/manifest.json` is
  invalidated after an action;
- `AVIKA_CONSOLE_JWT_ISSUER`, `AVIKA_CONSOLE_JWT_AUDIENCE` (optional): refuse claims from another
  issuer or audience even if a misconfigured authorizer let them through.

It imports the publisher (and through it cryptography and packaging), so the deployment package
holds them (`make lambda-zip`); the reports route never imports this module.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from agent.manifest import parse_public_keys
from publisher.signing import load_signers
from publisher.store_url import open_store

from .auth import ConfigError
from .console_api import Answer, ConsoleAPI, Releases, Request, problem
from .console_auth import Principal, claims_of, principal_from_claims

LOG = logging.getLogger("avika.reports")

_api: ConsoleAPI | None = None


def _releases() -> Releases | None:
    url = os.environ.get("AVIKA_STORE")
    if not url:
        return None
    store = open_store(url)
    kms_key_ids = tuple(k for k in [os.environ.get("AVIKA_KMS_KEY_ID", "")] if k)
    key_files = tuple(k for k in [os.environ.get("AVIKA_SIGNING_KEY", "")] if k)
    try:
        public_keys = parse_public_keys(os.environ.get("AVIKA_PUBLIC_KEYS", ""))
    except ValueError as exc:
        raise ConfigError(f"AVIKA_PUBLIC_KEYS: {exc}") from None
    invalidate = None
    distribution = os.environ.get("AVIKA_CLOUDFRONT_DISTRIBUTION_ID")
    if distribution:
        from publisher.cdn import CloudFrontInvalidator

        invalidate = CloudFrontInvalidator(distribution, getattr(store, "prefix", ""), note=LOG.warning)
    return Releases(
        store,
        signers=(lambda: load_signers(key_files, kms_key_ids)) if key_files or kms_key_ids else None,
        public_keys=public_keys,
        invalidate=invalidate,
    )


def api() -> ConsoleAPI:
    """The container's API, configured on first use."""
    global _api
    if _api is None:
        from .handler import _open_store

        _api = ConsoleAPI(_open_store(), _releases())
    return _api


def reset() -> None:
    """Forget the cached configuration (tests; a fresh container does the same)."""
    global _api
    if _api is not None:
        _api.reports.close()
    _api = None


def principal(event: dict[str, Any]) -> Principal | None:
    return principal_from_claims(
        claims_of(event),
        issuer=os.environ.get("AVIKA_CONSOLE_JWT_ISSUER") or None,
        audience=os.environ.get("AVIKA_CONSOLE_JWT_AUDIENCE") or None,
    )


def answer(
    event: dict[str, Any], method: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[Answer, str | None]:
    """(the answer, who asked) for a console route of a payload-2.0 event."""
    who = principal(event)
    try:
        console = api()
    except ConfigError as exc:
        LOG.error("console configuration error", extra={"fields": {"error": str(exc)}})
        return problem(500, "misconfigured", "the console is misconfigured"), None
    except Exception:
        LOG.exception("cannot configure the console")
        return problem(500, "misconfigured", "the console is misconfigured"), None
    request = Request(method, path, str(event.get("rawQueryString") or ""), headers, body)
    return console.respond(request, who), None if who is None else who.who
