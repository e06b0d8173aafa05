"""agent/fetch.py against a real HTTP server on 127.0.0.1 (DESIGN sections 2, 4, 7).

Manifest GET: ETag / 304, the 1 MiB cap (refused without reading the whole body), redirects
(at most 3, never https -> http), every other status and connection errors are fetch_failed.
Download: capped at size, hashed while streaming, resumed with Range after a dropped connection,
restarted from 0 when the server ignores Range.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from agent import fetch, manifest
from agent.fetch import (
    ChecksumMismatch,
    DownloadError,
    Fetcher,
    FetchFailed,
    HttpFetcher,
    Response,
    SizeExceeded,
    SizeMismatch,
    Truncated,
    check_redirect,
)
from agent.transport import Budget
from tests.agent_fixtures import LocalServer, sha256

BINARY = os.urandom(700_000)  # several 64 KiB chunks


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer() as srv:
        yield srv


@pytest.fixture
def fetcher() -> Iterator[HttpFetcher]:
    f = HttpFetcher(chunk_size=64 * 1024, retry_delay=0, read_timeout=5)
    yield f
    f.close()


def download(
    fetcher: Fetcher, url: str, path: Path, data: bytes = BINARY, **kw: object
) -> fetch.DownloadResult:
    with open(path, "wb") as fh:
        return fetcher.download(url, fh, len(data), sha256(data), **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- manifest


def test_manifest_200_returns_body_and_etag(server: LocalServer, fetcher: HttpFetcher) -> None:
    server.serve("/m.json", b'{"x": 1}', etag='"abc"')
    assert fetcher.get_manifest(server.url("/m.json"), None) == (200, b'{"x": 1}', '"abc"')
    assert "if-none-match" not in server.requests[0].headers


def test_manifest_matching_etag_gets_304(server: LocalServer, fetcher: HttpFetcher) -> None:
    server.serve("/m.json", b"{}", etag='"abc"')
    assert fetcher.get_manifest(server.url("/m.json"), '"abc"') == (304, b"", '"abc"')
    assert server.requests[0].headers["if-none-match"] == '"abc"'


def test_manifest_stale_etag_gets_new_body(server: LocalServer, fetcher: HttpFetcher) -> None:
    server.serve("/m.json", b"{}", etag='"new"')
    assert fetcher.get_manifest(server.url("/m.json"), '"old"') == (200, b"{}", '"new"')


def test_manifest_without_etag_header(server: LocalServer, fetcher: HttpFetcher) -> None:
    server.serve("/m.json", b"{}")
    assert fetcher.get_manifest(server.url("/m.json")) == (200, b"{}", None)


def test_304_to_an_unconditional_request_is_fetch_failed(server: LocalServer, fetcher: HttpFetcher) -> None:
    server.serve("/m.json", b"", status=304)
    with pytest.raises(FetchFailed, match="304"):
        fetcher.get_manifest(server.url("/m.json"), None)


def test_manifest_at_the_cap_is_accepted(server: LocalServer, fetcher: HttpFetcher) -> None:
    body = b"x" * manifest.MAX_ENVELOPE_BYTES
    server.serve("/m.json", body)
    assert fetcher.get_manifest(server.url("/m.json"))[1] == body


def test_manifest_over_the_cap_is_too_large(server: LocalServer, fetcher: HttpFetcher) -> None:
    server.serve("/m.json", b"x" * (manifest.MAX_ENVELOPE_BYTES + 1))
    with pytest.raises(manifest.TooLarge) as err:
        fetcher.get_manifest(server.url("/m.json"))
    assert err.value.code == "too_large"


def test_endless_manifest_is_refused_without_reading_it_all(
    server: LocalServer, fetcher: HttpFetcher
) -> None:
    # No Content-Length and a body that never ends: only the streamed cap can stop it.
    server.serve("/m.json", endless=True)
    with pytest.raises(manifest.TooLarge):
        fetcher.get_manifest(server.url("/m.json"))
    # The server got at most the cap, a chunk and the sockets' buffers out before we hung up.
    assert server.endless_sent < 32 * manifest.MAX_ENVELOPE_BYTES


def test_announced_oversize_manifest_is_refused_before_reading(
    server: LocalServer, fetcher: HttpFetcher
) -> None:
    server.serve("/m.json", b"{}", declared_length=manifest.MAX_ENVELOPE_BYTES + 1)
    with pytest.raises(manifest.TooLarge, match="announces"):
        fetcher.get_manifest(server.url("/m.json"))


@pytest.mark.parametrize("status", [404, 403, 500, 502, 503])
def test_other_statuses_are_fetch_failed_naming_the_status(
    server: LocalServer, fetcher: HttpFetcher, status: int
) -> None:
    server.serve("/m.json", b"nope", status=status)
    with pytest.raises(FetchFailed, match=f"HTTP {status}") as err:
        fetcher.get_manifest(server.url("/m.json"))
    assert err.value.code == "fetch_failed"
    assert err.value.status == status


def test_connection_refused_is_fetch_failed(fetcher: HttpFetcher) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchFailed) as err:
        fetcher.get_manifest(f"http://127.0.0.1:{port}/m.json")
    assert err.value.retryable


def test_read_timeout_is_fetch_failed(server: LocalServer) -> None:
    server.serve("/m.json", b"{}", delay=2)
    slow = HttpFetcher(read_timeout=0.3)
    with pytest.raises(FetchFailed, match="timed out"):
        slow.get_manifest(server.url("/m.json"))


# ---------------------------------------------------------------- redirects


def test_three_redirects_are_followed(server: LocalServer, fetcher: HttpFetcher) -> None:
    server.serve("/a", status=302, location="/b")
    server.serve("/b", status=301, location=server.url("/c"))
    server.serve("/c", status=307, location="d")
    server.serve("/d", b"{}", etag='"e"')
    assert fetcher.get_manifest(server.url("/a")) == (200, b"{}", '"e"')
    assert [r.path for r in server.requests] == ["/a", "/b", "/c", "/d"]


def test_a_fourth_redirect_is_fetch_failed(server: LocalServer, fetcher: HttpFetcher) -> None:
    for name, nxt in zip("abcd", "bcde"):
        server.serve(f"/{name}", status=302, location=f"/{nxt}")
    server.serve("/e", b"{}")
    with pytest.raises(FetchFailed, match="more than 3 redirects"):
        fetcher.get_manifest(server.url("/a"))
    assert server.count("/e") == 0


def test_redirect_loop_stops(server: LocalServer, fetcher: HttpFetcher) -> None:
    server.serve("/loop", status=302, location="/loop")
    with pytest.raises(FetchFailed, match="redirects"):
        fetcher.get_manifest(server.url("/loop"))
    assert server.count("/loop") == 4


def test_redirect_without_location_is_fetch_failed(server: LocalServer, fetcher: HttpFetcher) -> None:
    server.serve("/a", status=302)
    with pytest.raises(FetchFailed, match="without a Location"):
        fetcher.get_manifest(server.url("/a"))


@pytest.mark.parametrize(
    ("source", "location", "expected"),
    [
        ("http://a/x/m.json", "/y", "http://a/y"),
        ("http://a/x/m.json", "n.json", "http://a/x/n.json"),
        ("http://a/m.json", "https://cdn/m.json", "https://cdn/m.json"),
        ("https://a/m.json", "https://cdn/m.json", "https://cdn/m.json"),
        ("https://a/x/m.json", "/y", "https://a/y"),
        ("https://a/m.json", "//cdn/m.json", "https://cdn/m.json"),
    ],
    ids=["absolute-path", "relative", "upgrade", "https-to-https", "https-relative", "scheme-relative"],
)
def test_redirect_policy_allows(source: str, location: str, expected: str) -> None:
    assert check_redirect(source, location) == expected


@pytest.mark.parametrize(
    ("source", "location"),
    [
        ("https://a/m.json", "http://a/m.json"),
        ("HTTPS://a/m.json", "HTTP://evil/m.json"),
        ("http://a/m.json", "file:///etc/passwd"),
        ("https://a/m.json", "ftp://a/m.json"),
    ],
    ids=["https-to-http", "https-to-http-uppercase", "file", "ftp"],
)
def test_redirect_policy_refuses(source: str, location: str) -> None:
    with pytest.raises(FetchFailed, match="refusing redirect"):
        check_redirect(source, location)


class Simulator(Fetcher):
    """A transport from a table: what the base class does with it is what is under test."""

    def __init__(self, answers: Mapping[str, Response], **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.answers = answers
        self.fetched: list[str] = []

    def _fetch(self, url: str, headers: Mapping[str, str], budget: Budget) -> Response:
        self.fetched.append(url)
        return self.answers[url]


def test_https_to_http_redirect_is_refused_through_the_fetcher() -> None:
    # http.server cannot speak TLS: the https hop is simulated, the policy is the base class's.
    sim = Simulator(
        {
            "https://cdn.example/u/manifest.json": Response(302, {"Location": "https://cdn2.example/m"}, []),
            "https://cdn2.example/m": Response(301, {"location": "http://cdn2.example/m"}, []),
            "http://cdn2.example/m": Response(200, {}, [b"{}"]),
        }
    )
    with pytest.raises(FetchFailed, match="https to http"):
        sim.get_manifest("https://cdn.example/u/manifest.json")
    assert sim.fetched == ["https://cdn.example/u/manifest.json", "https://cdn2.example/m"]


# ---------------------------------------------------------------- download


def test_download_writes_and_verifies(server: LocalServer, fetcher: HttpFetcher, tmp_path: Path) -> None:
    server.serve("/bin", BINARY)
    result = download(fetcher, server.url("/bin"), tmp_path / "staged")
    assert (tmp_path / "staged").read_bytes() == BINARY
    assert (result.size, result.sha256, result.attempts) == (len(BINARY), sha256(BINARY), 1)
    assert server.requests[0].headers["accept-encoding"] == "identity"
    assert "range" not in server.requests[0].headers


def test_download_to_a_file_descriptor(server: LocalServer, fetcher: HttpFetcher, tmp_path: Path) -> None:
    server.serve("/bin", BINARY)
    fd = os.open(tmp_path / "staged", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fetcher.download(server.url("/bin"), fd, len(BINARY), sha256(BINARY))
    finally:
        os.close(fd)
    assert (tmp_path / "staged").read_bytes() == BINARY


def test_corrupt_binary_is_checksum_mismatch(
    server: LocalServer, fetcher: HttpFetcher, tmp_path: Path
) -> None:
    corrupt = bytearray(BINARY)
    corrupt[1234] ^= 0xFF
    server.serve("/bin", bytes(corrupt))
    with pytest.raises(ChecksumMismatch) as err:
        download(fetcher, server.url("/bin"), tmp_path / "staged")
    assert err.value.code == "checksum_mismatch"


def test_announced_longer_binary_is_size_exceeded(
    server: LocalServer, fetcher: HttpFetcher, tmp_path: Path
) -> None:
    server.serve("/bin", BINARY + b"extra")
    with pytest.raises(SizeExceeded) as err:
        download(fetcher, server.url("/bin"), tmp_path / "staged")
    assert err.value.code == "size_exceeded"
    assert (tmp_path / "staged").stat().st_size == 0  # refused on the header, nothing written


def test_streamed_longer_binary_is_size_exceeded_at_the_cap(
    server: LocalServer, fetcher: HttpFetcher, tmp_path: Path
) -> None:
    # No Content-Length: the stream itself must be cut at `size`, never written past it.
    server.serve("/bin", endless=True)
    with pytest.raises(SizeExceeded):
        download(fetcher, server.url("/bin"), tmp_path / "staged")
    assert (tmp_path / "staged").stat().st_size <= len(BINARY)
    assert server.endless_sent < 64 * len(BINARY)


def test_announced_shorter_binary_is_size_mismatch(
    server: LocalServer, fetcher: HttpFetcher, tmp_path: Path
) -> None:
    server.serve("/bin", BINARY[:-1])
    with pytest.raises(SizeMismatch) as err:
        download(fetcher, server.url("/bin"), tmp_path / "staged")
    assert err.value.code == "size_mismatch"


def test_dropped_connection_resumes_with_range(
    server: LocalServer, fetcher: HttpFetcher, tmp_path: Path
) -> None:
    # The first response announces every byte but the connection dies after 200 000 of them.
    server.serve("/bin", BINARY, drop_plan=[200_000, 150_000])
    result = download(fetcher, server.url("/bin"), tmp_path / "staged")
    assert (tmp_path / "staged").read_bytes() == BINARY
    assert result.attempts == 3
    # Bytes of the chunk that broke are lost with it: each resume starts at what was written.
    starts = [int(r.headers["range"][6:-1]) for r in server.requests[1:]]
    assert "range" not in server.requests[0].headers
    assert 0 < starts[0] <= 200_000 < starts[1] <= starts[0] + 150_000


def test_server_ignoring_range_restarts_from_zero(
    server: LocalServer, fetcher: HttpFetcher, tmp_path: Path
) -> None:
    server.serve("/bin", BINARY, ranges=False, drop_plan=[300_000])
    result = download(fetcher, server.url("/bin"), tmp_path / "staged")
    assert (tmp_path / "staged").read_bytes() == BINARY  # not a 300 000-byte prefix twice
    assert result.attempts == 2
    assert server.requests[1].headers["range"].startswith("bytes=")


def test_resume_from_a_partial_file(server: LocalServer, fetcher: HttpFetcher, tmp_path: Path) -> None:
    staged = tmp_path / "staged"
    staged.write_bytes(BINARY[:123_456])
    server.serve("/bin", BINARY)
    with open(staged, "r+b") as fh:
        fetcher.download(server.url("/bin"), fh, len(BINARY), sha256(BINARY), resume_from=123_456)
    assert staged.read_bytes() == BINARY
    assert server.requests[0].headers["range"] == "bytes=123456-"


def test_stale_bytes_past_size_are_cut(server: LocalServer, fetcher: HttpFetcher, tmp_path: Path) -> None:
    staged = tmp_path / "staged"
    staged.write_bytes(b"\xff" * (len(BINARY) + 999))
    server.serve("/bin", BINARY)
    with open(staged, "r+b") as fh:
        fetcher.download(server.url("/bin"), fh, len(BINARY), sha256(BINARY))
    assert staged.read_bytes() == BINARY


def test_connection_that_keeps_dropping_is_truncated(
    server: LocalServer, fetcher: HttpFetcher, tmp_path: Path
) -> None:
    # 100 000 bytes arrive, then every resume dies before its first byte.
    server.serve("/bin", BINARY, drop_plan=[100_000, 0, 0, 0, 0, 0])
    with pytest.raises(Truncated) as err:
        download(fetcher, server.url("/bin"), tmp_path / "staged")
    assert err.value.code == "truncated"
    assert server.count("/bin") == 1 + fetcher.retries + 1


def test_server_down_is_fetch_failed_after_retries(fetcher: HttpFetcher, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchFailed):
        download(fetcher, f"http://127.0.0.1:{port}/bin", tmp_path / "staged")


def test_404_is_not_retried(server: LocalServer, fetcher: HttpFetcher, tmp_path: Path) -> None:
    with pytest.raises(FetchFailed, match="HTTP 404"):
        download(fetcher, server.url("/missing"), tmp_path / "staged")
    assert server.count() == 1


def test_503_is_retried(server: LocalServer, fetcher: HttpFetcher, tmp_path: Path) -> None:
    server.serve("/bin", b"busy", status=503)
    with pytest.raises(FetchFailed, match="HTTP 503"):
        download(fetcher, server.url("/bin"), tmp_path / "staged")
    assert server.count() == fetcher.retries + 1


def test_shorter_file_behind_range_is_size_mismatch(
    server: LocalServer, fetcher: HttpFetcher, tmp_path: Path
) -> None:
    # The manifest promises more bytes than the file has; the resume hits the end: 416.
    expected = BINARY + b"more"
    server.serve("/bin", BINARY, declared_length=len(expected), drop_plan=[len(BINARY)])
    with pytest.raises(SizeMismatch):
        download(fetcher, server.url("/bin"), tmp_path / "staged", expected)


def test_206_with_the_wrong_start_is_refused(tmp_path: Path) -> None:
    data = b"0123456789"
    sim = Simulator({"http://h/bin": Response(206, {"Content-Range": "bytes 0-9/10"}, [data])}, retry_delay=0)
    staged = tmp_path / "staged"
    staged.write_bytes(data[:4])
    with open(staged, "r+b") as fh, pytest.raises(FetchFailed, match="asked for byte 4"):
        sim.download("http://h/bin", fh, len(data), sha256(data), resume_from=4)
    assert staged.read_bytes() == data[:4]


def test_download_is_written_in_chunks_never_whole(tmp_path: Path) -> None:
    # The simulator's body is a generator: the base class must consume it piece by piece.
    pieces = [BINARY[i : i + 65536] for i in range(0, len(BINARY), 65536)]
    pulled: list[int] = []

    def body() -> Iterator[bytes]:
        for piece in pieces:
            pulled.append(os.stat(tmp_path / "staged").st_size)
            yield piece

    sim = Simulator({"http://h/bin": Response(200, {"Content-Length": str(len(BINARY))}, body())})
    download(sim, "http://h/bin", tmp_path / "staged")
    assert pulled == [i * 65536 for i in range(len(pieces))]  # written before the next was pulled


def test_a_set_stop_event_ends_the_download_at_the_next_piece(tmp_path: Path) -> None:
    # The update's package query sets it from another thread: nothing more is pulled or written.
    pieces = [BINARY[i : i + 65536] for i in range(0, len(BINARY), 65536)]
    stop = threading.Event()
    pulled = 0

    def body() -> Iterator[bytes]:
        nonlocal pulled
        for n, piece in enumerate(pieces):
            pulled += 1
            if n == 2:
                stop.set()
            yield piece

    sim = Simulator({"http://h/bin": Response(200, {"Content-Length": str(len(BINARY))}, body())})
    with pytest.raises(
        fetch.DownloadStopped, match=f"stopped after {2 * 65536} of {len(BINARY)} bytes"
    ) as err:
        download(sim, "http://h/bin", tmp_path / "staged", stop=stop)
    assert err.value.code == "download_stopped" and pulled == 3
    assert os.stat(tmp_path / "staged").st_size == 2 * 65536  # the third piece was never written


def test_an_unset_stop_event_changes_nothing(
    server: LocalServer, fetcher: HttpFetcher, tmp_path: Path
) -> None:
    server.serve("/bin", BINARY)
    download(fetcher, server.url("/bin"), tmp_path / "staged", stop=threading.Event())
    assert (tmp_path / "staged").read_bytes() == BINARY


def test_errors_carry_codes() -> None:
    codes = {cls.code for cls in (FetchFailed, SizeExceeded, SizeMismatch, Truncated, ChecksumMismatch)}
    assert codes == {"fetch_failed", "size_exceeded", "size_mismatch", "truncated", "checksum_mismatch"}
    assert all(issubclass(cls, DownloadError) for cls in (FetchFailed, SizeExceeded, Truncated))


# ---------------------------------------------------------------- pipelined hashing


def test_pipelined_hasher_digest_covers_exactly_the_bytes_given() -> None:
    chunks = [os.urandom(n) for n in (1, 4096, 262144, 7, 1 << 20, 0, 3)]
    hasher = fetch.PipelinedHasher()
    for chunk in chunks:
        hasher.update(chunk)
    assert hasher.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()
    with pytest.raises(RuntimeError):
        hasher.update(b"late")


def test_a_failed_download_leaves_no_hashing_thread_behind(tmp_path: Path) -> None:
    class Fixed(fetch.Fetcher):
        def _fetch(self, url: str, headers: Mapping[str, str], budget: Budget) -> fetch.Response:
            return fetch.Response(status=200, headers={"content-length": "8"}, chunks=[b"abcd", b"efgh"])

    before = {t.ident for t in threading.enumerate()}
    with open(tmp_path / "f", "wb+") as fh, pytest.raises(fetch.ChecksumMismatch):
        Fixed().download("http://127.0.0.1/x", fh, 8, "0" * 64)
    assert [t for t in threading.enumerate() if t.ident not in before and t.name == "sha256"] == []
