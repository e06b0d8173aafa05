"""A fault-injecting HTTP proxy for tests: the CDN on its worst day, on 127.0.0.1 only.

``FaultProxy(upstream_url)`` listens on a free loopback port and forwards every request to the
upstream (a ``publisher.serve`` server, nginx, a ``LocalServer``), unchanged, until a test
injects a fault for a path pattern and a number of requests::

    with FaultProxy(server.url + "/updates") as proxy:
        proxy.inject("binaries/*", Fault.TRUNCATE, after=1000, times=2)
        agent_config(UPDATE_SERVER=proxy.url)   # proxy.url keeps the upstream's path
        ...
        assert [r.fault for r in proxy.requests] == ["truncate", "truncate", None]

A pattern is an ``fnmatch`` glob over the request path (query excluded; ``*`` crosses ``/``); one
without a leading ``/`` also matches at any depth (``"binaries/*"`` matches
``/updates/binaries/0.1.44/...``). Rules are tried in the order they were injected; the first
one that matches and has requests left (``times``; None = every request) is applied and counted.

Faults (:class:`Fault`), each what a broken or hostile CDN really does on the wire:

- ``TRUNCATE`` (``after`` = body bytes, default 0): the upstream's status and headers, its real
  ``Content-Length`` included, ``after`` bytes of the body, then a clean close (FIN).
- ``RESET`` (``after``; None = before the status line): like ``TRUNCATE`` but, once the client
  has acknowledged those bytes, the socket is closed with ``SO_LINGER`` 0: the client reads them,
  then sees a TCP RST (``ECONNRESET``), not an end of file.
- ``STALL`` (``after``, ``seconds``, default 5, capped at :data:`MAX_STALL`): ``after`` body
  bytes, then silence, then a close. Closing the proxy ends every stall at once.
- ``LIE_LENGTH`` (``delta`` or ``length``): announces ``Content-Length`` = real + ``delta`` (or
  ``length``), sends the real body, then closes (a client waiting for more sees the end).
- ``STATUS`` (``status``, default 503): answers that status with a short text body without
  asking the upstream.
- ``NOT_MODIFIED_NO_ETAG``: answers ``304`` without an ``ETag``, whatever the request said.
- ``REPLAY`` (``body``, else ``index`` into the bodies captured for this path, default 0 = the
  oldest): a ``200`` with an older, validly signed manifest the proxy saw pass earlier. Bodies of
  200 responses whose path matches ``capture`` (default ``*manifest.json``) are captured, each
  distinct body once, in the order first seen (:meth:`FaultProxy.captured`).
- ``MIX_AND_MATCH`` (``source`` = another upstream path, or ``body``): the request is answered
  with another object's bytes (another release's binary), the manifest being served normally.
- ``CORRUPT`` (``offset``, default 0): the upstream's response with one body byte flipped.
- ``DRIP`` (``after``, default 0; ``every`` seconds, default 0.2; ``step`` bytes, default 1; ``head``,
  default False): ``after`` body bytes at once, then ``step`` bytes every ``every`` seconds, so a
  client that only times out idle reads never times out; with ``head`` the status line and headers
  drip too. It ends when the body is sent, the client hangs up (``Record.client_gone``), the proxy
  closes, or after :data:`MAX_STALL` seconds (then the connection is closed).

Every request is recorded (:class:`Record`: method, path, headers, the fault applied, the status
sent and the body bytes written), so a test asserts what the client asked for and what it got.
"""

from __future__ import annotations

import enum
import fcntl
import fnmatch
import hashlib
import http.client
import socket
import struct
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

MAX_STALL = 30.0  # a stall never outlives a test by more than this, even if nobody closes the proxy
UPSTREAM_TIMEOUT = 30.0
CAPTURE_LIMIT = 1024 * 1024  # bodies bigger than a manifest envelope may be are never captured
CHUNK = 64 * 1024
# Hop-by-hop headers (RFC 9110 section 7.6.1) are never forwarded in either direction.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te"}
    | {"trailer", "transfer-encoding", "upgrade", "host"}
)


class Fault(enum.Enum):
    TRUNCATE = "truncate"
    RESET = "reset"
    STALL = "stall"
    LIE_LENGTH = "lie_length"
    STATUS = "status"
    NOT_MODIFIED_NO_ETAG = "not_modified_no_etag"
    REPLAY = "replay"
    MIX_AND_MATCH = "mix_and_match"
    CORRUPT = "corrupt"
    DRIP = "drip"


_OPTIONS: dict[Fault, frozenset[str]] = {
    Fault.TRUNCATE: frozenset({"after"}),
    Fault.RESET: frozenset({"after"}),
    Fault.STALL: frozenset({"after", "seconds"}),
    Fault.LIE_LENGTH: frozenset({"delta", "length"}),
    Fault.STATUS: frozenset({"status"}),
    Fault.NOT_MODIFIED_NO_ETAG: frozenset(),
    Fault.REPLAY: frozenset({"body", "index"}),
    Fault.MIX_AND_MATCH: frozenset({"source", "body"}),
    Fault.CORRUPT: frozenset({"offset"}),
    Fault.DRIP: frozenset({"after", "every", "step", "head"}),
}


@dataclass
class Rule:
    """One injected fault; ``applied`` counts the requests it hit."""

    glob: str
    fault: Fault
    times: int | None
    options: dict[str, Any]
    applied: int = 0

    def matches(self, path: str) -> bool:
        if self.times is not None and self.applied >= self.times:
            return False
        if fnmatch.fnmatchcase(path, self.glob):
            return True
        return not self.glob.startswith("/") and fnmatch.fnmatchcase(path, "*/" + self.glob)


@dataclass
class Record:
    """One request the proxy received and what it did about it."""

    method: str
    path: str  # with the query, as sent
    headers: dict[str, str]  # lower-cased names
    fault: str | None = None  # Fault value, None when forwarded untouched
    status: int | None = None  # None: no status line was sent (reset before the response)
    body_bytes: int = 0
    client_gone: bool = False  # a write failed: the client hung up while we were still sending
    done: threading.Event = field(default_factory=threading.Event, repr=False)


class FaultProxy:
    """The proxy; a context manager (``with FaultProxy(url) as proxy``) or ``start()``/``close()``."""

    def __init__(self, upstream_url: str, *, capture: str = "*manifest.json") -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the upstream must be an http:// URL, not {upstream_url!r}")
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"loopback only: {parts.hostname} is not a loopback host")
        self.upstream = (parts.hostname, parts.port or 80)
        self._base_path = parts.path.rstrip("/")
        self.capture = capture
        self.rules: list[Rule] = []
        self.requests: list[Record] = []
        self._captured: dict[str, list[bytes]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd = _ProxyServer(("127.0.0.1", 0), _Handler)
        self._httpd.proxy = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="faultproxy", daemon=True
        )
        self._started = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> FaultProxy:
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()  # ends every stall now
        if self._started:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """The proxy's base URL: same path as the upstream URL, so it replaces it one for one."""
        return f"http://127.0.0.1:{self.port}{self._base_path}"

    # ------------------------------------------------------------ faults

    def inject(self, glob: str, fault: Fault, *, times: int | None = 1, **options: Any) -> Rule:
        """Apply ``fault`` to the next ``times`` requests whose path matches ``glob`` (None: all)."""
        unknown = set(options) - _OPTIONS[fault]
        if unknown:
            raise TypeError(f"{fault.name} takes {sorted(_OPTIONS[fault]) or 'no options'}, not {unknown}")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 (or None for every request)")
        if fault is Fault.MIX_AND_MATCH and ("source" in options) == ("body" in options):
            raise TypeError("MIX_AND_MATCH needs exactly one of source= (an upstream path) or body=")
        if fault is Fault.STALL:
            options["seconds"] = min(float(options.get("seconds", 5.0)), MAX_STALL)
        rule = Rule(glob, fault, times, dict(options))
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule: from now on each request is forwarded untouched."""
        with self._lock:
            self.rules.clear()

    def _take(self, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(path):
                    rule.applied += 1
                    return rule
        return None

    # ------------------------------------------------------------ records and captures

    def captured(self, path: str) -> list[bytes]:
        """Distinct 200 bodies seen for ``path`` (query excluded), oldest first."""
        with self._lock:
            return list(self._captured.get(path, []))

    def _capture(self, path: str, body: bytes) -> None:
        with self._lock:
            seen = self._captured.setdefault(path, [])
            if body not in seen:
                seen.append(body)

    def _record(self, record: Record) -> None:
        with self._lock:
            self.requests.append(record)

    def seen(self, glob: str = "*") -> list[Record]:
        """The records whose path (query excluded) matches ``glob`` (same matching as faults)."""
        probe = Rule(glob, Fault.STATUS, None, {})
        with self._lock:
            return [r for r in self.requests if probe.matches(urlsplit(r.path).path)]

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every request received so far has been answered (or its fault finished)."""
        with self._lock:
            pending = [r.done for r in self.requests]
        return all(event.wait(timeout) for event in pending)


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    proxy: FaultProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up on a broken response is the point of this server


# ---------------------------------------------------------------- the handler


class _Upstream:
    """One upstream response: status, headers (original case) and a body read in chunks."""

    def __init__(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        self.conn, self.response = conn, response
        self.status, self.reason = response.status, response.reason
        self.headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
        self.length = response.length  # None: unknown (read until close or chunked)
        self._prefix = b""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def read_all(self, limit: int) -> bytes | None:
        """The whole body if it is at most ``limit`` bytes (then ``chunks`` replays it), else None."""
        if self.length is not None and self.length > limit:
            return None
        body = self.response.read(limit + 1)
        if len(body) > limit:
            self._prefix = body
            return None
        self._prefix = body
        return body

    def chunks(self) -> Iterator[bytes]:
        if self._prefix:
            yield self._prefix
            self._prefix = b""
        while chunk := self.response.read(CHUNK):
            yield chunk

    def close(self) -> None:
        self.response.close()
        self.conn.close()


class _Handler(BaseHTTPRequestHandler):
    server: _ProxyServer
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection does not hold a thread for ever

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    # ------------------------------------------------------------ dispatch

    def _handle(self) -> None:
        proxy = self.server.proxy
        length = self.headers.get("Content-Length")
        body = self.rfile.read(int(length)) if length and length.isdigit() else None
        path = urlsplit(self.path).path
        rule = proxy._take(path)
        record = Record(
            self.command,
            self.path,
            {k.lower(): v for k, v in self.headers.items()},
            rule.fault.value if rule else None,
        )
        proxy._record(record)
        self._rec = record
        try:
            self._apply(rule, path, body)
        except OSError:  # the client went away (or we reset it): nothing more to say
            record.client_gone = rule is None or rule.fault is not Fault.RESET
            self.close_connection = True
        finally:
            record.done.set()

    def _apply(self, rule: Rule | None, path: str, body: bytes | None) -> None:
        proxy = self.server.proxy
        fault = rule.fault if rule else None
        opts = rule.options if rule else {}
        if fault is Fault.RESET and opts.get("after") is None:
            return self._reset()
        if fault is Fault.STATUS:
            status = int(opts.get("status", 503))
            return self._simple(status, f"fault proxy: HTTP {status}\n".encode())
        if fault is Fault.NOT_MODIFIED_NO_ETAG:
            return self._simple(304, None)
        if fault is Fault.REPLAY:
            replayed = opts.get("body")
            if replayed is None:
                bodies = proxy.captured(path)
                index = int(opts.get("index", 0))
                if not -len(bodies) <= index < len(bodies):
                    return self._simple(500, b"fault proxy: nothing captured to replay\n")
                replayed = bodies[index]
            tag = '"' + hashlib.sha256(replayed).hexdigest() + '"'
            return self._simple(200, replayed, {"Content-Type": "application/json", "ETag": tag})
        if fault is Fault.MIX_AND_MATCH and "body" in opts:
            return self._simple(200, opts["body"], {"Content-Type": "application/octet-stream"})
        target = opts["source"] if fault is Fault.MIX_AND_MATCH else self.path
        upstream = self._open_upstream(target, body)
        if upstream is None:
            return None
        try:
            self._relay(upstream, rule, path)
        finally:
            upstream.close()
        return None

    # ------------------------------------------------------------ upstream

    def _open_upstream(self, target: str, body: bytes | None) -> _Upstream | None:
        proxy = self.server.proxy
        host, port = proxy.upstream
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = f"{host}:{port}"
        conn = http.client.HTTPConnection(host, port, timeout=UPSTREAM_TIMEOUT)
        try:
            conn.request(self.command, target, body=body, headers=headers)
            response = conn.getresponse()
        except OSError as exc:
            conn.close()
            self._simple(502, f"fault proxy: upstream unreachable: {exc}\n".encode())
            return None
        return _Upstream(conn, response)

    def _relay(self, upstream: _Upstream, rule: Rule | None, path: str) -> None:
        proxy = self.server.proxy
        fault = rule.fault if rule else None
        opts = rule.options if rule else {}
        has_body = self.command != "HEAD" and upstream.status not in (204, 304) and upstream.status >= 200
        if (
            has_body
            and upstream.status == 200
            and proxy.capture
            and fnmatch.fnmatchcase(path, proxy.capture)
            and (captured := upstream.read_all(CAPTURE_LIMIT)) is not None
        ):
            proxy._capture(path, captured)
        headers = [(k, v) for k, v in upstream.headers if k.lower() != "content-length"]
        announced = upstream.length if has_body else None
        if fault is Fault.LIE_LENGTH and announced is not None:
            announced = int(opts["length"]) if "length" in opts else announced + int(opts.get("delta", 1000))
        if has_body and upstream.length is None:  # unknown length: frame by closing
            self.close_connection = True
            headers.append(("Connection", "close"))
        elif announced is not None:
            headers.append(("Content-Length", str(announced)))
        elif upstream.header("content-length") is not None:  # HEAD / 304: pass the length through
            headers.append(("Content-Length", upstream.header("content-length") or "0"))
        self._rec.status = upstream.status
        started = time.monotonic()
        if fault is Fault.DRIP and opts.get("head"):
            head = f"HTTP/1.1 {upstream.status} {upstream.reason}\r\n"
            head += "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
            if not self._drip(head.encode("latin-1"), opts, started, count=False):
                self.close_connection = True
                return
        else:
            self.send_response_only(upstream.status, upstream.reason)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
        if not has_body:
            return
        if fault is Fault.DRIP:
            return self._drip_body(upstream, opts, started)
        limit = None
        if fault in (Fault.TRUNCATE, Fault.RESET, Fault.STALL):
            limit = int(opts.get("after") or 0)
        flip = int(opts.get("offset", 0)) if fault is Fault.CORRUPT else None
        sent = 0
        for chunk in upstream.chunks():
            if flip is not None and sent <= flip < sent + len(chunk):
                i = flip - sent
                chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
            if limit is not None and sent + len(chunk) >= limit:
                chunk = chunk[: limit - sent]
                self._write(chunk)
                sent += len(chunk)
                break
            self._write(chunk)
            sent += len(chunk)
        if fault is Fault.RESET:
            self._drain()
            self._reset()
        elif fault is Fault.STALL:
            proxy._stop.wait(float(opts["seconds"]))
            self.close_connection = True
        elif fault in (Fault.TRUNCATE, Fault.LIE_LENGTH):
            self.close_connection = True

    def _drip_body(self, upstream: _Upstream, opts: dict[str, Any], started: float) -> None:
        quick = int(opts.get("after") or 0)
        for chunk in upstream.chunks():
            now, chunk = chunk[:quick], chunk[quick:]
            quick -= len(now)
            self._write(now)
            if chunk and not self._drip(chunk, opts, started):
                break
        self.close_connection = True

    def _drip(self, data: bytes, opts: dict[str, Any], started: float, count: bool = True) -> bool:
        """``data`` in pieces of ``step`` bytes, ``every`` seconds apart; False once MAX_STALL is spent."""
        step, every = max(1, int(opts.get("step", 1))), float(opts.get("every", 0.2))
        proxy = self.server.proxy
        for at in range(0, len(data), step):
            piece = data[at : at + step]
            if count:
                self._write(piece)
            else:
                self.wfile.write(piece)
            if proxy._stop.wait(every) or time.monotonic() - started > MAX_STALL:
                return False
        return True

    # ------------------------------------------------------------ wire helpers

    def _write(self, data: bytes) -> None:
        if data:
            self.wfile.write(data)
            self._rec.body_bytes += len(data)

    def _simple(self, status: int, body: bytes | None, headers: dict[str, str] | None = None) -> None:
        """A complete response made here; ``body`` None sends no Content-Length (304)."""
        self._rec.status = status
        self.send_response_only(status)
        self.send_header("Date", self.date_time_string())
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if body is not None:
            self.send_header("Content-Length", str(len(body)))
            if "Content-Type" not in (headers or {}):
                self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.end_headers()
        if body and self.command != "HEAD":
            self._write(body)

    def _drain(self, limit: float = 2.0) -> None:
        """Wait (bounded) until the peer has acknowledged every byte written so far.

        An RST throws away what still sits in our send queue, so without this "reset after N
        bytes" would deliver anywhere between 0 and N bytes depending on scheduling.
        """
        deadline = time.monotonic() + limit
        fd = self.connection.fileno()
        while time.monotonic() < deadline:
            unacked = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            if unacked == 0:
                return
            time.sleep(0.001)

    def _reset(self) -> None:
        """Abort the connection with a TCP RST: SO_LINGER 0, then close the descriptor itself.

        ``socket.close()`` would not do: the handler's ``rfile`` keeps the descriptor open, and the
        server's ``shutdown(SHUT_WR)`` afterwards would send a FIN first (a clean end of file).
        """
        self.close_connection = True
        sock: socket.socket = self.connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        fd = sock.detach()
        socket.close(fd)
