"""``avika-publish serve`` (publisher/serve.py): a store directory served like the CDN.

Rules: strong ETag (quoted sha256) and 304 on If-None-Match (lists, weak, ``*``); one byte
range gives 206 (``a-b``, ``a-``, ``-n``), an unsatisfiable one 416; Cache-Control and
Content-Type per the layout; nothing outside the root, no hidden files, no listings; HEAD has the
headers and no body; ``POST /v1/reports`` is the reports endpoint (404 without ``--reports``).
Most tests run the server in a thread (``make_server``); one runs the real process on port 0.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from infra.reports.auth import make_token
from infra.reports.store import ReportStore
from publisher import release as publishing
from publisher.serve import UpdateServer, make_server, parse_range
from publisher.signing import load_key_file
from publisher.stores import CHUNK, DirStore, HttpReader
from tests.publisher_fixtures import REPO, cli, make_binary, new_key_file, proc_env, sha256

SHA = "c" * 64
BINARY_KEY = f"binaries/0.1.44/{SHA}/avika-agent-linux-amd64"
SECRET = "a-fleet-secret-of-enough-length"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "manifests").mkdir(parents=True)
    (root / "manifest.json").write_bytes(b'{"payloadType": "x"}\n')
    (root / "manifests" / "1.json").write_bytes(b'{"archived": 1}\n')
    (root / "helm-values.yaml").write_bytes(b'image:\n  tag: "0.1.44"\n')
    make_binary(root / BINARY_KEY, 3 * CHUNK + 5, "big")
    (root / ".avika-publish.lock").write_bytes(b"")
    (tmp_path / "secret.txt").write_text("outside the root")
    return root


def _running(server: UpdateServer) -> Iterator[UpdateServer]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def server(root: Path) -> Iterator[UpdateServer]:
    yield from _running(make_server(root, port=0))


def raw(server: UpdateServer, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    """A request with the path sent exactly as written (requests would normalise ``..``)."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    "key, content_type, cache_control",
    [
        ("manifest.json", "application/json", "public, max-age=60"),
        ("helm-values.yaml", "application/yaml", "public, max-age=60"),
        ("manifests/1.json", "application/json", "public, max-age=31536000, immutable"),
        (BINARY_KEY, "application/octet-stream", "public, max-age=31536000, immutable"),
    ],
)
def test_files_are_served_with_a_strong_etag_and_layout_headers(
    server, root, key, content_type, cache_control
):
    response = requests.get(f"{server.url}/{key}", timeout=10)
    data = (root / key).read_bytes()
    assert response.status_code == 200 and response.content == data
    assert response.headers["ETag"] == f'"{sha256(data)}"'
    assert response.headers["Content-Type"] == content_type
    assert response.headers["Cache-Control"] == cache_control
    assert response.headers["Content-Length"] == str(len(data))


@pytest.mark.parametrize(
    "if_none_match, status",
    [("{etag}", 304), ('"other", {etag}', 304), ("W/{etag}", 304), ("*", 304), ('"other"', 200)],
)
def test_if_none_match_gives_304(server, root, if_none_match: str, status: int) -> None:
    etag = f'"{sha256((root / "manifest.json").read_bytes())}"'
    response = requests.get(
        f"{server.url}/manifest.json", headers={"If-None-Match": if_none_match.format(etag=etag)}, timeout=10
    )
    assert response.status_code == status
    assert response.headers["ETag"] == etag and response.headers["Cache-Control"] == "public, max-age=60"
    if status == 304:
        assert response.content == b""


def test_the_etag_follows_an_atomic_replace(server, root) -> None:
    first = requests.get(f"{server.url}/manifest.json", timeout=10).headers["ETag"]
    replacement = b'{"payloadType": "y"}\n'
    tmp = root / ".manifest.json.tmp"
    tmp.write_bytes(replacement)
    os.replace(tmp, root / "manifest.json")
    second = requests.get(f"{server.url}/manifest.json", headers={"If-None-Match": first}, timeout=10)
    assert second.status_code == 200 and second.headers["ETag"] == f'"{sha256(replacement)}"'
    assert second.content == replacement


@pytest.mark.parametrize(
    "header, start, end",
    [("bytes=0-9", 0, 9), ("bytes=10-", 10, None), ("bytes=-5", -5, None), ("bytes=100-99999999", 100, None),
     (f"bytes={3 * CHUNK}-", 3 * CHUNK, None)],
)  # fmt: skip
def test_a_single_range_gives_206(server, root, header: str, start: int, end: int | None) -> None:
    data = (root / BINARY_KEY).read_bytes()
    response = requests.get(f"{server.url}/{BINARY_KEY}", headers={"Range": header}, timeout=10)
    expected = data[start : (end + 1 if end is not None else None)]
    first = start if start >= 0 else len(data) + start
    assert response.status_code == 206 and response.content == expected
    assert response.headers["Content-Range"] == f"bytes {first}-{first + len(expected) - 1}/{len(data)}"
    assert response.headers["Content-Length"] == str(len(expected))


@pytest.mark.parametrize("header", ["bytes={size}-", "bytes={size}-{size}", "bytes=-0"])
def test_an_unsatisfiable_range_gives_416(server, root, header: str) -> None:
    size = (root / BINARY_KEY).stat().st_size
    response = requests.get(
        f"{server.url}/{BINARY_KEY}", headers={"Range": header.format(size=size)}, timeout=10
    )
    assert response.status_code == 416 and response.headers["Content-Range"] == f"bytes */{size}"


@pytest.mark.parametrize(
    "headers",
    [{"Range": "bytes=0-1,5-6"}, {"Range": "items=0-1"}, {"Range": "bytes=0-9", "If-Range": '"stale"'}],
)
def test_ranges_it_will_not_honour_get_the_whole_file(server, root, headers: dict) -> None:
    response = requests.get(f"{server.url}/manifest.json", headers=headers, timeout=10)
    assert response.status_code == 200 and response.content == (root / "manifest.json").read_bytes()


def test_head_has_the_headers_and_no_body(server, root) -> None:
    status, headers, body = raw(server, "HEAD", f"/{BINARY_KEY}")
    assert status == 200 and body == b""
    assert headers["Content-Length"] == str((root / BINARY_KEY).stat().st_size)
    assert headers["ETag"] == f'"{sha256((root / BINARY_KEY).read_bytes())}"'


@pytest.mark.parametrize(
    "path",
    ["/../secret.txt", "/binaries/../../secret.txt", "/%2e%2e/secret.txt", "/%2e%2e%2fsecret.txt",
     "/manifests/..%2f..%2fsecret.txt", "/.avika-publish.lock", "/", "/binaries", "/binaries/", "/missing",
     "/%00", "/%ff", "/link-out"],
)  # fmt: skip
def test_nothing_outside_the_root_no_hidden_files_no_listings(server, root, path: str) -> None:
    (root / "link-out").symlink_to(root.parent / "secret.txt")
    status, _, body = raw(server, "GET", path)
    assert status in (400, 404) and b"outside the root" not in body


def test_a_connection_survives_a_refused_post(server) -> None:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:
        conn.request(
            "POST", "/v1/reports", body=b'{"events": []}', headers={"Content-Type": "application/json"}
        )
        first = conn.getresponse()
        first.read()
        assert first.status == 404  # no --reports
        conn.close()
        conn.request("GET", "/manifest.json")
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_reports_are_accepted_and_stored_with_reports(root, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'reports.db'}"
    event = {
        "event_id": str(uuid.uuid4()), "agent_id": "host-01",
        "stream": f"{1771185600000:013x}0123456789abcdef", "seq": 1, "time": "2026-02-15T20:00:00Z",
        "state": "downloading", "version": "0.1.43", "mode": "vm",
        "platform": "linux-amd64", "target_version": "0.1.44", "manifest_serial": 2,
    }  # fmt: skip
    body = json.dumps({"events": [event]}).encode()
    good, forged = (make_token(secret, "host-01") for secret in (SECRET, "x" * 20))
    for server in _running(make_server(root, port=0, reports_url=url, fleet_secret=SECRET)):
        ok = requests.post(
            f"{server.url}/v1/reports", data=body, timeout=10, headers={"Authorization": f"Bearer {good}"}
        )
        refused = requests.post(
            f"{server.url}/v1/reports", data=body, timeout=10, headers={"Authorization": f"Bearer {forged}"}
        )
        wrong_method = requests.get(f"{server.url}/v1/reports", timeout=10)
        assert (ok.status_code, refused.status_code, wrong_method.status_code) == (202, 401, 405)
        assert ok.json() == {"accepted": 1, "duplicates": 0}
    store = ReportStore.from_url(url)
    try:
        assert store.agent("host-01")["state"] == "downloading"
    finally:
        store.close()


def test_serving_reports_needs_the_fleet_secret(root, tmp_path) -> None:
    result = cli("serve", "--root", str(root), "--port", "0", "--reports", f"sqlite:///{tmp_path / 'r.db'}")
    assert result.exit_code == 2 and "AVIKA_FLEET_SECRET" in result.stderr


def test_verify_and_show_over_http_audit_what_is_served(tmp_path) -> None:
    key = new_key_file(tmp_path)
    make_binary(tmp_path / "amd64", 2 * CHUNK + 1, "amd64")
    store = DirStore(tmp_path / "store")
    spec = publishing.ReleaseSpec("0.1.44", {"linux-amd64": tmp_path / "amd64"}, init=True)
    publishing.release(store, [load_key_file(key.path)], spec)
    for server in _running(make_server(store.root, port=0)):
        reader = HttpReader(server.url)
        assert publishing.verify(reader, [key.public]).exit_code == 0
        shown = cli("show", "--url", f"{server.url}/manifest.json", "--json")
        assert shown.exit_code == 0 and json.loads(shown.stdout)["version"] == "0.1.44"

        binary = store.path(publishing.show(reader).binaries["linux-amd64"].url)
        binary.write_bytes(b"\0" + binary.read_bytes()[1:])
        result = cli("verify", "--public-key", key.public.b64, "--url", server.url)
        assert result.exit_code == 3 and "checksum_mismatch" in result.stderr
        binary.unlink()
        assert [b.error for b in publishing.verify(reader, [key.public]).binaries] == ["binary_missing"]


# ---------------------------------------------------------------- hostile requests


@pytest.fixture
def reports_server(root: Path, tmp_path: Path) -> Iterator[UpdateServer]:
    url = f"sqlite:///{tmp_path / 'reports.db'}"
    yield from _running(make_server(root, port=0, reports_url=url, fleet_secret=SECRET))


def head_of_answer(sock: socket.socket) -> bytes:
    """Everything up to the end of the first response's headers (or what came before EOF)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def send_raw(server: UpdateServer, data: bytes, *, keep_open: bool = True) -> tuple[int | None, bytes]:
    """Send bytes as they are; read the answer WITHOUT closing our side (unless told), so a server
    that waits for more body bytes or for EOF shows up as a timeout, not as an answer."""
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(data)
        if not keep_open:
            sock.shutdown(socket.SHUT_WR)
        head = head_of_answer(sock)
    status = int(head[9:12]) if head.startswith(b"HTTP/1.") and head[9:12].isdigit() else None
    return status, head


@pytest.mark.parametrize(
    "value", ["-1", "+5", "5_0", "0x10", "1e3", "", "5 5", "\u0661\u0662".encode().decode("latin-1"), "4,4"]
)
def test_a_content_length_that_is_not_ascii_digits_is_400_before_any_body_is_read(
    reports_server: UpdateServer, value: str
) -> None:
    """``Content-Length: -1`` used to read the body until EOF, before authentication."""
    request = (
        f"POST /v1/reports HTTP/1.1\r\nHost: x\r\nContent-Length: {value}\r\n\r\n".encode("latin-1")
        + b"x" * 100  # the client keeps the connection open and would go on sending
    )
    status, head = send_raw(reports_server, request)
    assert status == 400, head
    assert b"Connection: close" in head


def test_two_different_content_lengths_are_400(reports_server: UpdateServer) -> None:
    request = b"POST /v1/reports HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd"
    assert send_raw(reports_server, request)[0] == 400


@pytest.mark.parametrize("value", ["300000", "9" * 5000], ids=["300000", "5000-digits"])
def test_a_content_length_over_the_limit_is_413_without_reading(
    reports_server: UpdateServer, value: str
) -> None:
    request = f"POST /v1/reports HTTP/1.1\r\nHost: x\r\nContent-Length: {value}\r\n\r\n".encode() + b"{"
    status, head = send_raw(reports_server, request)
    assert status == 413 and b"Connection: close" in head


def test_a_refused_body_can_be_sent_whole_and_its_answer_read(reports_server: UpdateServer) -> None:
    """An agent splits a batch on 413, so it must see the 413. The server answers without reading
    the body; a socket closed with unread input is reset, and a client that sends its whole body
    before reading (http.client, urllib) then fails with a broken pipe and never reads the status.
    So the server drains (and discards) a bounded amount before it closes. 8 MiB: more than
    loopback's socket buffers absorb, less than the drain budget."""
    size = 8 << 20
    request = b"POST /v1/reports HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size + b"{" * size
    for _ in range(5):
        with socket.create_connection(reports_server.server_address[:2], timeout=10) as sock:
            sock.sendall(request)  # BrokenPipeError here when the server closed without draining
            head = head_of_answer(sock)
        assert head.startswith(b"HTTP/1.1 413"), head


@pytest.mark.parametrize(
    "headers", ["", "Transfer-Encoding: chunked\r\n", "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"]
)
def test_a_body_without_a_length_is_411(reports_server: UpdateServer, headers: str) -> None:
    request = f"POST /v1/reports HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode() + b"5\r\n{}\r\n"
    status, head = send_raw(reports_server, request)
    assert status == 411 and b"Connection: close" in head


def test_a_get_with_a_body_closes_the_connection_after_the_answer(server: UpdateServer) -> None:
    request = b"GET /manifest.json HTTP/1.1\r\nHost: x\r\nContent-Length: 15\r\n\r\nGET / HTTP/1.1\r\n"
    status, head = send_raw(server, request)
    assert status == 200 and b"Connection: close" in head


@pytest.mark.parametrize(
    "header",
    ["bytes=" + "9" * 5000 + "-", "bytes=0-" + "9" * 5000, "bytes=-" + "9" * 5000, "bytes=" + "1" * 20 + "-"],
    ids=["5000-digit-start", "5000-digit-end", "5000-digit-suffix", "20-digit-start"],
)
def test_an_absurd_range_is_ignored_and_the_connection_survives(
    server: UpdateServer, root: Path, header: str
) -> None:
    """A 5,000-digit Range killed the handler with a traceback (int() refuses that many digits)."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:
        conn.request("GET", "/helm-values.yaml", headers={"Range": header})
        first = conn.getresponse()
        assert (first.status, first.read()) == (200, (root / "helm-values.yaml").read_bytes())
        conn.request("GET", "/manifest.json")  # the same connection: nothing was dropped
        assert conn.getresponse().status == 200
    finally:
        conn.close()


@pytest.mark.parametrize(
    "request_line, status",
    [
        (b" \t \r\n", 400),  # whitespace only: the base class answered nothing
        (b"GET http://[::1/x HTTP/1.1\r\n", 400),  # urlsplit raises on this authority
        (b"GET /manifest.json\r\n", 200),  # two words (HTTP/0.9): answered with a status line
        (b"\r\nGET /manifest.json HTTP/1.1\r\n", 200),  # one empty line before a request is skipped
        (b"GET /manifest.json HTTP/2.0\r\n", 505),
        (b"G\x00T / HTTP/1.1\r\n", 501),
    ],
)
def test_odd_request_lines_get_an_http_answer(server: UpdateServer, request_line: bytes, status: int) -> None:
    got, head = send_raw(server, request_line + b"Host: x\r\n\r\n", keep_open=False)
    assert got == status, head


def test_range_parser_table() -> None:
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=-20", 10) == (0, 9)
    assert parse_range("bytes=5-2", 10) is None
    assert parse_range("bytes=-", 10) is None
    assert parse_range("bytes=0-", 0) == "unsatisfiable"
    assert parse_range("bytes=" + "9" * 20 + "-", 10) is None  # 20 digits: beyond any file, ignored
    assert parse_range("bytes=\u0661-", 10) is None  # digits are ASCII digits


def test_the_real_server_starts_on_port_0_serves_and_stops_on_sigterm(root) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "publisher.cli", "serve", "--root", str(root), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=proc_env(), cwd=REPO,
    )  # fmt: skip
    try:
        first = process.stdout.readline().split()
        assert first[:3] == ["serving", str(root.resolve()), "on"]
        url = first[3]
        response = requests.get(f"{url}/manifest.json", timeout=10)
        assert response.status_code == 200 and response.headers["Cache-Control"] == "public, max-age=60"
        assert requests.head(f"{url}/{BINARY_KEY}", timeout=10).headers["Content-Length"] == str(
            3 * CHUNK + 5
        )
    finally:
        process.send_signal(signal.SIGTERM)
        rc = process.wait(timeout=10)
        err = process.stderr.read()
    assert rc == 0
    assert '"GET /manifest.json HTTP/1.1" 200' in err and "Traceback" not in err
