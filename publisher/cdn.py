"""CloudFront invalidation after a publish (DESIGN section 2: only ``/<prefix>/manifest.json``).

The distribution serves the bucket root (no origin path), so the live pointer of the store
``s3://bucket/prefix`` is ``/<prefix>/manifest.json``. Binaries and archived manifests are
content-addressed and immutable, so nothing else is ever invalidated. Every invalidation has a
unique CallerReference (time + uuid): CloudFront treats a repeated reference as the same request
and would silently skip a second publish's purge.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

from botocore.exceptions import BotoCoreError, ClientError

from publisher.errors import PublishError
from publisher.s3store import describe_aws_error, make_client
from publisher.stores import MANIFEST_KEY


class InvalidationError(PublishError):
    """CloudFront refused or failed the invalidation: exit 1 (the manifest itself is already live)."""

    code = "invalidation_failed"


def manifest_path(prefix: str) -> str:
    """The CDN path of the store's ``manifest.json`` (URL-encoded, as CloudFront expects)."""
    prefix = prefix.strip("/")
    return quote(f"/{prefix}/{MANIFEST_KEY}" if prefix else f"/{MANIFEST_KEY}")


def caller_reference() -> str:
    return f"avika-publish-{time.time_ns()}-{uuid.uuid4().hex}"


class CloudFrontInvalidator:
    """``publisher.release.Invalidate`` for one distribution and store prefix."""

    def __init__(
        self,
        distribution_id: str,
        prefix: str,
        *,
        client: Any = None,
        note: Callable[[str], None] | None = None,
    ) -> None:
        self.distribution_id = distribution_id
        self.path = manifest_path(prefix)
        self._client = client
        self._note = note
        self.invalidation_ids: list[str] = []

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client("cloudfront")
        return self._client

    def __call__(self, keys: Sequence[str]) -> None:
        unexpected = [key for key in keys if key != MANIFEST_KEY]
        if unexpected:  # the contract: nothing but the manifest is ever invalidated
            raise ValueError(f"only {MANIFEST_KEY} is invalidated, not {unexpected}")
        if MANIFEST_KEY in keys:
            self.invalidate()

    def invalidate(self) -> str:
        """Invalidate ``/<prefix>/manifest.json``; return the invalidation id."""
        try:
            response = self.client.create_invalidation(
                DistributionId=self.distribution_id,
                InvalidationBatch={
                    "Paths": {"Quantity": 1, "Items": [self.path]},
                    "CallerReference": caller_reference(),
                },
            )
        except (ClientError, BotoCoreError) as exc:
            raise InvalidationError(
                f"CloudFront CreateInvalidation {self.path} on distribution {self.distribution_id}: "
                f"{describe_aws_error(exc)} (the new manifest.json is live in the store; the CDN "
                "serves the old one until its cache entry expires)"
            ) from None
        invalidation_id = response["Invalidation"]["Id"]
        self.invalidation_ids.append(invalidation_id)
        if self._note:
            self._note(
                f"invalidated {self.path} on CloudFront distribution {self.distribution_id} "
                f"(invalidation {invalidation_id})"
            )
        return invalidation_id
