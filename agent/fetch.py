"""HTTP for the agent: the manifest's conditional GET and the capped, resumable binary download.

The base class :class:`Fetcher` does the work every transport shares (python-tuf's fetcher
shape): it follows redirects under one policy, caps what it reads, hashes while streaming, resumes
with ``Range`` and keeps the time limits. A transport implements only :meth:`Fetcher._fetch`, one
GET that does not follow redirects and returns a streaming :class:`Response`, within the
:class:`agent.transport.Budget` it is given; :class:`HttpFetcher` is the real one
(:mod:`agent.transport`: the standard library's ``http.client`` and ``ssl``), tests may substitute
a simulator.

Rules (DESIGN sections 2, 4 and 7):

- at most :data:`MAX_REDIRECTS` redirects, never from https to http, only to http(s);
- the manifest envelope is capped at ``manifest.MAX_ENVELOPE_BYTES``: a bigger one is refused as
  ``too_large`` after reading at most one chunk past the cap (never the whole body);
- any status but 200 (and 304 for a conditional GET) is ``fetch_failed``, naming the status;
- a download writes at most ``size`` bytes (more is ``size_exceeded``), hashes while streaming
  (a wrong digest is ``checksum_mismatch``), never holds the binary in memory, and after a dropped
  connection resumes with ``Range`` (checking ``206`` and the ``Content-Range`` start; a server
  that ignores ``Range`` restarts the file from byte 0). Too few bytes in the end is ``truncated``;
- time (DESIGN section 3): one manifest fetch, connect to last byte and redirects included, ends
  at ``fetch_timeout`` (``UPDATE_FETCH_TIMEOUT``) however slowly bytes arrive (``fetch_failed``
  naming it); one download, every resume and every wait between attempts included, ends at
  ``download_timeout`` (``UPDATE_DOWNLOAD_TIMEOUT``: ``download_timeout``); a download connection
  on which nothing arrives for ``stall_timeout`` (:data:`STALL_TIMEOUT`) is ``stalled``, and
  resumed like a dropped one. The transport enforces them on every socket operation (a shrinking
  socket timeout), not between chunks.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import http.client
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urljoin, urlsplit, urlunsplit

from agent import buildinfo, manifest, transport
from agent.transport import Budget, DeadlineExceeded, IdleTimeout, Timeout

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CONNECT_TIMEOUT = transport.CONNECT_TIMEOUT
# While fetching the manifest: the longest wait for any one read. The whole fetch has FETCH_TIMEOUT.
READ_TIMEOUT = transport.READ_TIMEOUT
# DESIGN section 3's defaults (the config's UPDATE_FETCH_TIMEOUT, UPDATE_DOWNLOAD_TIMEOUT).
FETCH_TIMEOUT = 120.0
DOWNLOAD_TIMEOUT = 1800.0
# A download connection on which nothing arrives for this long is stalled (DESIGN section 3): it
# is dropped and resumed with Range, within the download's deadline.
STALL_TIMEOUT = 60.0
DEFAULT_CHUNK = 256 * 1024
MIN_CHUNK, MAX_CHUNK = 64 * 1024, 1024 * 1024
# Written bytes are sent to disk and dropped from the page cache every this many (see _WriteBack).
WRITEBACK_STEP = 16 * 1024 * 1024
# Consecutive download attempts that add no byte before giving up; attempts that make progress
# reset the count, bounded overall by MAX_ATTEMPTS so a server cannot keep us busy forever.
DOWNLOAD_RETRIES = 3
MAX_ATTEMPTS = 30
_CONTENT_RANGE_RE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")


# ---------------------------------------------------------------- errors


class DownloadError(Exception):
    """A transfer failed. ``code`` is the reported error code (DESIGN sections 4 and 7)."""

    code = "download_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class FetchFailed(DownloadError):
    """Network trouble: connection error, timeout, a status other than 200/304, a bad redirect."""

    code = "fetch_failed"

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class SizeExceeded(DownloadError):
    """The server sent (or announced) more bytes than the manifest's ``size``."""

    code = "size_exceeded"


class SizeMismatch(DownloadError):
    """The server announced a length other than the manifest's ``size``."""

    code = "size_mismatch"


class Truncated(DownloadError):
    """The transfer kept ending short of ``size``, resumes included."""

    code = "truncated"


class ChecksumMismatch(DownloadError):
    """All ``size`` bytes arrived but they do not hash to the manifest's ``sha256``."""

    code = "checksum_mismatch"


class Stalled(FetchFailed):
    """Nothing arrived on a download connection for the stall limit (resumed until retries run out)."""

    code = "stalled"

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


class DownloadStopped(DownloadError):
    """The caller's ``stop`` event was set: the download was given up on purpose, mid-stream."""

    code = "download_stopped"


class DownloadTimeout(DownloadError):
    """The download (resumes and waits included) did not finish within ``UPDATE_DOWNLOAD_TIMEOUT``."""

    code = "download_timeout"


# ---------------------------------------------------------------- responses and policy


def _noop() -> None:
    return None


@dataclass
class Response:
    """One streaming HTTP response as a transport returns it: header names are lower-cased."""

    status: int
    headers: Mapping[str, str]
    chunks: Iterable[bytes]
    close: Callable[[], None] = _noop

    def __post_init__(self) -> None:
        self.headers = {name.lower(): value for name, value in self.headers.items()}

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def content_length(self) -> int | None:
        value = self.header("content-length")
        return int(value) if value is not None and value.strip().isdigit() else None

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def redact(url: str) -> str:
    """A URL fit for logs and error messages: no user info, no query (it may hold a signature)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_redirect(from_url: str, location: str) -> str:
    """The absolute URL a redirect leads to, if the policy allows it; ``FetchFailed`` otherwise.

    Only http(s), and never from https down to http (DESIGN section 7): a downgrade would let
    anyone on the path serve the rest of the transfer.
    """
    target = urljoin(from_url, location.strip())
    scheme = urlsplit(target).scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchFailed(f"refusing redirect from {redact(from_url)} to a {scheme or 'schemeless'} URL")
    if urlsplit(from_url).scheme.lower() == "https" and scheme == "http":
        raise FetchFailed(f"refusing redirect from https to http: {redact(from_url)} -> {redact(target)}")
    return target


def _status_error(url: str, status: int) -> FetchFailed:
    return FetchFailed(
        f"GET {redact(url)}: HTTP {status}", status=status, retryable=status >= 500 or status == 429
    )


@dataclass(frozen=True)
class DownloadResult:
    """A download that arrived whole and hashed to the manifest's digest."""

    size: int
    sha256: str
    attempts: int  # requests made, resumes included


class PipelinedHasher:
    """SHA-256 on a worker thread, so hashing overlaps receiving and writing.

    hashlib releases the GIL while it hashes, so the two really run at once on two cores.
    The queue is bounded (a few chunks), so memory stays flat whatever the file size, and
    :meth:`hexdigest` waits for every queued chunk: the digest always covers exactly the bytes
    handed to :meth:`update`. :meth:`close` stops the thread on any path.
    """

    DEPTH = 4

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] = queue.Queue(self.DEPTH)
        self._thread = threading.Thread(target=self._work, name="sha256", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._hash.update(chunk)

    def update(self, chunk: bytes) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("update() after close()")
        self._queue.put(chunk)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        return self._hash.hexdigest()


@dataclass
class _Progress:
    """Where a download stands: bytes in the file so far and their running hash."""

    offset: int
    hasher: PipelinedHasher
    received: int = 0  # bytes received over all attempts (progress, even after a restart)
    stop: threading.Event | None = None  # set by the caller: give up at the next piece

    def restart(self) -> None:
        self.offset = 0
        self.hasher.close()
        self.hasher = PipelinedHasher()


class _WriteBack:
    """Sends the download to disk while it arrives and drops what is on disk from the page cache.

    Every :data:`WRITEBACK_STEP` bytes, ``POSIX_FADV_DONTNEED`` over the last two steps starts the
    writeback of the newest one and drops the older one, written back by then. So the fsync
    after the download has little left to write (it overlaps the transfer instead of following
    it), and the dirty page cache stays a few steps deep: under the agent's ``MemoryMax=64M``,
    which counts page cache, a 512 MiB download does not fill the cgroup with dirty pages.
    """

    def __init__(self, fd: int, start: int) -> None:
        self._fd = fd
        self._marks = [start]

    def advance(self, offset: int) -> None:
        if offset - self._marks[-1] < WRITEBACK_STEP:
            return
        self._marks.append(offset)
        start = self._marks[0]
        with contextlib.suppress(AttributeError, OSError):  # else the fsync after it does it all
            os.posix_fadvise(self._fd, start, offset - start, os.POSIX_FADV_DONTNEED)
        del self._marks[:-2]


# ---------------------------------------------------------------- the fetcher


class Fetcher(abc.ABC):
    """Shared work: redirects, caps, hashing, resume, time limits. A transport implements :meth:`_fetch`."""

    def __init__(
        self,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        max_redirects: int = MAX_REDIRECTS,
        retries: int = DOWNLOAD_RETRIES,
        retry_delay: float = 1.0,
        fetch_timeout: float | None = FETCH_TIMEOUT,
        download_timeout: float | None = DOWNLOAD_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        stall_timeout: float = STALL_TIMEOUT,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.chunk_size = min(max(chunk_size, MIN_CHUNK), MAX_CHUNK)
        self.max_redirects = max_redirects
        self.retries = retries
        self.retry_delay = retry_delay
        self.fetch_timeout = fetch_timeout
        self.download_timeout = download_timeout
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.stall_timeout = stall_timeout
        self._sleep = sleep
        self._clock = clock

    @abc.abstractmethod
    def _fetch(self, url: str, headers: Mapping[str, str], budget: Budget) -> Response:
        """One GET of ``url`` with ``headers``, not following redirects, within ``budget``.

        Returns the response with its body unread (``chunks`` yields it in pieces of at most
        ``chunk_size``). A :class:`agent.transport.Timeout` (here or while iterating ``chunks``) is
        raised as it is; other connection errors as ``FetchFailed(..., retryable=True)``.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, most transports hold nothing
        """Release connections (optional)."""

    # -- redirects

    def _open(self, url: str, headers: Mapping[str, str], budget: Budget) -> Response:
        """GET ``url``, following at most ``max_redirects`` redirects under :func:`check_redirect`."""
        first = url
        for hop in range(self.max_redirects + 1):
            response = self._fetch(url, headers, budget)
            if response.status not in REDIRECT_STATUSES:
                return response
            location = response.header("location")
            response.close()
            if not location:
                raise FetchFailed(f"GET {redact(url)}: HTTP {response.status} without a Location")
            if hop == self.max_redirects:
                raise FetchFailed(f"GET {redact(first)}: more than {self.max_redirects} redirects")
            url = check_redirect(url, location)
            log.debug("redirected to %s", redact(url))
        raise AssertionError("unreachable")  # the loop returns or raises

    # -- the manifest

    def get_manifest(self, url: str, etag: str | None = None) -> tuple[int, bytes, str | None]:
        """Conditional GET of the manifest envelope: ``(200, body, etag)`` or ``(304, b"", etag)``.

        ``etag`` is the one saved with the cached envelope (None = no cache, no ``If-None-Match``).
        A body over ``MAX_ENVELOPE_BYTES`` is ``manifest.TooLarge``; a 304 to an unconditional
        request is ``FetchFailed`` (there is nothing cached to fall back on), as is a fetch that
        is not complete within ``fetch_timeout``.
        """
        headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        if etag:
            headers["If-None-Match"] = etag
        budget = Budget.lasting(
            self.fetch_timeout, idle=self.read_timeout, connect=self.connect_timeout, clock=self._clock
        )
        try:
            with self._open(url, headers, budget) as response:
                if response.status == 304:
                    if not etag:
                        raise FetchFailed(f"GET {redact(url)}: HTTP 304 but no cached manifest was offered")
                    return 304, b"", response.header("etag") or etag
                if response.status != 200:
                    raise _status_error(url, response.status)
                body = self._read_capped(url, response, manifest.MAX_ENVELOPE_BYTES)
                return 200, body, response.header("etag")
        except DeadlineExceeded:
            raise FetchFailed(
                f"GET {redact(url)}: not complete within UPDATE_FETCH_TIMEOUT ({self.fetch_timeout:g}s)",
                retryable=True,
            ) from None
        except IdleTimeout as exc:
            raise FetchFailed(f"GET {redact(url)}: {exc}", retryable=True) from None

    def _read_capped(self, url: str, response: Response, cap: int) -> bytes:
        declared = response.content_length()
        if declared is not None and declared > cap:
            raise manifest.TooLarge(f"{redact(url)} announces {declared} bytes, the limit is {cap}")
        body = bytearray()
        for chunk in response.chunks:
            body += chunk
            if len(body) > cap:  # stop reading: one chunk past the cap is all we ever hold
                raise manifest.TooLarge(f"{redact(url)} sent more than {cap} bytes")
        return bytes(body)

    # -- binaries

    def download(
        self,
        url: str,
        dest: int | IO[bytes],
        size: int,
        sha256: str,
        resume_from: int = 0,
        *,
        stop: threading.Event | None = None,
    ) -> DownloadResult:
        """Stream ``url`` into ``dest`` (a file descriptor or a binary file of a regular file).

        Writes bytes ``[resume_from, size)`` at their offsets (``os.pwrite``), so the file's
        position does not matter; with ``resume_from`` > 0 the bytes already there are read back
        and hashed, so ``dest`` must then be readable too. The file is cut to ``size`` at the end.
        It is not fsynced: that is the caller's step, as is removing the file after an error.
        ``stop``, once set (from another thread), ends the transfer at its next piece with
        :class:`DownloadStopped`.
        """
        if size < 1 or not 0 <= resume_from <= size:
            raise ValueError(f"bad download bounds: size={size}, resume_from={resume_from}")
        if isinstance(dest, int):
            fd = dest
        else:
            dest.flush()
            fd = dest.fileno()
        budget = Budget.lasting(
            self.download_timeout, idle=self.stall_timeout, connect=self.connect_timeout, clock=self._clock
        )
        progress = _Progress(resume_from, PipelinedHasher(), stop=stop)
        try:
            return self._download(url, fd, size, sha256, progress, budget)
        except DeadlineExceeded:
            raise DownloadTimeout(
                f"{redact(url)}: not complete within UPDATE_DOWNLOAD_TIMEOUT ({self.download_timeout:g}s); "
                f"got {progress.offset} of {size} bytes"
            ) from None
        finally:
            progress.hasher.close()

    def _download(
        self, url: str, fd: int, size: int, sha256: str, progress: _Progress, budget: Budget
    ) -> DownloadResult:
        self._hash_existing(fd, progress)
        attempts = stalls = 0
        while progress.offset < size:
            if attempts:
                delay = self.retry_delay * 2 ** min(stalls, 4)
                if delay >= budget.left():
                    raise budget.exceeded()  # no wait may outlast the deadline
                self._sleep(delay)
            attempts += 1
            before = progress.received
            error: DownloadError
            try:
                self._transfer(url, fd, size, progress, budget)
            except IdleTimeout as exc:
                where = f"{redact(url)}: {exc} (after {progress.offset} of {size} bytes)"
                error = FetchFailed(where, retryable=True) if exc.phase == "connect" else Stalled(where)
            except FetchFailed as exc:
                if not exc.retryable:
                    raise
                error = exc
            else:
                if progress.offset >= size:
                    break
                error = Truncated(f"{redact(url)}: got {progress.offset} of {size} bytes")
            stalls = 0 if progress.received > before else stalls + 1
            if stalls > self.retries or attempts >= MAX_ATTEMPTS:
                if type(error) is FetchFailed and progress.offset:
                    raise Truncated(f"{error.message} (after {progress.offset} of {size} bytes)") from error
                raise error
            log.warning("download interrupted (%s); resuming at byte %d", error.message, progress.offset)
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
        digest = progress.hasher.hexdigest()
        if digest != sha256:
            raise ChecksumMismatch(f"{redact(url)}: sha256 {digest}, the manifest says {sha256}")
        return DownloadResult(size=size, sha256=digest, attempts=attempts)

    def _hash_existing(self, fd: int, progress: _Progress) -> None:
        """Hash the ``progress.offset`` bytes a previous attempt left in the file."""
        done = 0
        while done < progress.offset:
            data = os.pread(fd, min(self.chunk_size, progress.offset - done), done)
            if not data:
                raise ValueError(f"resume_from={progress.offset} but the file holds only {done} bytes")
            progress.hasher.update(data)
            done += len(data)

    def _transfer(self, url: str, fd: int, size: int, progress: _Progress, budget: Budget) -> None:
        """One request: from ``progress.offset`` (with ``Range``) to the end of the body."""
        headers = {"Accept-Encoding": "identity"}
        if progress.offset:
            headers["Range"] = f"bytes={progress.offset}-"
        with self._open(url, headers, budget) as response:
            if response.status == 206 and progress.offset:
                self._check_content_range(url, response, size, progress.offset)
            elif response.status == 200:
                if progress.offset:
                    log.warning("%s ignored Range; downloading from byte 0 again", redact(url))
                    progress.restart()
                # A length announced for encoded bytes says nothing about the file's size.
                encoded = response.header("content-encoding") not in (None, "identity")
                declared = None if encoded else response.content_length()
                if declared is not None and declared > size:
                    raise SizeExceeded(f"{redact(url)} announces {declared} bytes, the manifest says {size}")
                if declared is not None and declared < size:
                    raise SizeMismatch(f"{redact(url)} announces {declared} bytes, the manifest says {size}")
            elif response.status == 416 and progress.offset:
                raise SizeMismatch(f"{redact(url)} has no byte {progress.offset}, the manifest says {size}")
            else:
                raise _status_error(url, response.status)
            writeback = _WriteBack(fd, progress.offset)
            for chunk in response.chunks:
                if progress.stop is not None and progress.stop.is_set():
                    raise DownloadStopped(f"{redact(url)}: stopped after {progress.offset} of {size} bytes")
                if progress.offset + len(chunk) > size:
                    raise SizeExceeded(f"{redact(url)} sent more than the manifest's {size} bytes")
                _pwrite_all(fd, chunk, progress.offset)
                progress.hasher.update(chunk)
                progress.offset += len(chunk)
                progress.received += len(chunk)
                writeback.advance(progress.offset)

    @staticmethod
    def _check_content_range(url: str, response: Response, size: int, offset: int) -> None:
        match = _CONTENT_RANGE_RE.match((response.header("content-range") or "").strip())
        if not match:
            raise FetchFailed(f"{redact(url)}: 206 without a valid Content-Range", retryable=False)
        start, end, total = int(match[1]), int(match[2]), match[3]
        if start != offset:
            raise FetchFailed(f"{redact(url)}: asked for byte {offset}, the server sent from byte {start}")
        if (total != "*" and int(total) > size) or end >= size:
            raise SizeExceeded(f"{redact(url)}: Content-Range {match[0]}, the manifest says {size} bytes")
        if total != "*" and int(total) < size:
            raise SizeMismatch(f"{redact(url)}: Content-Range {match[0]}, the manifest says {size} bytes")


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


# ---------------------------------------------------------------- the real transport


class HttpFetcher(Fetcher):
    """The standard-library transport (:mod:`agent.transport`): keep-alive, TLS, proxies, budgets."""

    def __init__(self, *, client: transport.Client | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._client = client or transport.Client(user_agent=f"avika-agent/{buildinfo.VERSION}")

    def _fetch(self, url: str, headers: Mapping[str, str], budget: Budget) -> Response:
        try:
            response = self._client.request("GET", url, headers=headers, budget=budget)
        except Timeout:
            raise
        except ValueError as exc:  # a URL or proxy setting it cannot use: retrying cannot help
            raise FetchFailed(f"GET {redact(url)}: {exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise FetchFailed(f"GET {redact(url)}: {transport.describe(exc)}", retryable=True) from None
        return Response(
            status=response.status,
            headers=response.headers,
            chunks=_chunks(response, url, self.chunk_size),
            close=response.close,
        )

    def close(self) -> None:
        self._client.close()


def _chunks(response: transport.Response, url: str, chunk_size: int) -> Iterator[bytes]:
    """The body in pieces of ``chunk_size`` (fewer writes and hand-offs to the hashing thread).

    Each receive is bounded by the budget, whatever the piece size. When the connection breaks,
    the bytes received since the last piece are handed over first, then the error is raised, so
    a resume starts exactly where the bytes stopped.
    """
    parts: list[bytes] = []
    held = 0
    while True:
        try:
            data = response.read1(chunk_size - held)
        except Timeout:
            if parts:
                yield b"".join(parts)
            raise
        except (OSError, http.client.HTTPException) as exc:
            if parts:
                yield b"".join(parts)
            raise FetchFailed(
                f"GET {redact(url)}: connection lost: {transport.describe(exc)}", retryable=True
            ) from None
        if data:
            parts.append(data)
            held += len(data)
        if parts and (not data or held >= chunk_size):
            yield parts[0] if len(parts) == 1 else b"".join(parts)
            parts, held = [], 0
        if not data:
            return
