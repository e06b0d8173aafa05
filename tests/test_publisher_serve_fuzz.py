"""``avika-publish serve`` under hostile requests: one real server process on 127.0.0.1, fuzzed.

What holds, whatever the request line, headers and body (hypothesis makes them; a fixed number of
examples keeps ``make test`` bounded):
- every request gets an HTTP answer (a status line), never a dropped connection;
- the server stays up and never logs a traceback;
- its memory (VmRSS from /proc) stays within ``RSS_BOUND`` of what it used after warming up:
  a declared length is never a licence to read until EOF (``Content-Length: -1`` used to make
  the reports route read whatever the client sent, before authentication: 300 MiB measured).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.publisher_fixtures import REPO, make_binary, proc_env

SECRET = "a-fleet-secret-of-enough-length"
EXAMPLES = int(os.environ.get("AVIKA_FUZZ_EXAMPLES", "400"))  # a longer run by hand: 20000
RSS_BOUND = 48 << 20  # generous (allocator noise, thread stacks) but far below one streamed body
STREAMED = 64 << 20  # what the -1 test pushes at the server


class Served:
    def __init__(self, process: subprocess.Popen[str], host: str, port: int, log: Path) -> None:
        self.process, self.host, self.port, self.log = process, host, port, log
        self.warm_rss = 0  # VmRSS after warming up: what the bound is measured from

    def rss(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc/<pid>/status")

    def exchange(self, data: bytes, *, half_close: bool = True, timeout: float = 20) -> bytes:
        """Send ``data``; the bytes of the first answer's status line (b"" if none came)."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(data)
                if half_close:  # no more bytes come: a server waiting for a body sees EOF
                    sock.shutdown(socket.SHUT_WR)
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                while b"\r\n" not in answer:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
        return answer.split(b"\r\n", 1)[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("serve-fuzz")
    root = tmp / "store"
    (root / "manifests").mkdir(parents=True)
    (root / "manifest.json").write_bytes(b'{"payloadType": "x"}\n')
    (root / "manifests" / "1.json").write_bytes(b"{}\n")
    make_binary(root / "binaries" / "0.1.44" / ("c" * 64) / "avika-agent-linux-amd64", 300_000, "fuzz")
    log = tmp / "serve.log"
    with open(log, "w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "publisher.cli", "serve", "--root", str(root), "--port", "0",
             "--reports", f"sqlite:///{tmp / 'reports.db'}"],
            stdout=subprocess.PIPE, stderr=err, text=True, env=proc_env(AVIKA_FLEET_SECRET=SECRET), cwd=REPO,
        )  # fmt: skip
    try:
        assert process.stdout is not None
        url = process.stdout.readline().split()[-1]  # "serving <root> on http://127.0.0.1:<port>"
        host, port = url.removeprefix("http://").rsplit(":", 1)
        server = Served(process, host, int(port), log)
        for _ in range(20):  # warm up: threads, imports, the ETag cache, the reports route
            assert server.exchange(b"GET /manifest.json HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
                b"HTTP/1.1 200"
            )
            assert server.exchange(b"POST /v1/reports HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}").startswith(
                b"HTTP/1.1 401"
            )
        server.warm_rss = server.rss()
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---------------------------------------------------------------- strategies

_NO_NEWLINE = st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n")
methods = st.one_of(
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT", "get"]),
    st.text(_NO_NEWLINE, min_size=1, max_size=12),
)
targets = st.one_of(
    st.sampled_from([
        "/manifest.json", "/v1/reports", "/", "*", "/manifests/1.json", "/binaries/", "/.avika-publish.lock",
        f"/binaries/0.1.44/{'c' * 64}/avika-agent-linux-amd64", "http://[::1/x", "//[::1/x", "//evil/",
        "http://127.0.0.1/manifest.json", "/%ff%fe", "/..%2f..%2fetc%2fpasswd", "/%00", "/" + "a" * 70_000,
    ]),
    st.text(_NO_NEWLINE, max_size=300).map(lambda t: "/" + t),
)  # fmt: skip
versions = st.sampled_from(
    [
        "HTTP/1.1",
        "HTTP/1.0",
        "HTTP/0.9",
        "HTTP/2.0",
        "HTTP/1.1.1",
        "http/1.1",
        "HTTP/9",
        "",
        "HTTP/1.a",
        "HTTP/",
    ]
)
digits = st.integers(min_value=1, max_value=6000).map(lambda n: "9" * n)
numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    digits,
    st.sampled_from(["-1", "+5", "5_0", "0x10"]),
)
header_names = st.one_of(
    st.sampled_from([
        "Content-Length", "Range", "If-None-Match", "If-Range", "Transfer-Encoding", "Authorization",
        "Connection", "Expect", "Host", "Content-Type", "content-length",
    ]),
    st.text(_NO_NEWLINE, min_size=1, max_size=40),
)  # fmt: skip
header_values = st.one_of(
    numbers,
    st.builds(
        lambda a, b: f"bytes={a}-{b}", st.one_of(st.just(""), numbers), st.one_of(st.just(""), numbers)
    ),
    st.sampled_from(
        ["chunked", "gzip, chunked", "100-continue", "close", "keep-alive", "Bearer x", "*", 'W/"x"']
    ),
    st.text(_NO_NEWLINE, max_size=200),
)
headers = st.lists(st.tuples(header_names, header_values), max_size=12)
bodies = st.binary(max_size=3000)


def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


@st.composite
def requests_(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:  # now and then: raw bytes as the request line
        line = draw(st.binary(min_size=1, max_size=200).filter(lambda b: b.strip(b"\r\n") != b""))
    else:
        sep = draw(st.sampled_from([" ", "  ", "\t"]))
        words = [draw(methods), draw(targets), draw(versions)]
        line = encode(sep.join(w for w in words if w))
    if not line.strip():
        line = b"GET"  # a request line with nothing in it is no request: not what this fuzzes
    head = b"".join(encode(f"{name}: {value}\r\n") for name, value in draw(headers))
    return line + b"\r\n" + head + b"\r\n" + draw(bodies)


# ---------------------------------------------------------------- the properties


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests_())
def test_every_request_gets_an_http_answer(served: Served, request: bytes) -> None:
    status_line = served.exchange(request)
    assert status_line.startswith(b"HTTP/1.") and status_line[9:12].isdigit(), (request[:300], status_line)
    assert served.process.poll() is None


def test_after_the_fuzzing_the_server_is_up_quiet_and_within_its_memory_bound(served: Served) -> None:
    """Runs after the property above (file order): the same process."""
    assert served.exchange(b"GET /manifest.json HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200")
    log = served.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    grown = served.rss() - served.warm_rss
    assert grown < RSS_BOUND, f"serve grew by {grown >> 20} MiB over {EXAMPLES} hostile requests"


def test_a_negative_content_length_is_answered_at_once_and_read_no_further(served: Served) -> None:
    """The client declares -1 and keeps sending: the answer (400) comes before the client stops,
    and the server's memory does not follow what the client pushes."""
    before = served.rss()
    answer = bytearray()

    def read(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while b"\r\n" not in answer:
                part = sock.recv(4096)
                if not part:
                    return
                answer.extend(part)

    with socket.create_connection((served.host, served.port), timeout=20) as sock:
        sock.sendall(b"POST /v1/reports HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
        reader = threading.Thread(target=read, args=(sock,), daemon=True)
        reader.start()
        sent, chunk = 0, b"x" * (1 << 20)
        with contextlib.suppress(OSError):  # fails once the server has answered and closed
            while sent < STREAMED and reader.is_alive():
                sock.sendall(chunk)
                sent += len(chunk)
        reader.join(timeout=20)  # the old server answered only after EOF, which never came
    assert bytes(answer).startswith(b"HTTP/1.1 400"), bytes(answer[:200])
    assert served.rss() - before < RSS_BOUND, f"RSS grew by {(served.rss() - before) >> 20} MiB"
    assert served.process.poll() is None


def test_rss_stays_within_the_bound_over_many_hostile_requests(served: Served) -> None:
    before = served.rss()
    hostile = [
        (b"POST /v1/reports HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n{", b"413"),
        (b"GET /manifest.json HTTP/1.1\r\nRange: bytes=" + b"9" * 5000 + b"-\r\n\r\n", b"200"),  # ignored
        (b"POST /v1/reports HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 100_000, b"411"),
        (b"POST /v1/reports HTTP/1.1\r\nContent-Length: 262144\r\n\r\n" + b"{" * 262_144, b"401"),
    ]
    for _ in range(25):
        for request, status in hostile:
            assert served.exchange(request).startswith(b"HTTP/1.1 " + status)
    grown = served.rss() - before
    assert grown < RSS_BOUND, f"RSS grew by {grown >> 20} MiB over {25 * len(hostile)} hostile requests"
