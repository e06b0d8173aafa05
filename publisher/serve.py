"""``avika-publish serve``: a store directory served like the CDN agents expect (DESIGN sections 2, 5, 6).

- GET/HEAD of files under the root only: the path is decoded, dot segments and hidden names
  (``..``, ``.avika-publish.lock``, temporary files) are 404, and the resolved file must stay
  inside the root (a symlink out is 404); no directory listings.
- A strong ETag (quoted sha256 of the content, cached by file identity and mtime so a big binary
  is hashed once), ``If-None-Match`` (lists, weak tags, ``*``) gives 304.
- One byte range (``bytes=a-b``, ``a-``, ``-n``) gives 206 with ``Content-Range``, an
  unsatisfiable one 416; several ranges or a stale ``If-Range`` get the whole file.
- Content-Type and Cache-Control per the store layout (``publisher.stores.object_headers``).
- Bodies are streamed in 1 MiB chunks from the same open file the ETag was computed from, so an
  atomic replace of ``manifest.json`` mid-request never pairs one content with another's ETag.
- ``POST /v1/reports`` is ``infra.reports.core.ReportsEndpoint`` over ``--reports`` (404 without it).
- With ``--console``, ``/console/...`` and the operator API (``/v1/fleet`` ...) go to
  ``publisher.console_app.ConsoleMount`` (a small hook in ``_route``; a POST's body is read up to
  the console's cap through ``_body``).

Hostile requests (the request-parsing layer, before any route): ``Content-Length`` must be ASCII
digits, one value, else 400 and the connection closes, before a byte of body is read; a body is
read only up to its route's limit (``_body``: 411 without a length or with ``Transfer-Encoding``,
413 over the limit). Range numbers have at most 19 digits (more: the header is ignored). A
whitespace-only request line gets 400, one empty line before a request is skipped (RFC 9112
section 2.2), and a two-word (HTTP/0.9) request is answered as HTTP/1.0, with a status line. Every
request gets an HTTP answer (an explicit ``HTTP/0.9`` gets 505); ``tests/test_publisher_serve_fuzz.py``
holds it to that.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import stat
import sys
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from infra.reports.auth import ConfigError, parse_secrets
from infra.reports.core import MAX_BODY_BYTES, ReportsEndpoint, error
from infra.reports.store import ReportStore
from publisher.errors import Refused
from publisher.stores import CHUNK, object_headers

REPORTS_PATH = "/v1/reports"
_RANGE_RE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})", re.ASCII)  # ints of any size stay cheap
_LENGTH_RE = re.compile(r"[0-9]+", re.ASCII)  # int() also takes "-1", "+5", "1_0", Arabic-Indic digits
_LENGTH_DIGITS = 15  # more digits than any limit here: too large, without building a huge int
_ETAG_CACHE_ENTRIES = 4096
LINGER_SECONDS = 2.0  # how long a closing connection drains what the client still sends ...
LINGER_BYTES = 16 << 20  # ... and how much of it, at most (read in 1 MiB steps and discarded)
UNSATISFIABLE = "unsatisfiable"


def parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """(first, last) byte of a single range; ``UNSATISFIABLE``; None to ignore it (serve it all)."""
    m = _RANGE_RE.fullmatch(header.strip().replace(" ", ""))
    if not m or m.group(1) == m.group(2) == "":
        return None  # malformed or several ranges: RFC 9110 lets a server ignore Range
    first, last = m.group(1), m.group(2)
    if first == "":  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            return UNSATISFIABLE
        return max(0, size - n), size - 1
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: ignored, like a malformed header
    if start >= size:
        return UNSATISFIABLE
    return start, min(int(last), size - 1) if last else size - 1


def etag_matches(header: str, etag: str) -> bool:
    """``If-None-Match``: weak comparison over a list, or ``*``."""
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or etag in (t.removeprefix("W/") for t in tags)


class BadFraming(ValueError):
    """A request whose body length cannot be known: 400, and the connection closes."""


def content_length(values: list[str] | None) -> int | None:
    """The body length a request declares: None without ``Content-Length``; ``BadFraming`` unless
    every value is the same run of ASCII digits (RFC 9110 section 8.6)."""
    if not values:
        return None
    stripped = {v.strip(" \t") for v in values}
    if len(stripped) != 1:
        raise BadFraming("several different Content-Length values")
    value = stripped.pop()
    if not _LENGTH_RE.fullmatch(value):
        raise BadFraming(f"Content-Length {value[:40]!r} is not a number of bytes")
    if len(value) > _LENGTH_DIGITS:
        return 10**_LENGTH_DIGITS  # beyond every limit
    return int(value)


class UpdateServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, root: Path, address: tuple[str, int], reports: ReportsEndpoint | None, console: Any = None
    ) -> None:
        self.root = Path(root).resolve()
        self.reports = reports
        self.console = console  # publisher.console_app.ConsoleMount, or None
        self._etags: dict[tuple[int, int, int, int], str] = {}
        self._etags_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def shutdown_request(self, request: Any) -> None:
        """A lingering close: FIN after the answer, then discard what the client still sends (at most
        ``LINGER_BYTES`` for ``LINGER_SECONDS``) before closing. Closing a socket with unread input
        sends a reset that can destroy the answer in flight, so a client refused early (413, 400,
        411: its body was never read) would see a dropped connection instead of the status."""
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_WR)
            deadline, budget = time.monotonic() + LINGER_SECONDS, LINGER_BYTES
            while budget > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                request.settimeout(left)
                data = request.recv(min(CHUNK, budget))
                if not data:
                    break
                budget -= len(data)
        self.close_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # a client went away: not our error
            return
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def etag(self, fh: IO[bytes], st: os.stat_result) -> str:
        ident = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        with self._etags_lock:
            cached = self._etags.get(ident)
        if cached is not None:
            return cached
        digest = hashlib.sha256()
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
        fh.seek(0)
        tag = f'"{digest.hexdigest()}"'
        with self._etags_lock:
            if len(self._etags) >= _ETAG_CACHE_ENTRIES:
                self._etags.clear()
            self._etags[ident] = tag
        return tag


class _Handler(BaseHTTPRequestHandler):
    server: UpdateServer
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # errors before the version is known still get a status line
    server_version = "avika-publish"
    timeout = 60  # an idle keep-alive connection does not hold a thread for ever

    # ------------------------------------------------------------ request parsing

    def parse_request(self) -> bool:
        if self.raw_requestline in (b"\r\n", b"\n"):  # RFC 9112 section 2.2: skip one empty line
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:
                self.close_connection = True
                return False
            if len(self.raw_requestline) > 65536:
                self.requestline, self.command = "", ""
                self.send_error(414)
                return False
        ok = super().parse_request()
        if not ok and not self.requestline.split():  # the base class answers nothing to a blank line
            self.send_error(400, "Empty request line")
        if ok and self.request_version == "HTTP/0.9":  # "GET / HTTP/0.9": its answers have no status line
            self.request_version = "HTTP/1.0"
            self.close_connection = True
            self.send_error(505, "HTTP/0.9 is not supported")
            return False
        return ok

    def send_response_only(self, code: int, message: str | None = None) -> None:
        # The base class writes no status line for HTTP/0.9 (an error found after the version was
        # read, e.g. "X Y /a HTTP/0.9"): every answer here is HTTP/1.x.
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        super().send_response_only(code, message)

    def _framing(self, method: str) -> bool:
        """Can the request's body be delimited? Answers 400 and returns False when it cannot."""
        try:
            self._length = content_length(self.headers.get_all("Content-Length"))
        except BadFraming as exc:
            self.close_connection = True
            self._plain(400, f"bad request: {exc}")
            return False
        self._chunked = self.headers.get("Transfer-Encoding") is not None
        self._keep_alive = not self.close_connection  # as the request's version and Connection say
        if self._chunked or self._length:
            # A body that no route reads must never be parsed as the next request.
            self.close_connection = True
        return True

    def _body(self, limit: int) -> bytes | int:
        """The request body, read only if its length is declared and at most ``limit``; else the
        status to answer (411 none declared or chunked, 413 too large), the connection closing."""
        if self._chunked or self._length is None:
            self.close_connection = True
            return 411
        if self._length > limit:
            self.close_connection = True
            return 413
        body = self.rfile.read(self._length)
        self.close_connection = not self._keep_alive or len(body) < self._length  # read: reusable
        return body

    # ------------------------------------------------------------ routing

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def _route(self, method: str) -> None:
        if not self._framing(method):
            return
        try:
            path = urlsplit(self.path).path
        except ValueError:  # e.g. "//[::1/": an invalid IPv6 authority
            self._plain(400, "bad request target")
            return
        if self.server.console is not None and self.server.console.wants(path):
            self._console(method)
            return
        if method not in ("GET", "HEAD") and not (path == REPORTS_PATH and method == "POST"):
            self.close_connection = True  # a body we do not read must not be parsed as the next request
        if path == REPORTS_PATH and self.server.reports is not None:
            self._reports(method)
        elif method in ("GET", "HEAD"):
            self._file(path, head=method == "HEAD")
        elif method == "POST":
            self._plain(404, "not found")
        else:
            self._plain(405, "method not allowed", {"Allow": "GET, HEAD"})

    def _plain(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        body = (text + "\n").encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # ------------------------------------------------------------ reports

    def _reports(self, method: str) -> None:
        assert self.server.reports is not None
        body = b""
        if method == "POST":
            read = self._body(MAX_BODY_BYTES)
            if read == 411:
                self._plain(411, "Content-Length required")
                return
            if read == 413:  # answered without reading the body
                too_large = error(413, "too_large", f"body exceeds {MAX_BODY_BYTES} bytes; split the batch")
                self._send(too_large.status, too_large.all_headers(), too_large.encoded())
                return
            assert isinstance(read, bytes)
            body = read
        status, headers, data = self.server.reports.handle(method, dict(self.headers.items()), body)
        self._send(status, headers, data)

    def _console(self, method: str) -> None:
        """Hand a console request to the mount; only a POST's body is read (up to its cap)."""
        console = self.server.console
        body = b""
        if method == "POST" and (self._chunked or self._length is not None):
            read = self._body(console.MAX_BODY)  # no length and not chunked: no body (RFC 9112 6.3)
            if isinstance(read, int):
                self._plain(read, "Content-Length required" if read == 411 else "body too large")
                return
            body = read
        status, headers, data = console.handle(method, self.path, dict(self.headers.items()), body)
        self._send(status, headers, b"" if method == "HEAD" else data)

    def _send(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    # ------------------------------------------------------------ files

    def _resolve(self, raw_path: str) -> Path | int | None:
        """The file to serve, None (404) or an HTTP status for a malformed path."""
        try:
            path = unquote(raw_path, errors="strict")
        except UnicodeDecodeError:
            return 400
        if "\x00" in path or "\\" in path or not path.startswith("/"):
            return 400
        parts = [p for p in path.split("/") if p]
        if not parts or any(p.startswith(".") for p in parts):  # "..", ".", hidden and temp files
            return None
        try:
            real = self.server.root.joinpath(*parts).resolve()
        except (OSError, RuntimeError):
            return None
        if not real.is_relative_to(self.server.root):
            return None
        return real

    def _file(self, raw_path: str, head: bool) -> None:
        target = self._resolve(raw_path)
        if isinstance(target, int):
            self._plain(target, "bad request")
            return
        try:
            fh = open(target, "rb") if target is not None else None  # noqa: SIM115 - closed below
        except OSError:
            fh = None
        if fh is None:
            self._plain(404, "not found")
            return
        with fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                self._plain(404, "not found")
                return
            self._send_file(fh, st, "/".join(target.relative_to(self.server.root).parts), head)

    def _send_file(self, fh: IO[bytes], st: os.stat_result, key: str, head: bool) -> None:
        etag = self.server.etag(fh, st)
        content_type, cache_control = object_headers(key)
        common = {
            "ETag": etag,
            "Cache-Control": cache_control,
            "Last-Modified": formatdate(st.st_mtime, usegmt=True),
            "Accept-Ranges": "bytes",
        }
        inm = self.headers.get("If-None-Match")
        if inm is not None and etag_matches(inm, etag):
            self.send_response(304)
            for name, value in common.items():
                self.send_header(name, value)
            self.end_headers()
            return
        size = st.st_size
        status, start, length = 200, 0, size
        extra: dict[str, str] = {}
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if wanted is not None and (if_range is None or if_range.strip() == etag):
            chosen = parse_range(wanted, size)
            if chosen == UNSATISFIABLE:
                self._plain(416, "range not satisfiable", {**common, "Content-Range": f"bytes */{size}"})
                return
            if isinstance(chosen, tuple):
                status, start, length = 206, chosen[0], chosen[1] - chosen[0] + 1
                extra["Content-Range"] = f"bytes {chosen[0]}-{chosen[1]}/{size}"
        self.send_response(status)
        for name, value in {**common, **extra, "Content-Type": content_type}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if head:
            return
        fh.seek(start)
        try:
            while length > 0:
                chunk = fh.read(min(CHUNK, length))
                if not chunk:  # truncated under us; the client sees a short body
                    self.close_connection = True
                    return
                self.wfile.write(chunk)
                length -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def make_server(
    root: str | Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    reports_url: str | None = None,
    fleet_secret: str | None = None,
    console: Any = None,
) -> UpdateServer:
    """A bound server (not yet serving); ``port`` 0 picks a free port (see ``server.url``).

    With ``reports_url``, ``POST /v1/reports`` stores reports there, checked against
    ``fleet_secret`` (default: ``AVIKA_FLEET_SECRET``). ``console``: a
    ``publisher.console_app.ConsoleMount`` for ``--console``.
    """
    root = Path(root)
    if not root.is_dir():
        raise Refused(f"--root {root} is not a directory")
    reports = None
    if reports_url:
        try:
            secrets = parse_secrets(
                fleet_secret if fleet_secret is not None else os.environ.get("AVIKA_FLEET_SECRET")
            )
        except ConfigError as exc:
            raise Refused(f"AVIKA_FLEET_SECRET: {exc}") from None
        try:
            store = ReportStore.from_url(reports_url)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        reports = ReportsEndpoint(store, secrets)
    return UpdateServer(root, (host, port), reports, console)


def run(
    root: str | Path,
    host: str,
    port: int,
    reports_url: str | None = None,
    out: Any = None,
    console: Any = None,
) -> None:
    """Serve until SIGTERM or SIGINT; the first line on ``out`` says where."""
    out = out or sys.stdout
    server = make_server(root, host, port, reports_url, console=console)
    stopping = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        if not stopping.is_set():  # shutdown() waits for serve_forever: call it from another thread
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"serving {server.root} on {server.url}", file=out, flush=True)
        if console is not None:
            print(f"console: {server.url}/console/", file=out, flush=True)
        server.serve_forever(poll_interval=0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.server_close()
        if server.reports is not None:
            server.reports.store.close()
        if console is not None:
            console.api.reports.close()
