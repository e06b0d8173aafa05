"""Shared helpers for the agent's I/O tests: a real HTTP server on 127.0.0.1 and signed manifests.

`LocalServer` is a `ThreadingHTTPServer` in a thread serving scripted `Route`s: ETag / 304, Range /
206, redirects, error statuses, connections dropped mid-body, bodies that never end. It records
every request, so a test can assert what the agent asked for (or that it asked nothing). A POST
(a report) is answered with the route's status and body, its request body read and recorded.

`Release` builds a manifest with `agent.manifest.Manifest` and signs it with `LocalSigner` +
`sign_envelope`: the publisher's own path, no hand-written JSON unless a test wants bad JSON.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from agent.manifest import (
    Binary,
    LocalSigner,
    Manifest,
    Rollout,
    generate_private_key,
    sign_envelope,
)


@dataclass
class Route:
    """What one path answers. Without options: 200 with `body` and its Content-Length."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    etag: str | None = None  # sent as ETag; a matching If-None-Match gets 304
    ranges: bool = True  # honour "Range: bytes=N-" with 206 + Content-Range
    drop_plan: list[int | None] = field(default_factory=list)  # per request: close after N body bytes
    declared_length: int | None = None  # Content-Length to announce instead of the real one
    endless: bool = False  # no Content-Length, zeros until the client hangs up
    location: str | None = None  # redirect target (with a 30x status)
    delay: float = 0.0  # seconds to wait before answering


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    method: str = "GET"
    body: bytes = b""


class LocalServer:
    """A real HTTP/1.1 server on 127.0.0.1 (use as a context manager)."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[Seen] = []
        self.endless_sent = 0  # bytes an endless route wrote before the client went away
        self._lock = threading.Lock()
        self._httpd = _QuietServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> LocalServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, path: str, body: bytes = b"", **options: Any) -> Route:
        route = Route(body=body, **options)
        self.routes[path] = route
        return route

    def count(self, path: str | None = None) -> int:
        return sum(1 for r in self.requests if path is None or r.path == path)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-body is what half of these tests are about


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        owner: LocalServer = self.server.owner  # type: ignore[attr-defined]
        path = urlsplit(self.path).path
        headers = {k.lower(): v for k, v in self.headers.items()}
        with owner._lock:
            owner.requests.append(Seen(path, headers))
            route = owner.routes.get(path)
            drop = route.drop_plan.pop(0) if route and route.drop_plan else None
        if route is None:
            return self._answer(404, b"not found\n")
        if route.delay:
            threading.Event().wait(route.delay)
        if route.location is not None:
            return self._answer(route.status, b"", {"Location": route.location})
        extra = dict(route.headers)
        if route.etag:
            extra["ETag"] = route.etag
            if headers.get("if-none-match") == route.etag:
                return self._answer(304, None, extra)
        if route.status != 200:
            return self._answer(route.status, route.body, extra)
        if route.endless:
            return self._endless(owner)
        status, payload = 200, route.body
        wanted = headers.get("range", "")
        if route.ranges and wanted.startswith("bytes=") and wanted.endswith("-"):
            start = int(wanted[len("bytes=") : -1])
            if start >= len(route.body):
                extra["Content-Range"] = f"bytes */{len(route.body)}"
                return self._answer(416, b"", extra)
            status, payload = 206, route.body[start:]
            extra["Content-Range"] = f"bytes {start}-{len(route.body) - 1}/{len(route.body)}"
        length = route.declared_length if route.declared_length is not None else len(payload)
        self._answer(status, payload if drop is None else payload[:drop], extra, length)
        if drop is not None:
            self.close_connection = True

    def do_POST(self) -> None:
        owner: LocalServer = self.server.owner  # type: ignore[attr-defined]
        path = urlsplit(self.path).path
        headers = {k.lower(): v for k, v in self.headers.items()}
        length = int(headers.get("content-length") or 0)
        body = self.rfile.read(length) if 0 < length <= 1 << 20 else b""
        with owner._lock:
            owner.requests.append(Seen(path, headers, "POST", body))
            route = owner.routes.get(path)
        if route is None:
            return self._answer(404, b"not found\n")
        self._answer(route.status, route.body, dict(route.headers))

    def _answer(
        self,
        status: int,
        body: bytes | None,
        headers: dict[str, str] | None = None,
        length: int | None = None,
    ) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if body is not None:
            self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if body:
            self.wfile.write(body)
        self.wfile.flush()

    def _endless(self, owner: LocalServer) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        block = b"\0" * 65536
        try:
            while owner.endless_sent < 1 << 30:
                self.wfile.write(block)
                owner.endless_sent += len(block)
        except OSError:  # the client hung up: exactly what the test wants
            pass


# ---------------------------------------------------------------- signed manifests


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Release:
    """Signs manifests the way the publisher does; `payload()` / `envelope()` take overrides."""

    def __init__(self, signers: list[LocalSigner] | None = None) -> None:
        self.signers = signers or [LocalSigner(generate_private_key())]

    @property
    def public_keys(self) -> str:
        return ",".join(s.public_key.b64 for s in self.signers)

    def manifest(
        self,
        *,
        serial: int = 1,
        version: str = "0.1.44",
        now: datetime | None = None,
        expires_in: timedelta = timedelta(days=30),
        platforms: tuple[str, ...] = ("linux-amd64", "linux-arm64"),
        binary: bytes = b"new agent\n",
        percent: int = 100,
        salt: str = "",
        **fields: Any,
    ) -> Manifest:
        now = now or datetime.now(timezone.utc)
        digest = sha256(binary)
        binaries = {
            p: Binary(url=f"binaries/{version}/{digest}/avika-agent-{p}", sha256=digest, size=len(binary))
            for p in platforms
        }
        return Manifest(
            serial=serial,
            version=version,
            released_at=now - timedelta(hours=1),
            expires=now + expires_in,
            binaries=binaries,
            rollout=Rollout(percent=percent, salt=salt),
            **fields,
        )

    def envelope(
        self, payload: bytes | None = None, signers: list[LocalSigner] | None = None, **kw: Any
    ) -> bytes:
        if payload is None:
            payload = self.manifest(**kw).to_payload()
        return sign_envelope(payload, signers or self.signers)


def publish(server: LocalServer, envelope: bytes, path: str = "/updates/manifest.json") -> Route:
    """Serve `envelope` as the manifest with an ETag of its content (as nginx and S3 do)."""
    return server.serve(path, envelope, etag=f'"{sha256(envelope)[:16]}"')
