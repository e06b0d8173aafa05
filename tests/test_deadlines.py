"""Deadlines that cannot be dripped (DESIGN section 3, issue 10).

Rules enforced here, against real sockets on 127.0.0.1 (``tests.faultproxy.FaultProxy`` in front
of a ``LocalServer``, or a listener that accepts and never answers):

- ``UPDATE_FETCH_TIMEOUT`` bounds one manifest fetch from connect to last byte, however slowly the
  bytes arrive: a body or a header dripped one byte every 0.2 s, or a server (http or https) that
  accepts and never answers, ends the check ``fetch_failed`` naming the deadline, recorded in
  ``state.json``, and the agent hangs up long before the drip would have ended;
- ``UPDATE_DOWNLOAD_TIMEOUT`` bounds one binary download, Range resumes and the waits between them
  included (``download_timeout``); a connection that sends nothing for the stall limit is
  ``stalled`` and is resumed within the deadline; nothing is left where the agent stages;
- the report sender's POST has a deadline too: a dripping endpoint cannot hold the sender.

The real ``avika-agent update`` under a dripped download is in ``tests/test_faultproxy.py``.
No wall-clock limit is asserted: that the agent hung up early is read from what the server saw
(the proxy's record: the client went away while bytes were still to come).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import check as agent_check
from agent import config as agent_config
from agent import install
from agent.fetch import DownloadError, FetchFailed, HttpFetcher
from agent.reports import Poster
from agent.state import load_state
from infra.reports.auth import make_token
from tests.agent_fixtures import LocalServer, Release, publish, sha256
from tests.faultproxy import Fault, FaultProxy

BINARY = os.urandom(300_000)
MANIFEST = "/updates/manifest.json"
BIN_PATH = "/updates/binaries/bin"


@pytest.fixture
def upstream() -> Iterator[LocalServer]:
    with LocalServer() as server:
        yield server


@pytest.fixture
def proxy(upstream: LocalServer) -> Iterator[FaultProxy]:
    with FaultProxy(upstream.url()) as p:
        yield p


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A port whose kernel accepts connections that nobody ever reads from or answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def config_for(tmp_path: Path, server: str, release: Release, **values: str) -> agent_config.AgentConfig:
    sidecar = tmp_path / "sidecar"
    sidecar.write_text('#!/bin/sh\necho "avika-agent 0.1.40"\n')
    sidecar.chmod(0o755)
    return agent_config.from_values(
        {
            "UPDATE_SERVER": server,
            "UPDATE_PUBLIC_KEYS": release.public_keys,
            "UPDATE_STATE_DIR": str(tmp_path / "state"),
            "BUFFER_DIR": str(tmp_path / "data"),
            "AGENT_ID": "host-deadline-1",
            "DEPLOYMENT_MODE": "vm",
            "UPDATE_TARGET": str(sidecar),
            **values,
        }
    )


def refused_check(config: agent_config.AgentConfig) -> FetchFailed:
    """``check`` with the fetcher it builds from ``config`` (no test-made fetcher)."""
    with pytest.raises(FetchFailed) as raised:
        agent_check.check(config, mode="vm")
    return raised.value


# ---------------------------------------------------------------- the manifest


@pytest.mark.parametrize("head", [False, True], ids=["body", "headers"])
def test_a_dripped_manifest_ends_fetch_failed_at_the_deadline_not_when_the_drip_ends(
    tmp_path: Path, upstream: LocalServer, proxy: FaultProxy, head: bool
) -> None:
    release = Release()
    envelope = release.envelope()
    publish(upstream, envelope)
    proxy.inject("manifest.json", Fault.DRIP, every=0.2, head=head)
    config = config_for(tmp_path, proxy.url + "/updates", release, UPDATE_FETCH_TIMEOUT="2s")

    error = refused_check(config)

    assert error.code == "fetch_failed"
    assert "UPDATE_FETCH_TIMEOUT" in error.message and "2s" in error.message, error.message
    assert proxy.wait_idle(15)
    [record] = proxy.seen("manifest.json")
    # The agent hung up while the drip still had most of the envelope to send.
    assert record.client_gone and record.body_bytes < len(envelope) // 2, record
    state = load_state(config.state_dir)
    assert state.last_error is not None and state.last_error["code"] == "fetch_failed"
    assert "UPDATE_FETCH_TIMEOUT" in state.last_error["message"]
    assert state.highest_serial in (None, 0)  # nothing was trusted


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_server_that_accepts_and_never_answers_ends_at_the_fetch_deadline(
    tmp_path: Path, scheme: str
) -> None:
    # Per-read timeout 30 s, deadline 2 s: only the deadline can end this (for https, inside the
    # TLS handshake, which has no read of its own to time out).
    release = Release()
    with silent_listener() as port:
        config = config_for(
            tmp_path, f"{scheme}://127.0.0.1:{port}/updates", release, UPDATE_FETCH_TIMEOUT="2s"
        )
        error = refused_check(config)
    assert error.code == "fetch_failed"
    assert "UPDATE_FETCH_TIMEOUT" in error.message, error.message


def test_the_fetch_deadline_spans_redirects(upstream: LocalServer, proxy: FaultProxy) -> None:
    upstream.serve("/a", status=302, location="/b")
    upstream.serve("/b", b"x" * 1000)
    proxy.inject("/b", Fault.DRIP, every=0.2)
    fetcher = HttpFetcher(fetch_timeout=2)
    with pytest.raises(FetchFailed, match="UPDATE_FETCH_TIMEOUT"):
        fetcher.get_manifest(proxy.url + "/a")
    fetcher.close()
    assert proxy.wait_idle(15)
    assert proxy.seen("/b")[0].client_gone


# ---------------------------------------------------------------- binaries


def download(fetcher: HttpFetcher, url: str, target: Path) -> Path:
    """The install path's download: staged ``O_EXCL`` next to the target, fsynced."""
    return install.stage(target, "0.1.44", lambda fd: fetcher.download(url, fd, len(BINARY), sha256(BINARY)))


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "host" / "avika-agent"
    path.parent.mkdir()
    path.write_bytes(b"old agent\n")
    return path


def test_a_dripped_download_is_download_timeout_and_leaves_nothing(
    upstream: LocalServer, proxy: FaultProxy, target: Path
) -> None:
    upstream.serve(BIN_PATH, BINARY)
    proxy.inject("binaries/*", Fault.DRIP, after=10_000, every=0.05, step=100, times=None)
    fetcher = HttpFetcher(download_timeout=2, retry_delay=0)
    with pytest.raises(DownloadError) as raised:
        download(fetcher, proxy.url + BIN_PATH, target)
    assert raised.value.code == "download_timeout", raised.value.message
    assert "UPDATE_DOWNLOAD_TIMEOUT" in raised.value.message
    assert sorted(os.listdir(target.parent)) == ["avika-agent"]
    assert proxy.wait_idle(15)
    [record] = proxy.seen("binaries/*")  # a drip is progress, never a stall: one request
    assert record.client_gone and record.body_bytes < len(BINARY) // 2


def test_the_download_deadline_spans_resumes(upstream: LocalServer, proxy: FaultProxy, target: Path) -> None:
    upstream.serve(BIN_PATH, BINARY)
    proxy.inject("binaries/*", Fault.TRUNCATE, after=100_000)
    proxy.inject("binaries/*", Fault.DRIP, every=0.05, step=100, times=None)
    fetcher = HttpFetcher(download_timeout=2, retry_delay=0)
    with pytest.raises(DownloadError) as raised:
        download(fetcher, proxy.url + BIN_PATH, target)
    assert raised.value.code == "download_timeout"
    seen = proxy.seen("binaries/*")
    assert [r.fault for r in seen] == ["truncate", "drip"]
    assert seen[1].headers["range"] == "bytes=100000-"  # resumed exactly where the cut was
    assert sorted(os.listdir(target.parent)) == ["avika-agent"]


def test_no_wait_between_attempts_outlasts_the_download_deadline(
    upstream: LocalServer, proxy: FaultProxy, target: Path
) -> None:
    upstream.serve(BIN_PATH, BINARY)
    proxy.inject("binaries/*", Fault.STATUS, status=503, times=None)
    fetcher = HttpFetcher(download_timeout=2, retry_delay=60)  # the first back-off is past the deadline
    with pytest.raises(DownloadError) as raised:
        download(fetcher, proxy.url + BIN_PATH, target)
    assert raised.value.code == "download_timeout", raised.value.message
    assert len(proxy.seen("binaries/*")) == 1  # it did not sleep 60 s to try again


def test_a_stall_is_named_and_resumed_within_the_deadline(
    upstream: LocalServer, proxy: FaultProxy, target: Path
) -> None:
    upstream.serve(BIN_PATH, BINARY)
    proxy.inject("binaries/*", Fault.STALL, after=120_000, seconds=10)
    fetcher = HttpFetcher(stall_timeout=0.5, retry_delay=0)
    staged = download(fetcher, proxy.url + BIN_PATH, target)
    assert staged.read_bytes() == BINARY
    seen = proxy.seen("binaries/*")
    assert [r.fault for r in seen] == ["stall", None]
    assert seen[1].headers["range"] == "bytes=120000-"


def test_a_connection_that_keeps_stalling_is_stalled(
    upstream: LocalServer, proxy: FaultProxy, target: Path
) -> None:
    upstream.serve(BIN_PATH, BINARY)
    proxy.inject("binaries/*", Fault.STALL, after=0, seconds=10, times=None)
    fetcher = HttpFetcher(stall_timeout=0.5, retry_delay=0, retries=2)
    with pytest.raises(DownloadError) as raised:
        download(fetcher, proxy.url + BIN_PATH, target)
    assert raised.value.code == "stalled", raised.value.message
    assert len(proxy.seen("binaries/*")) == 3
    assert sorted(os.listdir(target.parent)) == ["avika-agent"]


def test_the_stall_limit_is_a_named_parameter() -> None:
    from agent import fetch

    assert fetch.STALL_TIMEOUT == 60.0
    assert HttpFetcher().stall_timeout == fetch.STALL_TIMEOUT
    assert HttpFetcher(stall_timeout=3).stall_timeout == 3


def test_the_agent_builds_its_fetcher_from_the_configured_deadlines(tmp_path: Path) -> None:
    release = Release()
    timeouts = {"UPDATE_FETCH_TIMEOUT": "7s", "UPDATE_DOWNLOAD_TIMEOUT": "9m"}
    config = config_for(tmp_path, "http://127.0.0.1:9/updates", release, **timeouts)
    fetcher = agent_check.make_fetcher(config)
    assert (fetcher.fetch_timeout, fetcher.download_timeout) == (7, 540)


# ---------------------------------------------------------------- reports


def test_a_dripping_reports_endpoint_cannot_hold_the_sender(proxy: FaultProxy) -> None:
    # The proxy's upstream has no /v1/reports route: its 404 answer is dripped back.
    proxy.inject("/v1/reports", Fault.DRIP, every=0.2, head=True, times=None)
    poster = Poster(make_token("reports-deadline-secret-0123456", "a1"), post_timeout=1.5)
    event = {"event_id": "6f1c0a4e-0000-4000-8000-000000000000", "agent_id": "a1"}
    answer = poster.post(proxy.url + "/v1/reports", [event])
    poster.close()
    assert answer.status is None and "1.5s" in answer.reason, answer
    assert proxy.wait_idle(15)
    [record] = proxy.seen("/v1/reports")
    assert record.client_gone
