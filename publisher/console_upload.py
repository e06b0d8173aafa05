"""``avika-publish console-upload``: the console's page into the bucket, for CloudFront (DESIGN section 9).

In AWS the page is served by CloudFront from ``console/`` at the bucket root (beside the store's
prefix, so its URL is ``https://<cdn>/console/``), and CloudFront sends ``/v1/*`` to the HTTP API:
page and API share one origin, which is what the page's CSP (``default-src 'self'``) allows.

Each file is put with its content type and ``Cache-Control: no-cache`` (browsers and CloudFront
revalidate, so a new page shows at once; nothing here is secret). The assets go first and
``index.html`` last, so a new index never names an asset that is not there yet. Files of an older
page that this one no longer has are left in place (the upload needs no delete right).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

from publisher.console_app import FILE_CACHE_CONTROL, content_type, page_files
from publisher.errors import PublishError, Refused

PAGE_KEY_PREFIX = "console/"
INDEX = "index.html"


@dataclass(frozen=True)
class Uploaded:
    key: str
    size: int
    content_type: str
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "size": self.size, "content_type": self.content_type, "sha256": self.sha256}


def upload_order(files: dict[str, bytes]) -> list[str]:
    """Assets first, ``index.html`` last."""
    return sorted(files, key=lambda name: (name == INDEX, name))


def upload_console(
    client: Any, bucket: str, *, files: dict[str, bytes] | None = None, dry_run: bool = False
) -> list[Uploaded]:
    """Put every page file under ``console/`` in ``bucket`` (see the module docstring)."""
    files = page_files() if files is None else files
    if INDEX not in files:
        raise Refused(f"the console's files have no {INDEX}: broken installation")
    done = []
    for name in upload_order(files):
        data = files[name]
        item = Uploaded(
            PAGE_KEY_PREFIX + name, len(data), content_type(name), hashlib.sha256(data).hexdigest()
        )
        if not dry_run:
            try:
                client.put_object(
                    Bucket=bucket,
                    Key=item.key,
                    Body=data,
                    ContentType=item.content_type,
                    CacheControl=FILE_CACHE_CONTROL,
                    ContentMD5=base64.b64encode(hashlib.md5(data).digest()).decode("ascii"),
                )
            except Exception as exc:  # botocore errors: name the object, exit 1
                from publisher.s3store import describe_aws_error

                raise PublishError(
                    f"S3 PutObject s3://{bucket}/{item.key}: {describe_aws_error(exc)}"
                ) from None
        done.append(item)
    return done
