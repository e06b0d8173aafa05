"""HTTP/1.1 for the agent on the standard library (``http.client`` + ``ssl``), with real deadlines.

Why not requests: with urllib3, idna, charset_normalizer and certifi it is about 10 MiB of an
agent that must update itself within a 64 MiB memory cap, and a tenth of a second of every start
(issue 11). And its timeouts are per read, so a server that drips one byte every few seconds never
trips them (issue 10).

Deadlines (DESIGN section 3): every socket operation of a request -- each connect attempt, the
proxy's CONNECT, the TLS handshake, each send and each receive, status line, headers and body
alike -- waits at most what the request's :class:`Budget` leaves: the smaller of a per-operation
limit (nothing arrived for that long: :class:`IdleTimeout`) and the time left to the deadline
(:class:`DeadlineExceeded`). The wait shrinks as the deadline nears, so however slowly bytes
arrive, the request ends at its deadline. Name resolution (``getaddrinfo``) is the one step no
socket timeout reaches; the host's resolver bounds it.

- TLS: :func:`ssl.create_default_context` (certificate chain and host name verified against the
  system trust store; OpenSSL honours ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``), made once per
  :class:`Client` when its first https request is made, with Python 3.13's verification flags on
  every interpreter (strict RFC 5280 checks; a trusted intermediate may anchor a chain), so one
  agent file accepts the same certificates on a 3.9 host as on a 3.13 one.
- Proxies: ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``ALL_PROXY`` / ``NO_PROXY`` as
  :func:`urllib.request.getproxies` and ``proxy_bypass`` read them (requests did the same): http
  goes through the proxy in absolute form, https through a ``CONNECT`` tunnel
  (``HTTPConnection.set_tunnel``), so TLS still runs end to end with the origin. Only ``http://``
  proxies; credentials in the proxy URL become ``Proxy-Authorization: Basic``. Loopback
  destinations never go through a proxy (as Go's net/http decides): a report token allowed over
  plain http to loopback must never leave the host.
- Keep-alive: one idle connection per (origin, proxy) is kept and reused once its previous
  response was read to the end; a request on a reused connection that the server had meanwhile
  closed is retried once on a new one (before any answer, so nothing is sent twice that the server
  acted on; report events are idempotent anyway).
- ``Accept-Encoding: identity``: the bytes hashed are the bytes the server sent.
- Redirects are not followed here: the fetcher applies its own policy.
"""

from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import math
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
_DEFAULT_PORTS = {"http": 80, "https": 443}


# ---------------------------------------------------------------- time budgets


class Timeout(socket.timeout):
    """A socket operation waited as long as its budget allowed."""


class DeadlineExceeded(Timeout):
    """The request's total deadline passed (connect to last byte)."""


class IdleTimeout(Timeout):
    """One operation waited its whole per-operation limit: nothing arrived (or went out)."""

    def __init__(self, phase: str, limit: float) -> None:
        what = "connecting" if phase == "connect" else f"waiting to {phase}"
        super().__init__(f"timed out {what}: nothing for {limit:g}s")
        self.phase = phase
        self.limit = limit


class Budget:
    """How long each socket operation of one request (or one download) may wait.

    ``deadline`` is a point on ``clock`` (None: no deadline); ``idle`` limits each send and
    receive, ``connect`` each connect attempt and the TLS handshake. :meth:`wait` is called right
    before every operation, so the allowance shrinks as the deadline nears.
    """

    def __init__(
        self,
        *,
        deadline: float | None = None,
        total: float | None = None,
        idle: float = READ_TIMEOUT,
        connect: float = CONNECT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.deadline = deadline
        self.total = total
        self.idle = idle
        self.connect = connect
        self.clock = clock
        self._last: tuple[str, float, bool] = ("read", idle, False)

    @classmethod
    def lasting(
        cls,
        seconds: float | None,
        *,
        idle: float = READ_TIMEOUT,
        connect: float = CONNECT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> Budget:
        """A budget whose deadline is ``seconds`` from now (None: only the per-operation limits)."""
        deadline = None if seconds is None else clock() + seconds
        return cls(deadline=deadline, total=seconds, idle=idle, connect=connect, clock=clock)

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - self.clock()

    def wait(self, phase: str = "read") -> float:
        """The timeout for the next operation; ``DeadlineExceeded`` when none is left."""
        limit = self.connect if phase == "connect" else self.idle
        left = self.left()
        if left <= 0:
            raise self.exceeded()
        self._last = (phase, limit, left < limit)
        return min(limit, left)

    def exceeded(self) -> DeadlineExceeded:
        total = f" of {self.total:g}s" if self.total is not None else ""
        return DeadlineExceeded(f"deadline{total} reached")

    def timed_out(self) -> Timeout:
        """What the operation that just timed out means: the deadline, or an idle limit."""
        phase, limit, by_deadline = self._last
        return self.exceeded() if by_deadline else IdleTimeout(phase, limit)


# ---------------------------------------------------------------- sockets under a budget


# Changing a socket's timeout costs a system call; a receive may wait this much past the deadline
# rather than pay one on every receive while a long deadline shrinks.
TIMEOUT_SLACK = 0.05


def _set_timeout(sock: socket.socket, timeout: float) -> None:
    current = sock.gettimeout()
    if current is None or not timeout <= current <= timeout + TIMEOUT_SLACK:
        sock.settimeout(timeout)


class _TimedReader(io.RawIOBase):
    """The receiving side of a socket: each ``recv`` waits at most what the budget leaves."""

    def __init__(self, sock: socket.socket, owner: _Connection) -> None:
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)  # keeps the socket open while we read
        self._owner = owner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        budget = self._owner.budget
        _set_timeout(self._sock, budget.wait("read"))
        try:
            return self._raw.readinto(buffer) or 0
        except socket.timeout:
            raise budget.timed_out() from None

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _TimedSocket:
    """The socket as ``http.client`` uses it (``sendall``, ``makefile``, ``close``), under a budget."""

    def __init__(self, sock: socket.socket, owner: _Connection) -> None:
        self._sock = sock
        self._owner = owner

    def makefile(self, mode: str = "rb", *args: object, **kwargs: object) -> io.BufferedReader:
        if mode != "rb":
            raise ValueError(f"unsupported mode {mode!r}")
        return io.BufferedReader(_TimedReader(self._sock, self._owner))

    def sendall(self, data: bytes) -> None:
        budget = self._owner.budget
        _set_timeout(self._sock, budget.wait("write"))
        try:
            self._sock.sendall(data)  # the timeout bounds the whole call (Python >= 3.5)
        except socket.timeout:
            raise budget.timed_out() from None

    def close(self) -> None:
        self._sock.close()

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


def _connect(host: str, port: int, budget: Budget) -> socket.socket:
    """TCP to the first address of ``host`` that answers, each attempt within the budget."""
    error: OSError | None = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(budget.wait("connect"))
            sock.connect(address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except socket.timeout:
            sock.close()
            error = budget.timed_out()
            if isinstance(error, DeadlineExceeded):
                raise error from None
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError(f"{host}: no address to connect to")


class _Connection(http.client.HTTPConnection):
    """One HTTP/1.1 connection: direct or to a proxy, TLS to the origin when it is https."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None, server_hostname: str) -> None:
        super().__init__(host, port)
        self.budget = Budget()
        self._tls = tls
        self._server_hostname = server_hostname
        self.served = 0  # responses received on the current socket

    def connect(self) -> None:
        budget = self.budget
        raw = _connect(self.host, self.port, budget)
        self.sock = _TimedSocket(raw, self)
        self.served = 0
        try:
            if self._tunnel_host:
                self._tunnel()  # CONNECT through the proxy; its answer is read under the budget too
            if self._tls is not None:
                raw.settimeout(budget.wait("connect"))
                tls = self._tls.wrap_socket(
                    raw, server_hostname=self._server_hostname, do_handshake_on_connect=False
                )
                self.sock = _TimedSocket(tls, self)
                try:
                    tls.do_handshake()  # the socket timeout bounds the whole handshake
                except socket.timeout:
                    raise budget.timed_out() from None
        except BaseException:
            self.close()
            raw.close()
            raise


# ---------------------------------------------------------------- responses


class Response:
    """A response whose body is read with :meth:`read1` (one receive at most per call)."""

    def __init__(self, raw: http.client.HTTPResponse, release: Callable[[bool], None]) -> None:
        self._raw = raw
        self._release = release
        self._broken = False
        self._closed = False
        self.status: int = raw.status
        self.reason: str = raw.reason
        self.headers: dict[str, str] = {name.lower(): value for name, value in raw.getheaders()}

    def read1(self, size: int) -> bytes:
        """Up to ``size`` body bytes, ``b""`` at its end; a body cut short raises ``IncompleteRead``."""
        try:
            data = self._raw.read1(size)
            if not data and self._raw.length:  # the server closed before the announced length
                raise http.client.IncompleteRead(b"", self._raw.length)
        except BaseException:
            self._broken = True
            raise
        return data

    def read(self, limit: int) -> bytes:
        """The body, or its first ``limit`` bytes (small answers: reports, errors)."""
        out = bytearray()
        while len(out) < limit:
            data = self.read1(limit - len(out))
            if not data:
                break
            out += data
        return bytes(out)

    def _finished(self) -> bool:
        """Was the whole body read (so the connection may carry another request)?"""
        raw = self._raw
        if self._broken:
            return False
        if not raw.isclosed() and raw.length == 0 and not raw.chunked:
            raw.read()  # an empty body (304, HEAD, Content-Length: 0): mark it read
        return raw.isclosed()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        finished = self._finished()
        if not finished:
            self._raw.close()
        self._release(finished)

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- proxies


def is_loopback_host(host: str | None) -> bool:
    """127.0.0.0/8, ::1 and ``localhost`` (DESIGN section 5's definition of loopback)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Proxy(NamedTuple):
    host: str
    port: int
    authorization: str | None  # "Basic ..." from the proxy URL's user info

    @classmethod
    def parse(cls, url: str) -> Proxy:
        if "://" not in url:
            url = "http://" + url  # as requests and curl read a bare host:port
        parts = urlsplit(url)
        if parts.scheme.lower() != "http" or not parts.hostname:
            raise ValueError(
                f"proxy {parts.scheme}://{parts.hostname or ''}: only http:// proxies are supported"
            )
        auth = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            auth = "Basic " + base64.b64encode(pair).decode("ascii")
        return cls(parts.hostname, parts.port or 80, auth)


def choose_proxy(scheme: str, host: str, port: int, proxies: Mapping[str, str]) -> Proxy | None:
    """The proxy a request to ``scheme://host:port`` goes through, if any (see the module docstring)."""
    if is_loopback_host(host):
        return None
    url = proxies.get(scheme) or proxies.get("all")
    if not url:
        return None
    if urllib.request.proxy_bypass_environment(f"{host}:{port}", dict(proxies)):
        return None
    return Proxy.parse(url)


# ---------------------------------------------------------------- the client

# X509_V_FLAG_PARTIAL_CHAIN: ssl has a name for it from Python 3.10 on.
_PARTIAL_CHAIN = getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0x80000)


def default_tls_context() -> ssl.SSLContext:
    """The system trust store, verified as Python 3.13 verifies by default, on every Python."""
    context = ssl.create_default_context()
    context.verify_flags |= ssl.VERIFY_X509_STRICT | _PARTIAL_CHAIN
    return context


class Client:
    """Requests with budgets, over kept-alive connections; one per fetcher or poster.

    Thread-safe in the sense the agent needs: connections are taken from and given back to the
    pool under a lock, and a connection serves one request at a time.
    """

    def __init__(
        self,
        *,
        user_agent: str | None = None,
        proxies: Mapping[str, str] | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.user_agent = user_agent
        self.proxies = dict(urllib.request.getproxies() if proxies is None else proxies)
        self._tls = tls_context
        self._idle: dict[tuple[str, str, int, Proxy | None], _Connection] = {}
        self._lock = threading.Lock()

    def tls_context(self) -> ssl.SSLContext:
        with self._lock:
            if self._tls is None:
                self._tls = default_tls_context()
            return self._tls

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        budget: Budget,
    ) -> Response:
        """Send one request (no redirect followed); the response's body is still to be read.

        Raises ``ValueError`` for a URL or proxy it cannot use, :class:`Timeout` when the budget
        ran out, and ``OSError`` / ``http.client.HTTPException`` for everything else on the wire.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname
        if scheme not in _DEFAULT_PORTS or not host:
            raise ValueError(f"not an http(s) URL: {scheme or 'no scheme'}://{host or ''}")
        port = parts.port or _DEFAULT_PORTS[scheme]  # ValueError for a bad port
        proxy = choose_proxy(scheme, host, port, self.proxies)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        sent = {"Accept-Encoding": "identity"}
        if self.user_agent:
            sent["User-Agent"] = self.user_agent
        sent.update(headers or {})
        if proxy is not None and scheme == "http":
            target = f"http://{parts.netloc.rsplit('@', 1)[-1]}{target}"  # absolute form, no user info
            if proxy.authorization:
                sent["Proxy-Authorization"] = proxy.authorization
        key = (scheme, host, port, proxy)
        conn = self._take(key) or self._new(scheme, host, port, proxy)
        for attempt in (1, 2):
            reused = conn.sock is not None and conn.served > 0
            conn.budget = budget
            try:
                conn.request(method, target, body=body, headers=sent)
                raw = conn.getresponse()
            except Timeout:
                conn.close()
                raise
            except (ConnectionError, http.client.BadStatusLine):
                conn.close()  # the next attempt opens a new socket
                if not reused or attempt == 2:
                    raise
                continue
            except BaseException:
                conn.close()
                raise
            conn.served += 1
            return Response(raw, lambda finished: self._give_back(key, conn, finished))
        raise AssertionError("unreachable")  # the loop returns or raises

    def _new(self, scheme: str, host: str, port: int, proxy: Proxy | None) -> _Connection:
        tls = self.tls_context() if scheme == "https" else None
        if proxy is None:
            return _Connection(host, port, tls, host)
        conn = _Connection(proxy.host, proxy.port, tls, host)
        if scheme == "https":
            tunnel = {"Proxy-Authorization": proxy.authorization} if proxy.authorization else None
            conn.set_tunnel(host, port, headers=tunnel)
        return conn

    def _take(self, key: tuple[str, str, int, Proxy | None]) -> _Connection | None:
        with self._lock:
            return self._idle.pop(key, None)

    def _give_back(self, key: tuple[str, str, int, Proxy | None], conn: _Connection, finished: bool) -> None:
        if not finished or conn.sock is None:
            conn.close()
            return
        with self._lock:
            old = self._idle.pop(key, None)
            self._idle[key] = conn
        if old is not None:
            old.close()

    def close(self) -> None:
        """Close the idle connections (a response still being read keeps its own)."""
        with self._lock:
            idle, self._idle = list(self._idle.values()), {}
        for conn in idle:
            conn.close()


def describe(exc: BaseException, limit: int = 300) -> str:
    """A bounded one-line reason for an error on the wire."""
    text = " ".join((str(exc) or type(exc).__name__).split())
    if isinstance(exc, http.client.IncompleteRead):
        text = f"connection closed {exc.expected} bytes short of the announced length"
    return text if len(text) <= limit else text[:limit] + "..."
