"""From a store URL to a store: ``s3://bucket/prefix``, ``file:///absolute/path`` or a plain path.

The one place that names every ``Store`` implementation, so ``publisher.stores`` (the interface and
the directory store) and ``publisher.s3store`` never import each other. boto3 is imported only when
an ``s3://`` store is opened.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from publisher.errors import Refused
from publisher.stores import DirStore, HttpReader, Reader, Store


def open_store(url: str, *, endpoint_url: str | None = None) -> Store:
    """``s3://bucket/prefix`` (``publisher.s3store``), ``file:///absolute/path`` or a plain path."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        from publisher.s3store import S3Store  # boto3 only for commands that use S3

        return S3Store.from_url(url, endpoint_url=endpoint_url)
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise Refused(f"store {url!r}: a file URL must be file:///absolute/path")
        return DirStore(Path(unquote(parts.path)))
    if scheme in ("http", "https"):
        raise Refused(
            f"store {url!r} is read-only over HTTP: publish to its directory or bucket, read with --url"
        )
    if scheme and len(scheme) > 1:  # (a one-letter "scheme" is a Windows drive)
        raise Refused(f"store {url!r}: unsupported scheme {parts.scheme!r}; use file:///PATH or a directory")
    if not url:
        raise Refused("store is empty: pass --store or set AVIKA_STORE")
    return DirStore(Path(url).expanduser().absolute())


def open_reader(store_url: str | None, url: str | None, *, endpoint_url: str | None = None) -> Reader:
    """``--url`` (HTTP, what agents see) wins over ``--store``."""
    if url:
        if urlsplit(url).scheme.lower() not in ("http", "https"):
            raise Refused(f"--url {url!r} must be an http(s) URL; use --store for a directory")
        return HttpReader(url)
    return open_store(store_url or "", endpoint_url=endpoint_url)
