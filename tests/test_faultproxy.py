"""The agent's fetch and check code under every fault a CDN can throw at it (issue 6).

Real parts only: releases are published with ``publisher.release`` into a ``DirStore``, served by
``publisher.serve`` on 127.0.0.1, and reached through ``tests.faultproxy.FaultProxy``. The agent
side is the real ``agent.fetch.HttpFetcher``, ``agent.install.stage`` (the staged file next to
the target, ``O_EXCL``) and ``agent.check.check``.

Rules every fault must keep (DESIGN sections 2, 4 and 7):

- the attempt ends with a NAMED error (``fetch_failed``, ``truncated``, ``size_mismatch``,
  ``size_exceeded``, ``checksum_mismatch``, ``serial_rollback``, ...), never a bare exception;
- nothing partial is left where the agent stages, and the target is byte-identical;
- a refused manifest leaves the trust state (highest serial, cached envelope) as it was, with
  the code in ``last_error``;
- once the fault clears, the same call succeeds; a fault that clears on its own within the
  download's retries is absorbed by resuming with ``Range``.

The first part proves the proxy itself: each fault really happens on the wire. The last part
runs the real ``avika-agent update`` (``DEPLOYMENT_MODE=vm``, ``UPDATE_TARGET`` a stand-in agent in
a temp dir) through the proxy: the target stays byte-identical, ``status --json`` and the reported
``failed`` event name the error, the next plain ``update`` backs off, ``update --force`` installs.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import itertools
import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent import check as agent_check
from agent import config as agent_config
from agent import environment, install
from agent.fetch import DownloadError, FetchFailed, HttpFetcher
from agent.manifest import LocalSigner, ManifestError, generate_private_key, resolve_url
from agent.state import CACHED_ENVELOPE, load_state
from publisher.release import ReleaseSpec, release
from publisher.serve import UpdateServer, make_server
from publisher.stores import DirStore
from tests.agent_fixtures import LocalServer
from tests.faultproxy import MAX_STALL, Fault, FaultProxy

ROOT = Path(__file__).resolve().parent.parent
AGENT_BIN = ROOT / ".venv" / "bin" / "avika-agent"
PLATFORM = environment.platform_key()
SIZE = 300_000  # several 64 KiB chunks
OLD, NEW = "0.1.43", "0.1.44"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ================================================================ the proxy on the wire


@pytest.fixture
def upstream() -> Iterator[LocalServer]:
    with LocalServer() as server:
        yield server


def raw_get(
    port: int, path: str, timeout: float = 5.0, extra: str = ""
) -> tuple[bytes, bytes, BaseException | None]:
    """One GET on a fresh socket, read until EOF or error: (head, body, error)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{extra}\r\n".encode())
    data, error = read_until_closed(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body, error


def read_until_closed(sock: socket.socket) -> tuple[bytes, BaseException | None]:
    """Everything the peer sends until EOF or an error (returned, not raised); closes ``sock``."""
    data, error = b"", None
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except OSError as exc:
        error = exc
    finally:
        sock.close()
    return data, error


def header(head: bytes, name: str) -> str | None:
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


BLOB = os.urandom(200_000)


def test_untouched_requests_pass_through_byte_for_byte(upstream: LocalServer) -> None:
    upstream.serve("/u/binaries/b", BLOB, etag='"v1"')
    with FaultProxy(upstream.url("/u")) as proxy:
        assert proxy.url == f"http://127.0.0.1:{proxy.port}/u"
        head, body, error = raw_get(proxy.port, "/u/binaries/b")
    assert error is None and status_of(head) == 200 and body == BLOB
    assert header(head, "ETag") == '"v1"' and header(head, "Content-Length") == str(len(BLOB))
    assert [(r.method, r.path, r.fault, r.status, r.body_bytes) for r in proxy.requests] == [
        ("GET", "/u/binaries/b", None, 200, len(BLOB))
    ]


def test_truncate_sends_the_real_length_then_closes_cleanly(upstream: LocalServer) -> None:
    upstream.serve("/binaries/b", BLOB)
    with FaultProxy(upstream.url()) as proxy:
        proxy.inject("binaries/*", Fault.TRUNCATE, after=1000)
        head, body, error = raw_get(proxy.port, "/binaries/b")
    assert header(head, "Content-Length") == str(len(BLOB))
    assert body == BLOB[:1000] and error is None  # an end of file, not a reset


def test_reset_mid_stream_is_a_tcp_reset(upstream: LocalServer) -> None:
    upstream.serve("/binaries/b", BLOB)
    with FaultProxy(upstream.url()) as proxy:
        proxy.inject("binaries/*", Fault.RESET, after=50_000)
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        sock.sendall(b"GET /binaries/b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert proxy.wait_idle()  # the RST is on its way before we read a byte
        received, error = read_until_closed(sock)
    assert isinstance(error, ConnectionResetError)
    assert BLOB[:1000] in received and len(received) < len(BLOB)


def test_reset_before_the_response_sends_nothing(upstream: LocalServer) -> None:
    upstream.serve("/binaries/b", BLOB)
    with FaultProxy(upstream.url()) as proxy:
        proxy.inject("binaries/*", Fault.RESET)
        head, body, error = raw_get(proxy.port, "/binaries/b")
    assert (head, body) == (b"", b"") and isinstance(error, ConnectionResetError)
    assert proxy.requests[0].status is None
    assert upstream.count() == 0  # the upstream was never asked


def test_stall_goes_silent_after_some_bytes_and_close_ends_it(upstream: LocalServer) -> None:
    upstream.serve("/binaries/b", BLOB)
    proxy = FaultProxy(upstream.url()).start()
    try:
        rule = proxy.inject("binaries/*", Fault.STALL, after=5000, seconds=999)
        assert rule.options["seconds"] == MAX_STALL  # bounded whatever a test asks
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        sock.sendall(b"GET /binaries/b HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(1000):  # bounded: until the proxy has written its 5000 bytes
            if proxy.requests and proxy.requests[0].body_bytes == 5000:
                break
            threading.Event().wait(0.01)
        sock.settimeout(0.5)
        received, error = read_until_closed(sock)
        assert isinstance(error, TimeoutError)
        head, _, body = received.partition(b"\r\n\r\n")
        assert status_of(head) == 200 and body == BLOB[:5000]
        assert not proxy.requests[0].done.is_set()  # still stalling
    finally:
        proxy.close()
    assert proxy.requests[0].done.wait(5)  # closing the proxy released the stall


def test_lie_length_announces_more_or_fewer_bytes_than_it_sends(upstream: LocalServer) -> None:
    upstream.serve("/binaries/b", BLOB)
    with FaultProxy(upstream.url()) as proxy:
        proxy.inject("binaries/*", Fault.LIE_LENGTH, delta=+777)
        proxy.inject("binaries/*", Fault.LIE_LENGTH, length=10)
        more_head, more_body, _ = raw_get(proxy.port, "/binaries/b")
        fewer_head, fewer_body, _ = raw_get(proxy.port, "/binaries/b")
    assert header(more_head, "Content-Length") == str(len(BLOB) + 777) and more_body == BLOB
    assert header(fewer_head, "Content-Length") == "10" and fewer_body == BLOB


@pytest.mark.parametrize("status", [500, 502, 503, 403, 404])
def test_status_is_answered_without_asking_the_upstream(upstream: LocalServer, status: int) -> None:
    upstream.serve("/binaries/b", BLOB)
    with FaultProxy(upstream.url()) as proxy:
        proxy.inject("binaries/*", Fault.STATUS, status=status)
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        conn.request("GET", "/binaries/b")
        response = conn.getresponse()
        response.read()
        conn.close()
    assert response.status == status and upstream.count() == 0


def test_304_without_etag_even_to_an_unconditional_request(upstream: LocalServer) -> None:
    upstream.serve("/manifest.json", b"{}", etag='"m1"')
    with FaultProxy(upstream.url()) as proxy:
        proxy.inject("manifest.json", Fault.NOT_MODIFIED_NO_ETAG)
        head, body, error = raw_get(proxy.port, "/manifest.json")
    assert status_of(head) == 304 and header(head, "ETag") is None and body == b"" and error is None


def test_replay_serves_the_oldest_captured_manifest(upstream: LocalServer) -> None:
    with FaultProxy(upstream.url()) as proxy:
        for body in (b'{"serial": 1}', b'{"serial": 2}', b'{"serial": 2}'):
            upstream.serve("/manifest.json", body, etag=f'"{sha256(body)}"')
            assert raw_get(proxy.port, "/manifest.json")[1] == body
        assert proxy.captured("/manifest.json") == [b'{"serial": 1}', b'{"serial": 2}']
        proxy.inject("manifest.json", Fault.REPLAY)
        proxy.inject("manifest.json", Fault.REPLAY, body=b"chosen")
        replayed = raw_get(proxy.port, "/manifest.json")
        chosen = raw_get(proxy.port, "/manifest.json")
    first = b'{"serial": 1}'
    assert replayed[1] == first and header(replayed[0], "ETag") == '"' + sha256(first) + '"'
    assert chosen[1] == b"chosen"
    assert upstream.count("/manifest.json") == 3  # replays never reach the upstream


def test_mix_and_match_serves_another_objects_bytes(upstream: LocalServer) -> None:
    other = os.urandom(1000)
    upstream.serve("/binaries/new", BLOB)
    upstream.serve("/binaries/old", other)
    with FaultProxy(upstream.url()) as proxy:
        proxy.inject("binaries/new", Fault.MIX_AND_MATCH, source="/binaries/old")
        proxy.inject("binaries/new", Fault.MIX_AND_MATCH, body=b"x" * 10)
        assert raw_get(proxy.port, "/binaries/new")[1] == other
        assert raw_get(proxy.port, "/binaries/new")[1] == b"x" * 10
        assert raw_get(proxy.port, "/binaries/new")[1] == BLOB
    assert [r.path for r in upstream.requests] == ["/binaries/old", "/binaries/new"]


def test_corrupt_flips_exactly_one_byte(upstream: LocalServer) -> None:
    upstream.serve("/binaries/b", BLOB)
    with FaultProxy(upstream.url()) as proxy:
        proxy.inject("binaries/*", Fault.CORRUPT, offset=70_000)  # in the second 64 KiB chunk
        body = raw_get(proxy.port, "/binaries/b")[1]
    assert len(body) == len(BLOB)
    assert [i for i in range(len(BLOB)) if body[i] != BLOB[i]] == [70_000]


def test_rules_apply_per_pattern_and_count_then_pass(upstream: LocalServer) -> None:
    upstream.serve("/u/binaries/b", BLOB)
    upstream.serve("/u/manifest.json", b"{}")
    with FaultProxy(upstream.url("/u")) as proxy:
        rule = proxy.inject("binaries/*", Fault.STATUS, status=503, times=2)
        anchored = proxy.inject("/binaries/*", Fault.STATUS, status=404, times=None)  # never matches /u/...
        statuses = [
            status_of(raw_get(proxy.port, p)[0]) for p in ["/u/binaries/b"] * 3 + ["/u/manifest.json"]
        ]
        assert statuses == [503, 503, 200, 200]
        assert (rule.applied, anchored.applied) == (2, 0)
        assert [r.fault for r in proxy.seen("binaries/*")] == ["status", "status", None]
        proxy.inject("*", Fault.STATUS, status=500, times=None)
        proxy.clear()
        assert status_of(raw_get(proxy.port, "/u/manifest.json")[0]) == 200


def test_inject_refuses_unknown_options_and_non_loopback_upstreams() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("http://example.com/updates")
    with FaultProxy("http://127.0.0.1:9") as proxy:
        with pytest.raises(TypeError):
            proxy.inject("x", Fault.TRUNCATE, seconds=3)
        with pytest.raises(TypeError):
            proxy.inject("x", Fault.MIX_AND_MATCH)


# ================================================================ a real store behind the proxy


@dataclass
class Repo:
    """A DirStore published with publisher.release, served by publisher.serve under /updates."""

    tmp: Path
    store: DirStore
    signer: LocalSigner
    server: UpdateServer
    binaries: dict[str, bytes]

    @property
    def url(self) -> str:
        return self.server.url + "/updates"

    @property
    def public_key(self) -> str:
        return self.signer.public_key.b64

    def release(self, version: str, data: bytes, **spec: Any) -> int:
        path = self.tmp / "builds" / f"avika-agent-{version}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        self.binaries[version] = data
        bins = {PLATFORM: path, "linux-arm64" if PLATFORM != "linux-arm64" else "linux-amd64": path}
        outcome = release(self.store, [self.signer], ReleaseSpec(version, bins, init=True, **spec))
        return outcome.manifest.serial

    def binary_path(self, version: str) -> str:
        """The URL path of ``version``'s binary for this platform, as the proxy sees it."""
        data = self.binaries[version]
        return f"/updates/binaries/{version}/{sha256(data)}/avika-agent-{PLATFORM}"


def agent_script(version: str) -> bytes:
    """A stand-in agent binary: answers `version` / `--version`, padded to exactly SIZE bytes."""
    script = f'#!/bin/sh\necho "{version}"\nexit 0\n#'.encode()
    return script + os.urandom(SIZE - len(script) - 1).hex().encode()[: SIZE - len(script) - 1] + b"\n"


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repo]:
    www = tmp_path / "www"
    (www / "updates").mkdir(parents=True)
    server = make_server(www, "127.0.0.1", 0)
    quiet = {"log_message": lambda *a: None}  # a subclass: serve's own handler stays as it is
    server.RequestHandlerClass = type("Quiet", (server.RequestHandlerClass,), quiet)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    repo = Repo(tmp_path, DirStore(www / "updates"), LocalSigner(generate_private_key()), server, {})
    repo.release(OLD, agent_script(OLD))
    repo.release(NEW, agent_script(NEW))
    try:
        yield repo
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(repo: Repo) -> Iterator[FaultProxy]:
    with FaultProxy(repo.url) as p:
        yield p


def make_fetcher(read_timeout: float = 5.0) -> HttpFetcher:
    """``read_timeout`` limits each read of the manifest and, as the stall limit, of a download."""
    return HttpFetcher(
        chunk_size=64 * 1024, retry_delay=0, retries=2, read_timeout=read_timeout, stall_timeout=read_timeout
    )


@dataclass
class Host:
    """Where the agent stages: the target's directory, holding only the old binary."""

    target: Path
    original: bytes

    @property
    def directory(self) -> Path:
        return self.target.parent

    def files(self) -> list[str]:
        return sorted(os.listdir(self.directory))


@pytest.fixture
def host(tmp_path: Path) -> Host:
    target = tmp_path / "host" / "avika-agent"
    target.parent.mkdir()
    target.write_bytes(agent_script(OLD))
    target.chmod(0o755)
    return Host(target, target.read_bytes())


def stage_download(fetcher: HttpFetcher, url: str, host: Host, version: str, data: bytes) -> Path:
    """The install path's download: ``install.stage`` (O_EXCL next to the target, fsync) + download."""
    return install.stage(host.target, version, lambda fd: fetcher.download(url, fd, len(data), sha256(data)))


def assert_untouched(host: Host) -> None:
    assert host.files() == ["avika-agent"], "a partial download was left next to the target"
    assert host.target.read_bytes() == host.original


# ---------------------------------------------------------------- downloads: every fault, named


@dataclass(frozen=True)
class Case:
    fault: Fault
    options: dict[str, Any]
    code: str
    read_timeout: float = 5.0
    requests: int | None = None  # how many requests the agent made, where it matters
    first: tuple[Fault, dict[str, Any]] | None = None  # applied once before the lasting fault


# The fetcher writes every byte it received before a connection broke (each piece is what one
# receive returned), so a transfer cut after 70,000 bytes resumes at byte 70,000 with Range, and a
# connection that keeps breaking after some bytes keeps making progress: only cuts with no new
# byte count against the retries (mid-stream cuts are in TRANSIENT_CASES below).
PROGRESS_THEN_DROPS = (Fault.TRUNCATE, {"after": 70_000})
DOWNLOAD_CASES = {
    "progress_then_every_response_empty": Case(
        Fault.TRUNCATE, {"after": 0}, "truncated", requests=4, first=PROGRESS_THEN_DROPS
    ),
    "progress_then_every_connection_reset": Case(
        Fault.RESET, {}, "truncated", requests=4, first=(Fault.RESET, {"after": 70_000})
    ),
    "progress_then_every_response_stalls": Case(
        Fault.STALL, {"after": 0, "seconds": 3}, "stalled", 1.0, 4, first=PROGRESS_THEN_DROPS
    ),
    "every_response_empty": Case(Fault.TRUNCATE, {"after": 0}, "fetch_failed", requests=3),
    "every_connection_reset_before_the_response": Case(Fault.RESET, {}, "fetch_failed", requests=3),
    "stall_beyond_the_stall_limit": Case(Fault.STALL, {"after": 0, "seconds": 3}, "stalled", 1.0, 3),
    "content_length_announces_more": Case(Fault.LIE_LENGTH, {"delta": 1000}, "size_exceeded", requests=1),
    "content_length_announces_less": Case(Fault.LIE_LENGTH, {"delta": -1000}, "size_mismatch", requests=1),
    "http_503_keeps_coming": Case(Fault.STATUS, {"status": 503}, "fetch_failed", requests=3),
    "http_500": Case(Fault.STATUS, {"status": 500}, "fetch_failed", requests=3),
    "http_403_is_not_retried": Case(Fault.STATUS, {"status": 403}, "fetch_failed", requests=1),
    "http_404_is_not_retried": Case(Fault.STATUS, {"status": 404}, "fetch_failed", requests=1),
    "304_without_etag_for_a_binary": Case(Fault.NOT_MODIFIED_NO_ETAG, {}, "fetch_failed", requests=1),
    "one_flipped_byte": Case(Fault.CORRUPT, {"offset": 123_456}, "checksum_mismatch", requests=1),
}


@pytest.mark.parametrize("case", DOWNLOAD_CASES.values(), ids=DOWNLOAD_CASES.keys())
def test_download_fault_ends_named_leaves_nothing_and_a_retry_succeeds(
    repo: Repo, proxy: FaultProxy, host: Host, case: Case
) -> None:
    data, path = repo.binaries[NEW], repo.binary_path(NEW)
    url = proxy.url.removesuffix("/updates") + path
    if case.first:
        proxy.inject(path, case.first[0], times=1, **case.first[1])
    proxy.inject(path, case.fault, times=None, **case.options)
    fetcher = make_fetcher(case.read_timeout)
    with pytest.raises(DownloadError) as raised:
        stage_download(fetcher, url, host, NEW, data)
    assert raised.value.code == case.code, raised.value.message
    if case.requests is not None:
        assert len(proxy.seen(path)) == case.requests
    assert_untouched(host)

    proxy.clear()
    staged = stage_download(fetcher, url, host, NEW, data)
    assert staged.read_bytes() == data and staged.parent == host.directory
    assert sorted(host.files()) == sorted(["avika-agent", staged.name])
    fetcher.close()


def test_mix_and_match_binary_is_checksum_mismatch(repo: Repo, proxy: FaultProxy, host: Host) -> None:
    """The manifest is genuine; the binary URL answers another release's (same-size) bytes."""
    config = make_config(repo, proxy, host)
    fetcher = make_fetcher()
    result = agent_check.check(config, fetcher=fetcher, mode="vm")
    assert (
        result.manifest is not None and result.manifest.version == NEW and result.decision.action == "update"
    )
    binary = result.manifest.binaries[PLATFORM]
    url = resolve_url(config.manifest_url, binary.url)
    assert url.endswith(repo.binary_path(NEW))
    proxy.inject(repo.binary_path(NEW), Fault.MIX_AND_MATCH, source=repo.binary_path(OLD), times=None)
    download = lambda fd: fetcher.download(url, fd, binary.size, binary.sha256)  # noqa: E731
    with pytest.raises(DownloadError) as raised:
        install.stage(host.target, NEW, download)
    assert raised.value.code == "checksum_mismatch"
    assert_untouched(host)
    proxy.clear()
    assert install.stage(host.target, NEW, download).read_bytes() == repo.binaries[NEW]


def test_mix_and_match_with_a_longer_binary_is_size_exceeded(
    repo: Repo, proxy: FaultProxy, host: Host
) -> None:
    repo.release("0.1.45", agent_script("0.1.45") + b"# longer\n")
    proxy.inject(repo.binary_path(NEW), Fault.MIX_AND_MATCH, source=repo.binary_path("0.1.45"))
    url = proxy.url.removesuffix("/updates") + repo.binary_path(NEW)
    with pytest.raises(DownloadError) as raised:
        stage_download(make_fetcher(), url, host, NEW, repo.binaries[NEW])
    assert raised.value.code == "size_exceeded"
    assert_untouched(host)


TRANSIENT_CASES = {
    "two_cuts_then_clean": (Fault.TRUNCATE, {"after": 100_000}, 2, 5.0),
    "every_response_cut_after_70k": (Fault.TRUNCATE, {"after": 70_000}, None, 5.0),
    "every_response_cut_after_50k": (Fault.TRUNCATE, {"after": 50_000}, None, 5.0),
    "one_reset_mid_stream": (Fault.RESET, {"after": 100_000}, 1, 5.0),
    "every_connection_reset_after_50k": (Fault.RESET, {"after": 50_000}, None, 5.0),
    "one_stall_mid_stream": (Fault.STALL, {"after": 100_000, "seconds": 3}, 1, 1.0),
    "two_503s": (Fault.STATUS, {"status": 503}, 2, 5.0),
}


@pytest.mark.parametrize(
    ("fault", "options", "times", "timeout"), TRANSIENT_CASES.values(), ids=TRANSIENT_CASES.keys()
)
def test_a_fault_that_clears_or_lets_bytes_through_is_absorbed(
    repo: Repo,
    proxy: FaultProxy,
    host: Host,
    fault: Fault,
    options: dict[str, Any],
    times: int | None,
    timeout: float,
) -> None:
    data, path = repo.binaries[NEW], repo.binary_path(NEW)
    proxy.inject(path, fault, times=times, **options)
    url = proxy.url.removesuffix("/updates") + path
    staged = stage_download(make_fetcher(timeout), url, host, NEW, data)
    assert staged.read_bytes() == data
    seen = proxy.seen(path)
    if times is not None:
        assert [r.fault for r in seen] == [fault.value] * times + [None]
    else:  # cut every time, yet each cut kept its bytes: the tail was short enough to pass
        assert len(seen) >= 2 and all(r.fault == fault.value for r in seen)
    if fault is not Fault.STATUS:  # resumed exactly where the broken transfer stopped
        starts = [int(r.headers["range"][len("bytes=") : -1]) for r in seen[1:]]
        assert "range" not in seen[0].headers
        ends = list(itertools.accumulate(r.body_bytes for r in seen[:-1]))
        assert starts == ends, (starts, [r.body_bytes for r in seen])


# ---------------------------------------------------------------- the manifest: check under faults


def make_config(repo: Repo, proxy: FaultProxy, host: Host) -> agent_config.AgentConfig:
    sidecar = host.directory.parent / "sidecar"
    if not sidecar.exists():
        sidecar.write_text('#!/bin/sh\necho "avika-agent 0.1.40"\n')
        sidecar.chmod(0o755)
    return agent_config.from_values(
        {
            "UPDATE_SERVER": proxy.url,
            "UPDATE_PUBLIC_KEYS": repo.public_key,
            "UPDATE_STATE_DIR": str(host.directory.parent / "state"),
            "BUFFER_DIR": str(host.directory.parent / "data"),
            "AGENT_ID": "host-000001.dc1",
            "DEPLOYMENT_MODE": "vm",
            "UPDATE_TARGET": str(sidecar),
        }
    )


@dataclass
class Checker:
    """Runs agent.check.check through the proxy; remembers the trust state to compare."""

    config: agent_config.AgentConfig
    proxy: FaultProxy

    def __call__(self, read_timeout: float = 5.0, **kw: Any) -> agent_check.CheckResult:
        fetcher = make_fetcher(read_timeout)
        try:
            return agent_check.check(self.config, fetcher=fetcher, mode="vm", **kw)
        finally:
            fetcher.close()

    def trust(self) -> tuple[int | None, str | None, bytes]:
        state = load_state(self.config.state_dir)
        return (
            state.highest_serial,
            state.highest_digest,
            (self.config.state_dir / CACHED_ENVELOPE).read_bytes(),
        )

    def refused(self, code: str, **kw: Any) -> BaseException:
        before = self.trust()
        with pytest.raises((ManifestError, DownloadError)) as raised:
            self(**kw)
        assert raised.value.code == code, raised.value.message  # type: ignore[attr-defined]
        assert self.trust() == before, "a refused manifest changed the trust state"
        state = load_state(self.config.state_dir)
        assert state.last_error is not None and state.last_error["code"] == code
        assert state.last_error["state"] == "checking" and state.last_result == "error"
        return raised.value


@pytest.fixture
def checker(repo: Repo, proxy: FaultProxy, host: Host) -> Checker:
    """An agent that accepted serial 2 (0.1.44); the proxy captured serials 1 and 2 on the way.

    The store starts at serial 2, so serial 1 is captured by fetching its archive through the proxy.
    """
    c = Checker(make_config(repo, proxy, host), proxy)
    raw_get(proxy.port, "/updates/manifests/1.json")  # what a CDN edge might still hold
    result = c()
    assert result.manifest is not None and result.manifest.serial == 2 and result.status == 200
    return c


MANIFEST = "/updates/manifest.json"
MANIFEST_CASES = {
    "http_500": (Fault.STATUS, {"status": 500}, "fetch_failed"),
    "http_403": (Fault.STATUS, {"status": 403}, "fetch_failed"),
    "http_404": (Fault.STATUS, {"status": 404}, "fetch_failed"),
    "truncated_body": (Fault.TRUNCATE, {"after": 100}, "fetch_failed"),
    "reset_before_the_response": (Fault.RESET, {}, "fetch_failed"),
    "reset_mid_body": (Fault.RESET, {"after": 100}, "fetch_failed"),
    "content_length_announces_more": (Fault.LIE_LENGTH, {"delta": 100}, "fetch_failed"),
    # the client reads only the announced bytes: a cut envelope is not JSON
    "content_length_announces_less": (Fault.LIE_LENGTH, {"delta": -100}, "malformed_envelope"),
    "content_length_over_the_cap": (Fault.LIE_LENGTH, {"length": 2 * 1024 * 1024}, "too_large"),
    # byte 60 is inside the base64 payload: the flip makes it non-UTF-8
    "one_flipped_byte": (Fault.CORRUPT, {"offset": 60}, "malformed_envelope"),
    "archived_older_manifest_served_as_current": (
        Fault.MIX_AND_MATCH,
        {"source": "/updates/manifests/1.json"},
        "serial_rollback",
    ),
}


@pytest.mark.parametrize(("fault", "options", "code"), MANIFEST_CASES.values(), ids=MANIFEST_CASES.keys())
def test_manifest_fault_is_refused_named_and_trust_state_kept(
    checker: Checker, proxy: FaultProxy, repo: Repo, fault: Fault, options: dict[str, Any], code: str
) -> None:
    # A new release is out, so the manifest comes with a body (an unchanged one would be a 304
    # with no body to break); the CDN breaks delivering it.
    assert repo.release("0.1.45", agent_script("0.1.45")) == 3
    proxy.inject(MANIFEST, fault, times=None, **options)
    checker.refused(code)
    proxy.clear()
    result = checker()
    assert result.manifest is not None and result.manifest.serial == 3 and result.status == 200


def test_stalled_manifest_is_fetch_failed(checker: Checker, proxy: FaultProxy, repo: Repo) -> None:
    repo.release("0.1.45", agent_script("0.1.45"))
    proxy.inject(MANIFEST, Fault.STALL, after=0, seconds=3, times=None)
    checker.refused("fetch_failed", read_timeout=1.0)


def test_replay_after_a_newer_manifest_was_accepted_is_serial_rollback(
    checker: Checker, proxy: FaultProxy, repo: Repo
) -> None:
    captured = proxy.captured(MANIFEST)
    assert len(captured) == 1  # serial 2 (the archive's serial 1 came from another path)
    serial_3 = repo.release("0.1.45", agent_script("0.1.45"))
    assert checker().manifest.serial == serial_3  # type: ignore[union-attr]
    assert len(proxy.captured(MANIFEST)) == 2
    proxy.inject(MANIFEST, Fault.REPLAY, index=0)  # serial 2: validly signed, once accepted
    error = checker.refused("serial_rollback")
    assert "below the highest accepted (3)" in str(error)


def test_replaying_the_manifest_already_accepted_is_harmless(checker: Checker, proxy: FaultProxy) -> None:
    """Same serial, same bytes: nothing to roll back to (DESIGN section 2), so it is accepted."""
    proxy.inject(MANIFEST, Fault.REPLAY, index=0)
    result = checker()
    assert result.status == 200 and result.manifest is not None and result.manifest.serial == 2


def test_304_without_etag_verifies_the_cached_envelope(checker: Checker, proxy: FaultProxy) -> None:
    proxy.inject(MANIFEST, Fault.NOT_MODIFIED_NO_ETAG)
    result = checker()
    assert result.status == 304 and result.manifest is not None and result.manifest.serial == 2
    assert proxy.requests[-1].headers.get("if-none-match")  # the agent did ask conditionally


def test_304_without_etag_keeps_a_stale_but_signed_manifest_until_the_fault_clears(
    checker: Checker, proxy: FaultProxy, repo: Repo
) -> None:
    repo.release("0.1.45", agent_script("0.1.45"))
    proxy.inject(MANIFEST, Fault.NOT_MODIFIED_NO_ETAG)
    assert checker().manifest.serial == 2  # type: ignore[union-attr]
    assert checker().manifest.serial == 3  # type: ignore[union-attr]


def test_304_forever_cannot_keep_an_agent_on_an_expired_manifest(checker: Checker, proxy: FaultProxy) -> None:
    proxy.inject(MANIFEST, Fault.NOT_MODIFIED_NO_ETAG, times=None)
    checker.refused("expired", now=datetime.now(UTC) + timedelta(days=31))


def test_304_without_a_cached_envelope_is_fetch_failed(repo: Repo, proxy: FaultProxy, host: Host) -> None:
    checker = Checker(make_config(repo, proxy, host), proxy)
    proxy.inject(MANIFEST, Fault.NOT_MODIFIED_NO_ETAG)
    with pytest.raises(FetchFailed) as raised:
        checker()
    assert raised.value.code == "fetch_failed" and "304" in raised.value.message
    assert load_state(checker.config.state_dir).highest_serial is None
    assert "if-none-match" not in proxy.requests[-1].headers


# ================================================================ end to end: avika-agent update


def _cli_ready() -> str | None:
    """Why the real `avika-agent update` / `status` cannot be driven yet (None: ready)."""
    if not AGENT_BIN.exists():
        return f"{AGENT_BIN} is not installed"
    try:
        done = subprocess.run([str(AGENT_BIN), "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if done.returncode != 0 or "update" not in done.stdout or "status" not in done.stdout:
        return "avika-agent has no update/status commands yet"
    return None


def agent_env(repo: Repo, proxy: FaultProxy, host: Host) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "UPDATE_SERVER": proxy.url,
        "UPDATE_PUBLIC_KEYS": repo.public_key,
        "UPDATE_STATE_DIR": str(host.directory.parent / "state"),
        "BUFFER_DIR": str(host.directory.parent / "data"),
        "AGENT_ID": "host-000002.dc2",
        "DEPLOYMENT_MODE": "vm",
        "UPDATE_TARGET": str(host.target),
        "UPDATE_REPORT_URL": "disabled",
    }


def reported_events(log: str) -> list[dict[str, Any]]:
    """The events the agent reported, from its JSON log lines (the log sink's copy of each report)."""
    events = []
    for line in log.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("event"), dict):
                events.append(record["event"])
    return events


def run_agent(env: dict[str, str], *args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(AGENT_BIN), *args, "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# Faults that end an attempt at once (a cut connection is retried with sleeps of 1, 2, 4, 8 s
# before it is named: the fetch-level tables above cover those, with retry_delay=0). Each case:
# the fault, its options, the error code, and the agent's environment on top of agent_env.
E2E_CASES: dict[str, tuple[Fault, Callable[[Repo], dict[str, Any]], str, dict[str, str]]] = {
    "binary_truncated_at_the_origin": (
        Fault.MIX_AND_MATCH,
        lambda repo: {"body": repo.binaries[NEW][:100_000]},
        "size_mismatch",
        {},
    ),
    "content_length_longer_than_the_manifest_says": (
        Fault.LIE_LENGTH,
        lambda repo: {"delta": 1},
        "size_exceeded",
        {},
    ),
    "one_corrupt_byte": (Fault.CORRUPT, lambda repo: {"offset": 5000}, "checksum_mismatch", {}),
    "another_releases_binary": (
        Fault.MIX_AND_MATCH,
        lambda repo: {"source": repo.binary_path(OLD)},
        "checksum_mismatch",
        {},
    ),
    "binary_missing_on_the_cdn": (Fault.STATUS, lambda repo: {"status": 404}, "fetch_failed", {}),
    # DESIGN section 3: a drip is progress, so only the download's own deadline can end it.
    "binary_dripped_past_the_download_deadline": (
        Fault.DRIP,
        lambda repo: {"after": 10_000, "every": 0.05, "step": 100},
        "download_timeout",
        {"UPDATE_DOWNLOAD_TIMEOUT": "2s"},
    ),
}


@pytest.fixture
def cli_ready() -> None:
    reason = _cli_ready()
    if reason:
        pytest.skip(reason)


@pytest.mark.slow
@pytest.mark.usefixtures("cli_ready")
@pytest.mark.parametrize(("fault", "options", "code", "extra"), E2E_CASES.values(), ids=E2E_CASES.keys())
def test_avika_agent_update_through_faults_keeps_the_target_and_names_the_error(
    repo: Repo,
    proxy: FaultProxy,
    host: Host,
    tmp_path: Path,
    fault: Fault,
    options: Callable[[Repo], dict[str, Any]],
    code: str,
    extra: dict[str, str],
) -> None:
    config = tmp_path / "empty.conf"
    config.write_text("# configured through the environment\n")
    env = {**agent_env(repo, proxy, host), **extra}
    before = host.target.read_bytes()
    proxy.inject(repo.binary_path(NEW), fault, times=None, **options(repo))
    done = run_agent(env, "update", "--log-format", "json", config=config)
    assert done.returncode != 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["error"] == code
    failed = [e for e in reported_events(done.stderr) if e["state"] == "failed"]
    assert len(failed) == 1 and failed[0]["error"].startswith(code + ":"), failed
    assert failed[0]["failed_state"] in ("downloading", "verifying")
    assert host.target.read_bytes() == before
    assert host.files() == ["avika-agent"], "a partial download was left next to the target"
    status = run_agent(env, "status", "--json", config=config)
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["last_error"] is not None and info["last_error"]["code"] == code, info
    assert info["pending"] is None

    # The fault clears. A failed (version, sha256) backs off (DESIGN section 4): the next update
    # waits, so a fleet never hammers a bad binary; by hand, --force retries now.
    proxy.clear()
    done = run_agent(env, "update", config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["reason"] == "backoff"
    assert host.target.read_bytes() == before
    done = run_agent(env, "update", "--force", config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout)
    assert out["result"] == "swapped" and out["restart"] == "deferred", out  # no agent runs here
    assert host.target.read_bytes() == repo.binaries[NEW]


@pytest.mark.slow
@pytest.mark.usefixtures("cli_ready")
def test_avika_agent_update_resumes_a_reset_transfer_and_installs(
    repo: Repo, proxy: FaultProxy, host: Host, tmp_path: Path
) -> None:
    config = tmp_path / "empty.conf"
    config.write_text("")
    # Every byte read before the reset is kept: the resume starts at byte 270,000.
    proxy.inject(repo.binary_path(NEW), Fault.RESET, after=270_000)
    done = run_agent(agent_env(repo, proxy, host), "update", config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["result"] == "swapped"
    assert host.target.read_bytes() == repo.binaries[NEW]
    seen = proxy.seen(repo.binary_path(NEW))
    assert [r.fault for r in seen] == ["reset", None]
    assert seen[1].headers.get("range") == "bytes=270000-", done.stderr
