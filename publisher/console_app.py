"""``avika-publish serve --console`` (DESIGN section 9): the operator API and the page, locally.

``ConsoleMount`` is what ``publisher/serve.py`` hands console requests to: ``/console/...`` are the
page's static files (``publisher/console/``, read once at start; only names in that folder, with
known types), everything else is ``infra.reports.console_api`` with the caller authenticated by the
local tokens (``AVIKA_CONSOLE_TOKENS``). Every page answer carries the Content-Security-Policy
(``default-src 'self'`` and nothing looser), ``nosniff``, ``no-referrer`` and ``frame-ancestors
'none'``; files get a strong ETag and ``Cache-Control: no-cache`` (always revalidated, so a
new version of the page shows at once).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from agent.manifest import PublicKey
from infra.reports.auth import ConfigError
from infra.reports.console_api import MAX_BODY_BYTES, ConsoleAPI, Releases, Request, etag_matches
from infra.reports.console_auth import ConsoleTokens
from infra.reports.console_routes import is_console_path
from infra.reports.store import ReportStore
from publisher.errors import Refused
from publisher.signing import load_signers
from publisher.store_url import open_store

STATIC = Path(__file__).resolve().parent / "console"
PAGE_PREFIX = "/console/"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
CSP = "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'"
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
FILE_CACHE_CONTROL = "no-cache"


def page_files(folder: Path = STATIC) -> dict[str, bytes]:
    """The page's files by name: regular files directly in ``folder`` with a known type."""
    return {
        path.name: path.read_bytes()
        for path in sorted(folder.iterdir())
        if path.is_file() and path.suffix in CONTENT_TYPES and not path.name.startswith(".")
    }


def content_type(name: str) -> str:
    return CONTENT_TYPES[Path(name).suffix]


class ConsoleMount:
    """Routes ``/console/...`` to the files and the operator API to ``ConsoleAPI``."""

    MAX_BODY = MAX_BODY_BYTES

    def __init__(self, api: ConsoleAPI, tokens: ConsoleTokens, folder: Path = STATIC) -> None:
        self.api = api
        self.tokens = tokens
        self.files = {
            name: (data, f'"{hashlib.sha256(data).hexdigest()[:32]}"')
            for name, data in page_files(folder).items()
        }

    def wants(self, path: str) -> bool:
        return path == PAGE_PREFIX.rstrip("/") or path.startswith(PAGE_PREFIX) or is_console_path(path)

    def handle(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(target)
        lowered = {str(k).lower(): v for k, v in headers.items()}
        if not is_console_path(parts.path):
            return self._page(method, parts.path, lowered)
        principal = self.tokens.authenticate(lowered.get("authorization"))
        answer = self.api.respond(Request(method, parts.path, parts.query, lowered, body), principal)
        return answer.status, answer.all_headers(), answer.encoded()

    def _page(self, method: str, path: str, headers: Mapping[str, str]) -> tuple[int, dict[str, str], bytes]:
        if method not in ("GET", "HEAD"):
            return self._text(405, "method not allowed", {"Allow": "GET, HEAD"})
        if path == PAGE_PREFIX.rstrip("/"):
            return 301, {**PAGE_HEADERS, "Location": PAGE_PREFIX, "Content-Type": "text/plain"}, b""
        name = path[len(PAGE_PREFIX) :] or "index.html"
        found = self.files.get(name)
        if found is None:
            return self._text(404, "not found")
        data, etag = found
        common = {**PAGE_HEADERS, "ETag": etag, "Cache-Control": FILE_CACHE_CONTROL}
        if etag_matches(headers.get("if-none-match"), etag):
            return 304, common, b""
        return 200, {**common, "Content-Type": content_type(name)}, data

    @staticmethod
    def _text(
        status: int, text: str, extra: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {**PAGE_HEADERS, "Content-Type": "text/plain; charset=utf-8", **(extra or {})}
        return status, headers, (text + "\n").encode("utf-8")


def make_console(
    reports_url: str | None,
    store_url: str,
    *,
    key_files: Sequence[str] = (),
    kms_key_ids: Sequence[str] = (),
    public_keys: Sequence[PublicKey] = (),
    tokens: str | None = None,
    endpoint_url: str | None = None,
) -> ConsoleMount:
    """The console for ``serve``: refused (exit 2) without tokens or a reports store.

    ``tokens`` defaults to ``AVIKA_CONSOLE_TOKENS``. A signing key (file or KMS) lets ``operate``
    tokens act; a key file is loaded now, so a bad one stops the server from starting.
    """
    try:
        parsed = ConsoleTokens.parse(tokens if tokens is not None else os.environ.get("AVIKA_CONSOLE_TOKENS"))
    except ConfigError as exc:
        raise Refused(f"--console: {exc}") from None
    if not reports_url:
        raise Refused(
            "--console needs --reports sqlite:///PATH (or dynamodb://TABLE): the console shows reports"
        )
    try:
        reports = ReportStore.from_url(reports_url)
    except ValueError as exc:
        raise Refused(str(exc)) from None
    store = open_store(store_url, endpoint_url=endpoint_url)
    signers = None
    if key_files or kms_key_ids:
        loaded = load_signers(key_files, kms_key_ids)
        signers = lambda: loaded  # noqa: E731 - the signers, made once
    releases = Releases(store, signers=signers, public_keys=list(public_keys))
    return ConsoleMount(ConsoleAPI(reports, releases), parsed)
