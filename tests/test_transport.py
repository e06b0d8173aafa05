"""The agent's standard-library HTTP (agent/transport.py) on real sockets: TLS, proxies, keep-alive.

Rules enforced here (DESIGN sections 5 and 7, issue 11):
- ``import agent.cli`` loads neither requests nor urllib3 nor boto3 (a fresh interpreter);
- TLS is verified against the trust store OpenSSL is pointed at (``SSL_CERT_FILE``,
  ``SSL_CERT_DIR``): an unknown CA or a certificate for another name is ``fetch_failed``; a real
  https server's redirect to http is refused;
- ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``NO_PROXY`` are honoured: http in absolute form, https through
  a ``CONNECT`` tunnel (TLS end to end: the proxy never sees the report token), proxy credentials
  from the proxy URL; loopback destinations never go through a proxy;
- one connection serves a manifest fetch and the download after it (keep-alive); a kept
  connection the server closed meanwhile is replaced without the caller noticing;
- only ``Accept-Encoding: identity`` is asked for and nothing is decoded; chunked bodies work; a
  body cut short of its announced length is an error, never a short success.

The origins are real servers on 127.0.0.1 (``tests.agent_fixtures.LocalServer``, the real
``publisher.serve`` reports endpoint), wrapped in TLS with a CA made for the test; the proxy is a
small real forward proxy on 127.0.0.1 that resolves every name to 127.0.0.1 (so ``updates.test``
reaches the origin through it, and no name ever goes to a DNS server).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import ipaddress
import json
import os
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent import transport
from agent.fetch import FetchFailed, HttpFetcher
from agent.reports import Poster
from agent.transport import Client, Proxy, choose_proxy
from infra.reports.auth import make_token
from publisher.serve import make_server
from tests.agent_fixtures import LocalServer, sha256

ROOT = Path(__file__).resolve().parent.parent
ORIGIN_NAME = "updates.test"  # resolved by the test proxy only
SECRET = "transport-test-fleet-secret-0123"


# ---------------------------------------------------------------- what the agent imports


def test_the_agent_imports_neither_requests_nor_urllib3_nor_boto3() -> None:
    code = (
        "import sys, agent.cli\n"
        "print(sorted(m for m in ('requests', 'urllib3', 'boto3', 'botocore') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


# ---------------------------------------------------------------- a CA and TLS servers


@dataclass
class Pki:
    ca_file: Path
    ca_dir: Path
    server_cert: Path
    server_key: Path
    wrong_name_cert: Path
    sloppy_cert: Path  # from the same CA, without key identifiers


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    signer: ec.EllipticCurvePrivateKey,
    **kw: object,
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    ca = bool(kw.get("ca"))
    unused = "content_commitment key_encipherment data_encipherment key_agreement encipher_only decipher_only"
    usage = dict.fromkeys(unused.split(), False)
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=ca, path_length=0 if ca else None), True),
        (x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca, **usage), True),
    ]
    if kw.get("identifiers", True):  # RFC 5280's key identifiers (Python 3.13's strict checks want them)
        extensions.append((x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False))
        extensions.append((x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False))
    names = kw.get("names")
    if names:
        extensions.append((x509.SubjectAlternativeName(names), False))  # type: ignore[arg-type]
        extensions.append((x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("avika test CA", ca_key, "avika test CA", ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    good = _cert(
        ORIGIN_NAME,
        key,
        "avika test CA",
        ca_key,
        names=[x509.DNSName(ORIGIN_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    wrong = _cert("elsewhere.test", key, "avika test CA", ca_key, names=[x509.DNSName("elsewhere.test")])
    sloppy = _cert(
        ORIGIN_NAME,
        key,
        "avika test CA",
        ca_key,
        names=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        identifiers=False,
    )
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(good.public_bytes(pem))
    (d / "wrong.pem").write_bytes(wrong.public_bytes(pem))
    (d / "sloppy.pem").write_bytes(sloppy.public_bytes(pem))
    (d / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (d / "certs").mkdir()
    (d / "certs" / "ca.pem").write_bytes(ca.public_bytes(pem))
    subprocess.run(["openssl", "rehash", str(d / "certs")], check=True, capture_output=True)
    return Pki(
        d / "ca.pem", d / "certs", d / "server.pem", d / "server.key", d / "wrong.pem", d / "sloppy.pem"
    )


def wrap_tls(server: socketserver.TCPServer, cert: Path, key: Path) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)


@contextlib.contextmanager
def tls_server(cert: Path, key: Path) -> Iterator[LocalServer]:
    server = LocalServer()
    wrap_tls(server._httpd, cert, key)
    with server:
        yield server


def https_url(server: LocalServer, path: str, host: str = "127.0.0.1") -> str:
    return f"https://{host}:{server.port}{path}"


@pytest.fixture
def trusted(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> Pki:
    """OpenSSL reads SSL_CERT_FILE when a default context is made: the test CA is trusted."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    return pki


# ---------------------------------------------------------------- TLS


def test_https_is_verified_against_ssl_cert_file(trusted: Pki) -> None:
    with tls_server(trusted.server_cert, trusted.server_key) as server:
        server.serve("/m.json", b'{"ok": 1}', etag='"t1"')
        fetcher = HttpFetcher()
        assert fetcher.get_manifest(https_url(server, "/m.json")) == (200, b'{"ok": 1}', '"t1"')
        fetcher.close()


def test_https_is_verified_against_ssl_cert_dir(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_dir / "none.pem"))  # nothing there
    monkeypatch.setenv("SSL_CERT_DIR", str(pki.ca_dir))
    with tls_server(pki.server_cert, pki.server_key) as server:
        server.serve("/m.json", b"{}")
        fetcher = HttpFetcher(client=Client(proxies={}))
        assert fetcher.get_manifest(https_url(server, "/m.json"))[0] == 200
        fetcher.close()


def test_an_unknown_ca_is_fetch_failed(pki: Pki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    other.write_bytes(
        _cert("another CA", key, "another CA", key, ca=True).public_bytes(serialization.Encoding.PEM)
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with tls_server(pki.server_cert, pki.server_key) as server:
        server.serve("/m.json", b"{}")
        with pytest.raises(FetchFailed, match="CERTIFICATE_VERIFY_FAILED") as raised:
            HttpFetcher(client=Client(proxies={})).get_manifest(https_url(server, "/m.json"))
    assert raised.value.code == "fetch_failed"
    assert server.requests == []  # no request was sent over an unverified connection


def test_a_certificate_for_another_name_is_fetch_failed(trusted: Pki) -> None:
    with tls_server(trusted.wrong_name_cert, trusted.server_key) as server:
        server.serve("/m.json", b"{}")
        with pytest.raises(FetchFailed, match=r"CERTIFICATE_VERIFY_FAILED"):
            HttpFetcher().get_manifest(https_url(server, "/m.json"))
    assert server.requests == []


def test_certificates_are_checked_as_strictly_on_every_python(trusted: Pki) -> None:
    # Python 3.13 refuses a certificate without an authority key identifier by default; the
    # agent does so on 3.9-3.12 too, so a fleet of mixed hosts agrees on what it trusts.
    with tls_server(trusted.sloppy_cert, trusted.server_key) as server:
        server.serve("/m.json", b"{}")
        with pytest.raises(FetchFailed, match="Authority Key Identifier"):
            HttpFetcher().get_manifest(https_url(server, "/m.json"))
    assert server.requests == []


def test_a_real_https_redirect_to_http_is_refused(trusted: Pki) -> None:
    with LocalServer() as plain, tls_server(trusted.server_cert, trusted.server_key) as secure:
        plain.serve("/m.json", b"{}")
        secure.serve("/m.json", status=302, location=plain.url("/m.json"))
        with pytest.raises(FetchFailed, match="https to http"):
            HttpFetcher().get_manifest(https_url(secure, "/m.json"))
    assert plain.requests == []


# ---------------------------------------------------------------- proxies


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]


@dataclass
class TinyProxy:
    """A forward proxy: CONNECT tunnels and absolute-form requests; every name is 127.0.0.1."""

    credentials: str | None = None  # "user:password" required, else 407
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                owner._handle(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> TinyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handle(self, client: socket.socket) -> None:
        client.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                return
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        self.seen.append(Seen(method, target, headers))
        if self.credentials:
            expected = "Basic " + base64.b64encode(self.credentials.encode()).decode()
            if headers.get("proxy-authorization") != expected:
                client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                return
        if method == "CONNECT":
            port = int(target.rsplit(":", 1)[1])
            upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self._pipe(client, upstream, rest)
            return
        url = target.split("://", 1)[1]
        hostport, _, path = url.partition("/")
        port = int(hostport.rsplit(":", 1)[1]) if ":" in hostport else 80
        upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
        forwarded = [f"{method} /{path} HTTP/1.1"]
        forwarded += [line for line in lines[1:] if not line.lower().startswith(("proxy-", "connection"))]
        forwarded.append("Connection: close")
        upstream.sendall("\r\n".join(forwarded).encode("latin-1") + b"\r\n\r\n")
        self._pipe(client, upstream, rest)

    @staticmethod
    def _pipe(client: socket.socket, upstream: socket.socket, pending: bytes) -> None:
        if pending:
            upstream.sendall(pending)

        def copy(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=copy, args=(upstream, client), daemon=True)
        back.start()
        copy(client, upstream)
        back.join(10)
        upstream.close()


def origin_url(server: LocalServer, path: str, scheme: str = "http") -> str:
    return f"{scheme}://{ORIGIN_NAME}:{server.port}{path}"


def test_http_goes_through_the_proxy_in_absolute_form(trusted: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    with LocalServer() as origin, TinyProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        origin.serve("/updates/manifest.json", b'{"via": "proxy"}')
        fetcher = HttpFetcher()
        url = origin_url(origin, "/updates/manifest.json")
        assert fetcher.get_manifest(url)[1] == b'{"via": "proxy"}'
        fetcher.close()
    [seen] = proxy.seen
    assert (seen.method, seen.target, seen.headers["host"]) == ("GET", url, f"{ORIGIN_NAME}:{origin.port}")
    assert origin.requests[0].headers["host"] == f"{ORIGIN_NAME}:{origin.port}"


def test_https_goes_through_a_connect_tunnel_with_proxy_credentials(
    trusted: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(300_000)
    with tls_server(trusted.server_cert, trusted.server_key) as origin, TinyProxy("agent:s3cr%t") as proxy:
        # The password's "%" is percent-encoded in the URL, as it must be.
        monkeypatch.setenv("HTTPS_PROXY", proxy.url.replace("//", "//agent:s3cr%25t@"))
        origin.serve("/updates/bin", data)
        fetcher = HttpFetcher()
        path = trusted.ca_dir.parent / "downloaded"
        with open(path, "wb") as fh:
            fetcher.download(origin_url(origin, "/updates/bin", "https"), fh, len(data), sha256(data))
        fetcher.close()
    assert path.read_bytes() == data
    [seen] = proxy.seen
    assert (seen.method, seen.target) == ("CONNECT", f"{ORIGIN_NAME}:{origin.port}")
    assert seen.headers["proxy-authorization"] == "Basic " + base64.b64encode(b"agent:s3cr%t").decode()


def test_the_report_token_crosses_a_proxy_only_inside_tls(
    trusted: Pki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "www").mkdir()
    server = make_server(tmp_path / "www", "127.0.0.1", 0, f"sqlite:///{tmp_path / 'r.db'}", SECRET)
    wrap_tls(server, trusted.server_cert, trusted.server_key)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    agent_id = "host-proxied-1"
    event = {
        "event_id": "6f1c0a4e-0000-4000-8000-000000000001", "agent_id": agent_id, "stream": "0" * 29,
        "seq": 1, "time": "2026-01-01T00:00:00Z", "state": "checking", "version": "1.0.0", "mode": "vm",
        "platform": "linux-amd64", "target_version": None, "manifest_serial": None,
    }  # fmt: skip
    try:
        with TinyProxy() as proxy:
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
            poster = Poster(make_token(SECRET, agent_id))
            answer = poster.post(f"https://{ORIGIN_NAME}:{server.server_address[1]}/v1/reports", [event])
            poster.close()
        assert answer.status == 202, answer
        assert [s.method for s in proxy.seen] == ["CONNECT"]
        assert all("authorization" not in s.headers for s in proxy.seen)
        assert [e["event_id"] for e in server.reports.store.agent_events(agent_id)] == [event["event_id"]]  # type: ignore[union-attr]
    finally:
        server.shutdown()
        server.server_close()
        server.reports.store.close()  # type: ignore[union-attr]


def test_loopback_never_goes_through_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    with LocalServer() as origin, TinyProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        origin.serve("/m.json", b"{}")
        assert HttpFetcher().get_manifest(origin.url("/m.json"))[0] == 200
    assert proxy.seen == [] and len(origin.requests) == 1


@pytest.mark.parametrize(
    ("scheme", "host", "proxies", "expected"),
    [
        ("https", "cdn.example.com", {"https": "http://p:3128"}, Proxy("p", 3128, None)),
        ("http", "cdn.example.com", {"https": "http://p:3128"}, None),
        ("http", "cdn.example.com", {"http": "p:8080"}, Proxy("p", 8080, None)),
        ("https", "cdn.example.com", {"all": "http://p"}, Proxy("p", 80, None)),
        ("https", "cdn.example.com", {"https": "http://p:3128", "no": "example.com"}, None),
        ("https", "cdn.example.com", {"https": "http://p:3128", "no": ".example.com"}, None),
        ("https", "cdn.example.org", {"https": "http://p:3128", "no": "example.com"}, Proxy("p", 3128, None)),
        ("https", "cdn.example.com", {"https": "http://p:3128", "no": "*"}, None),
        ("https", "127.0.0.1", {"https": "http://p:3128"}, None),
        ("https", "localhost", {"https": "http://p:3128"}, None),
        ("https", "::1", {"https": "http://p:3128"}, None),
        ("https", "cdn.example.com", {"https": "http://u:p%40ss@p:3128"}, Proxy("p", 3128, "Basic dTpwQHNz")),
    ],
    ids=[
        "https-proxy", "http-unproxied", "bare-host-port", "all-proxy", "no-proxy-domain", "no-proxy-dot",
        "no-proxy-other-domain", "no-proxy-star", "loopback-v4", "localhost", "loopback-v6", "credentials",
    ],
)  # fmt: skip
def test_which_requests_use_which_proxy(
    scheme: str, host: str, proxies: dict[str, str], expected: Proxy | None
) -> None:
    assert choose_proxy(scheme, host, 443, proxies) == expected


def test_an_https_proxy_url_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="only http:// proxies"):
        choose_proxy("https", "cdn.example.com", 443, {"https": "https://p:3128"})


# ---------------------------------------------------------------- keep-alive and framing


class CountingServer(LocalServer):
    """A LocalServer that counts the TCP connections it accepted."""

    def __init__(self) -> None:
        super().__init__()
        self.connections = 0
        accept = self._httpd.get_request

        def counted() -> tuple[socket.socket, object]:
            self.connections += 1
            return accept()

        self._httpd.get_request = counted  # type: ignore[method-assign]


def test_a_manifest_fetch_and_the_download_after_it_share_one_connection(tmp_path: Path) -> None:
    data = os.urandom(200_000)
    with CountingServer() as server:
        server.serve("/m.json", b"{}", etag='"e"')
        server.serve("/bin", data)
        fetcher = HttpFetcher(client=Client(proxies={}))
        fetcher.get_manifest(server.url("/m.json"))
        fetcher.get_manifest(server.url("/m.json"), '"e"')  # 304: no body, still reusable
        with open(tmp_path / "f", "wb") as fh:
            fetcher.download(server.url("/bin"), fh, len(data), sha256(data))
        fetcher.close()
    assert server.connections == 1 and server.count() == 3


def test_a_kept_connection_the_server_closed_is_replaced_transparently() -> None:
    answered: list[int] = []

    class OneAndGone(socketserver.BaseRequestHandler):
        """Answers one request as if the connection stayed open, then closes it (a CDN's idle timeout)."""

        def handle(self) -> None:
            if self.request.recv(65536):
                self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                answered.append(1)

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), OneAndGone) as server:
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/m.json"
        fetcher = HttpFetcher(client=Client(proxies={}))
        results = [fetcher.get_manifest(url) for _ in range(3)]
        fetcher.close()
        server.shutdown()
    assert results == [(200, b"{}", None)] * 3 and len(answered) == 3


def test_only_identity_is_asked_for_and_nothing_is_decoded() -> None:
    gzipped = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xab\xae\x05\x00C\xbf\xa6\xa3\x02\x00\x00\x00"
    with LocalServer() as server:
        server.serve("/m.json", gzipped, headers={"Content-Encoding": "gzip"})
        status, body, _ = HttpFetcher(client=Client(proxies={})).get_manifest(server.url("/m.json"))
    assert server.requests[0].headers["accept-encoding"] == "identity"
    assert (status, body) == (200, gzipped)  # the bytes as sent: verification judges them


def test_a_manifest_cut_short_of_its_length_is_fetch_failed_not_a_short_body() -> None:
    with LocalServer() as server:
        server.serve("/m.json", b'{"serial": 1}', drop_plan=[5])
        with pytest.raises(FetchFailed, match="short") as raised:
            HttpFetcher(client=Client(proxies={})).get_manifest(server.url("/m.json"))
    assert raised.value.retryable


def test_a_chunked_body_is_read_whole() -> None:
    body = json.dumps({"items": list(range(5000))}).encode()

    class Chunked(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(65536)
            out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            for i in range(0, len(body), 1000):
                piece = body[i : i + 1000]
                out += b"%x\r\n" % len(piece) + piece + b"\r\n"
            self.request.sendall(out + b"0\r\n\r\n")

    with socketserver.TCPServer(("127.0.0.1", 0), Chunked) as server:
        threading.Thread(target=server.handle_request, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/m.json"
        assert HttpFetcher(client=Client(proxies={})).get_manifest(url) == (200, body, None)


def test_the_user_agent_names_the_agent() -> None:
    with LocalServer() as server:
        server.serve("/m.json", b"{}")
        HttpFetcher(client=Client(proxies={}, user_agent="avika-agent/9.9.9")).get_manifest(
            server.url("/m.json")
        )
    assert server.requests[0].headers["user-agent"] == "avika-agent/9.9.9"
    assert transport.describe(OSError("x " * 400)).endswith("...")
