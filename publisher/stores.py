"""Where releases live (DESIGN section 2, store layout): one interface; a directory here, S3 in ``s3store``.

Keys are '/'-joined strings under the store's prefix (``manifest.json``,
``manifests/42.json``, ``binaries/0.1.44/<sha256>/avika-agent-linux-amd64``), so the same
code drives a directory and an S3 bucket. What every implementation guarantees:

- ``put_immutable`` is create-only: a key appears only with its complete content, and of two
  concurrent writers exactly one wins (the other gets ``AlreadyExists``; on S3 this is
  ``IfNoneMatch="*"``). Given a ``sha256`` it refuses content that does not hash to it (on S3,
  ``ChecksumSHA256``), so a binary that changes between hashing and upload is never stored.
- ``put_mutable`` replaces atomically: a reader sees the old or the new object, whole. With
  ``if_match`` it is a compare-and-swap against the token ``read_versioned`` returned (S3:
  ``IfMatch`` on the ETag), so ``manifest.json`` never moves back to a lower serial when two
  publishes race.
- ``read`` is for small objects (manifests); binaries are streamed with ``stream``.

``Reader`` is the read half (``show`` and ``verify``); ``HttpReader`` implements it over HTTP(S) so
``verify --url`` audits exactly what the CDN serves. ``publisher.store_url`` turns a store URL into
one of these.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import posixpath
import re
import stat
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

from agent.state import fsync_dir, write_bytes_atomic
from publisher.errors import PublishError

CHUNK = 1 << 20
MANIFEST_KEY = "manifest.json"
HELM_VALUES_KEY = "helm-values.yaml"
ARCHIVE_PREFIX = "manifests/"
BINARIES_PREFIX = "binaries/"
SHORT_LIVED = "public, max-age=60"
IMMUTABLE = "public, max-age=31536000, immutable"
# ``read`` is for manifests; anything bigger than this is not one (the envelope limit is 1 MiB), and
# a junk object in the store must never be read into memory whole.
MAX_READ_BYTES = 16 << 20
_ARCHIVE_RE = re.compile(r"^manifests/(0|[1-9][0-9]{0,18})\.json$")
_BINARY_RE = re.compile(r"^binaries/([^/]+)/([0-9a-f]{64})/avika-agent-([^/]+)$")
LOCK_NAME = ".avika-publish.lock"


class StoreError(PublishError):
    """The store failed or holds something unexpected: exit 1."""


class NotFound(StoreError):
    code = "not_found"


class AlreadyExists(StoreError):
    """A create-only write lost: the key exists."""

    code = "already_exists"


class Conflict(StoreError):
    """A compare-and-swap lost: the object changed since it was read."""

    code = "conflict"


class Oversized(StoreError):
    """An object ``read`` was asked for is larger than the caller's limit (so it is no manifest)."""

    code = "oversized"


# ---------------------------------------------------------------- layout


def check_key(key: str) -> str:
    """A store key: '/'-separated names, none empty, hidden, '.' or '..'; valid in every store or none."""
    parts = key.split("/")
    if (
        not key
        or "\x00" in key
        or "\\" in key
        or any(part in ("", ".", "..") or part.startswith(".") for part in parts)
    ):
        raise StoreError(f"invalid store key {key!r}")
    return key


def object_headers(key: str) -> tuple[str, str]:
    """(Content-Type, Cache-Control) of a key, per the layout table in DESIGN section 2."""
    if key == MANIFEST_KEY:
        return "application/json", SHORT_LIVED
    if key == HELM_VALUES_KEY:
        return "application/yaml", SHORT_LIVED
    if key.startswith(ARCHIVE_PREFIX) and key.endswith(".json"):
        return "application/json", IMMUTABLE
    if key.startswith(BINARIES_PREFIX):
        return "application/octet-stream", IMMUTABLE
    return "application/octet-stream", "no-cache"


def binary_key(version: str, sha256: str, platform: str) -> str:
    return f"{BINARIES_PREFIX}{version}/{sha256}/avika-agent-{platform}"


def parse_binary_key(key: str) -> tuple[str, str, str] | None:
    """(version, sha256, platform) of a binary key, or None."""
    m = _BINARY_RE.match(key)
    return (m.group(1), m.group(2), m.group(3)) if m else None


def archive_key(serial: int) -> str:
    return f"{ARCHIVE_PREFIX}{serial}.json"


def archive_serial(key: str) -> int | None:
    m = _ARCHIVE_RE.match(key)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Versioned:
    """An object and the token a compare-and-swap names it by (None: absent)."""

    data: bytes | None
    token: str | None


class _Unconditional:
    def __repr__(self) -> str:
        return "ANY"


ANY = _Unconditional()
"""``put_mutable(..., if_match=ANY)``: replace whatever is there."""

Progress = Callable[[int], None]


# ---------------------------------------------------------------- interface


class Reader(ABC):
    """The read side: what ``show`` and ``verify`` need."""

    location: str

    @abstractmethod
    def read(self, key: str, *, limit: int = MAX_READ_BYTES) -> bytes | None:
        """A small object's bytes, or None when it does not exist; ``Oversized`` past ``limit``."""

    @abstractmethod
    def stream(self, url: str) -> Iterator[bytes]:
        """Chunks of the object a manifest URL names (relative to ``manifest.json`` or absolute
        http(s)); ``NotFound`` when it does not exist."""


class Store(Reader):
    """A place to publish to: a directory or (later) an S3 prefix."""

    @abstractmethod
    def read_versioned(self, key: str, *, limit: int = MAX_READ_BYTES) -> Versioned:
        """The object and its compare-and-swap token; ``Oversized`` past ``limit``."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The object's size, or None when it does not exist."""

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key that starts with ``prefix``, sorted."""

    @abstractmethod
    def put_immutable(
        self,
        key: str,
        source: bytes | Path,
        *,
        content_type: str | None = None,
        cache_control: str | None = None,
        sha256: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Create ``key`` (never replace it): ``AlreadyExists`` if it is there."""

    @abstractmethod
    def put_mutable(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        cache_control: str | None = None,
        if_match: str | _Unconditional | None = ANY,
    ) -> None:
        """Replace ``key`` atomically; with ``if_match`` only if its token is still that
        (None: only if it does not exist), else ``Conflict``."""


# ---------------------------------------------------------------- directory


def _content_token(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


class DirStore(Store):
    """A directory, served as-is by nginx or ``avika-publish serve``.

    Create-only writes go to a temporary file that is hard-linked to its name (``link`` fails if
    the name exists, like ``O_EXCL``, but the name never shows a partial file). Mutable writes hold
    a ``flock`` on ``.avika-publish.lock`` while they compare and replace.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.location = f"file://{self.root}"

    def path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def read(self, key: str, *, limit: int = MAX_READ_BYTES) -> bytes | None:
        try:
            fh = open(self.path(key), "rb")  # noqa: SIM115 - closed below
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        with fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return None
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise Oversized(f"{key} in {self.location} is over {limit} bytes; not a manifest")
        return data

    def read_versioned(self, key: str, *, limit: int = MAX_READ_BYTES) -> Versioned:
        data = self.read(key, limit=limit)
        return Versioned(data, _content_token(data))

    def size(self, key: str) -> int | None:
        try:
            st = self.path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def stream(self, url: str) -> Iterator[bytes]:
        parts = urlsplit(url)
        if parts.scheme:
            return _http_chunks(url)
        key = posixpath.normpath(unquote(parts.path))
        return self._chunks(self.path(key))

    @staticmethod
    def _chunks(path: Path) -> Iterator[bytes]:
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by the generator
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"{path} does not exist") from None

        def chunks() -> Iterator[bytes]:
            with fh:
                while chunk := fh.read(CHUNK):
                    yield chunk

        return chunks()

    def list(self, prefix: str) -> list[str]:
        base = prefix.rpartition("/")[0]
        top = self.path(base) if base else self.root
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if not name.startswith(".") and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def put_immutable(
        self,
        key: str,
        source: bytes | Path,
        *,
        content_type: str | None = None,
        cache_control: str | None = None,
        sha256: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        # Content-Type and Cache-Control come from the layout when the directory is served.
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                os.fchmod(out.fileno(), 0o644)
                for chunk in _source_chunks(source):
                    digest.update(chunk)
                    out.write(chunk)
                    if progress:
                        progress(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            if sha256 is not None and digest.hexdigest() != sha256:
                raise StoreError(
                    f"{source} changed while it was uploaded (sha256 {digest.hexdigest()}, expected {sha256})"
                )
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise AlreadyExists(f"{key} already exists in {self.location}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        fsync_dir(path.parent)

    def put_mutable(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        cache_control: str | None = None,
        if_match: str | _Unconditional | None = ANY,
    ) -> None:
        path = self.path(key)
        self.root.mkdir(parents=True, exist_ok=True)
        # The lock also keeps two writers in one process off write_bytes_atomic's per-pid temp name.
        with _flock(self.root / LOCK_NAME):
            if not isinstance(if_match, _Unconditional):
                current = _content_token(self.read(key))
                if current != if_match:
                    raise Conflict(f"{key} in {self.location} changed since it was read")
            write_bytes_atomic(path, data)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _source_chunks(source: bytes | Path) -> Iterator[bytes]:
    if isinstance(source, bytes | bytearray):
        yield bytes(source)
        return
    with open(source, "rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


# ---------------------------------------------------------------- HTTP (read-only)


def _session():  # requests is imported only by the commands that read over HTTP
    import requests

    session = requests.Session()
    session.max_redirects = 3
    return session


def _http_chunks(url: str, session=None) -> Iterator[bytes]:
    import requests

    session = session or _session()
    try:
        response = session.get(url, stream=True, timeout=(10, 60))
    except requests.RequestException as exc:
        raise StoreError(f"GET {url}: {exc}") from None
    if response.status_code == 404:
        response.close()
        raise NotFound(f"GET {url}: 404 Not Found")
    if response.status_code != 200:
        response.close()
        raise StoreError(f"GET {url}: HTTP {response.status_code}")

    def chunks() -> Iterator[bytes]:
        with response:
            try:
                yield from response.iter_content(CHUNK)
            except requests.RequestException as exc:
                raise StoreError(f"GET {url}: {exc}") from None

    return chunks()


class HttpReader(Reader):
    """Reads what agents read: ``<base>/manifest.json`` and the URLs it names, over HTTP(S)."""

    def __init__(self, base_url: str) -> None:
        base = base_url.rstrip("/")
        if base.endswith("/" + MANIFEST_KEY):
            base = base[: -len(MANIFEST_KEY) - 1]
        self.location = base
        self._session = _session()

    def url(self, key: str) -> str:
        return urljoin(self.location + "/", key)

    def read(self, key: str, *, limit: int = MAX_READ_BYTES) -> bytes | None:
        try:
            chunks = _http_chunks(self.url(key), self._session)
        except NotFound:
            return None
        data = bytearray()
        for chunk in chunks:
            data += chunk
            if len(data) > limit:
                chunks.close()
                raise Oversized(f"{self.url(key)} is over {limit} bytes; not a manifest")
        return bytes(data)

    def stream(self, url: str) -> Iterator[bytes]:
        return _http_chunks(self.url(url), self._session)
