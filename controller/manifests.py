"""Where the controller's manifest comes from, verified by the agent's own module (DESIGN section 10).

The same errors, the same serial rule, the same binary-URL rule as an agent (``platform`` None:
a container verifier needs no binary for its platform): :func:`agent.manifest.verify_manifest`.
The envelope is fetched by the agent's :class:`agent.fetch.HttpFetcher` (size cap, at most three
redirects, never https to http), with ``If-None-Match``; a 304 verifies the cached envelope again,
expiry and serial included, as ``avika-agent check`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from agent.fetch import Fetcher, HttpFetcher
from agent.manifest import MAX_ENVELOPE_BYTES, Manifest, PublicKey, TrustState, verify_manifest
from controller.config import manifest_url_for


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def read_source(source: str, fetcher: Fetcher | None = None) -> tuple[bytes, str | None]:
    """(envelope bytes, manifest URL) from a file path or an http(s) URL (``plan --manifest``).

    A file is read up to one byte past the envelope cap, so an oversized one is ``too_large`` by
    the verifier without being read whole. ``OSError`` / ``FetchFailed`` for what cannot be read.
    """
    if is_url(source):
        url = manifest_url_for(source)
        own = fetcher is None
        fetcher = fetcher or HttpFetcher()
        try:
            _, body, _ = fetcher.get_manifest(url)
        finally:
            if own:
                fetcher.close()
        return body, url
    with Path(source).open("rb") as fh:
        return fh.read(MAX_ENVELOPE_BYTES + 1), None


def verify(
    data: bytes,
    keys: Sequence[PublicKey],
    *,
    threshold: int,
    trust: TrustState,
    now: datetime,
    manifest_url: str | None,
    binary_origins: Sequence[str] = (),
) -> Manifest:
    """What an agent checks, in its order; ``platform`` None: a container verifier needs no binary.

    ``manifest_url`` None (a file): binary URLs must be relative or on ``binary_origins``.
    """
    return verify_manifest(
        data,
        trusted=keys,
        threshold=threshold,
        now=now,
        trust=trust,
        platform=None,
        manifest_url=manifest_url,
        binary_origins=binary_origins,
    )


class ManifestSource:
    """The live manifest for the ``run`` loop: conditional GET, verification, the cached envelope."""

    def __init__(
        self,
        url: str,
        keys: Sequence[PublicKey],
        *,
        threshold: int = 1,
        binary_origins: Sequence[str] = (),
        fetcher: Fetcher | None = None,
    ) -> None:
        self.url = url
        self.keys = tuple(keys)
        self.threshold = threshold
        self.binary_origins = tuple(binary_origins)
        self.fetcher = fetcher or HttpFetcher()
        self._envelope: bytes | None = None
        self._etag: str | None = None

    def verify(self, data: bytes, trust: TrustState, now: datetime) -> Manifest:
        return verify(
            data,
            self.keys,
            threshold=self.threshold,
            trust=trust,
            now=now,
            manifest_url=self.url,
            binary_origins=self.binary_origins,
        )

    def fetch(self, trust: TrustState, now: datetime) -> Manifest:
        """Fetch (``If-None-Match`` when an envelope is cached) and verify; the envelope is cached
        only after it verified. Raises ``ManifestError`` or ``FetchFailed``."""
        status, body, etag = self.fetcher.get_manifest(self.url, self._etag if self._envelope else None)
        data = self._envelope if status == 304 and self._envelope is not None else body
        manifest = self.verify(data, trust, now)
        self._envelope, self._etag = data, etag
        return manifest

    def cached(self, trust: TrustState, now: datetime) -> Manifest | None:
        """The last verified envelope, verified again now (it may have expired); None if none."""
        if self._envelope is None:
            return None
        return self.verify(self._envelope, trust, now)

    def close(self) -> None:
        self.fetcher.close()
