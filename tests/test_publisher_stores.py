"""The store interface (publisher/stores.py): one suite, run over every implementation.

Rules: create-only writes never replace and have exactly one winner under concurrency; a given
sha256 is enforced while copying; mutable writes are atomic and compare-and-swap on a token;
keys never escape the store; listings skip hidden and temporary files. The S3 store runs the same
suite over moto (``moto_s3_store`` in tests/test_publisher_s3.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from publisher.errors import Refused
from publisher.store_url import open_reader, open_store
from publisher.stores import (
    ANY,
    CHUNK,
    AlreadyExists,
    Conflict,
    DirStore,
    NotFound,
    Store,
    StoreError,
    archive_serial,
    object_headers,
    parse_binary_key,
)
from tests.publisher_fixtures import make_binary, sha256, snapshot
from tests.test_publisher_s3 import moto_s3_store


@pytest.fixture(params=["dir", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    if request.param == "s3":
        with moto_s3_store(monkeypatch) as s3:
            yield s3
        return
    yield DirStore(tmp_path / "store")


def test_missing_key_reads_as_none(store: Store) -> None:
    assert store.read("manifest.json") is None
    assert store.read_versioned("manifest.json").token is None
    assert store.size("manifest.json") is None
    assert not store.exists("manifest.json")
    assert store.list("manifests/") == []


def test_put_immutable_creates_once_and_never_replaces(store: Store) -> None:
    store.put_immutable("manifests/1.json", b"first")
    with pytest.raises(AlreadyExists):
        store.put_immutable("manifests/1.json", b"second")
    assert store.read("manifests/1.json") == b"first"
    assert store.size("manifests/1.json") == 5


def test_put_immutable_streams_a_file_and_enforces_its_sha256(store: Store, tmp_path: Path) -> None:
    data = make_binary(tmp_path / "bin", 3 * CHUNK + 17, "big")
    chunks: list[int] = []
    store.put_immutable(
        "binaries/1.0/x/avika-agent-a", tmp_path / "bin", sha256=sha256(data), progress=chunks.append
    )
    assert store.read("binaries/1.0/x/avika-agent-a") == data
    assert sum(chunks) == len(data) and max(chunks) <= CHUNK  # streamed, never read whole


def test_content_that_does_not_match_its_sha256_is_never_stored(store: Store, tmp_path: Path) -> None:
    make_binary(tmp_path / "bin", 4096, "one")
    with pytest.raises(StoreError, match="changed while it was uploaded"):
        store.put_immutable("binaries/1.0/x/avika-agent-a", tmp_path / "bin", sha256="0" * 64)
    assert not store.exists("binaries/1.0/x/avika-agent-a")
    if isinstance(store, DirStore):
        assert snapshot(store.root) == {}  # no temporary file left behind
    else:
        assert store.list("") == []


def test_concurrent_create_only_writes_have_exactly_one_winner(store: Store) -> None:
    contenders = 8
    barrier = threading.Barrier(contenders)
    results: dict[int, str] = {}

    def contend(i: int) -> None:
        barrier.wait()
        try:
            store.put_immutable("manifests/5.json", f"writer {i}".encode())
            results[i] = "won"
        except AlreadyExists:
            results[i] = "lost"

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in results.items() if r == "won"]
    assert len(results) == contenders and len(winners) == 1
    assert store.read("manifests/5.json") == f"writer {winners[0]}".encode()


def test_put_mutable_is_a_compare_and_swap_on_the_token(store: Store) -> None:
    with pytest.raises(Conflict):  # expected to exist, does not
        store.put_mutable("manifest.json", b"x", if_match="0" * 64)
    store.put_mutable("manifest.json", b"one", if_match=None)  # None: only if absent
    first = store.read_versioned("manifest.json")
    assert first.data == b"one" and first.token is not None
    with pytest.raises(Conflict):
        store.put_mutable("manifest.json", b"again", if_match=None)
    store.put_mutable("manifest.json", b"two", if_match=first.token)
    with pytest.raises(Conflict):  # stale token: someone else's write landed in between
        store.put_mutable("manifest.json", b"three", if_match=first.token)
    assert store.read("manifest.json") == b"two"
    store.put_mutable("manifest.json", b"four", if_match=ANY)
    assert store.read("manifest.json") == b"four"


def test_list_gives_keys_under_a_prefix_sorted_without_hidden_files(store: Store) -> None:
    for key in ("manifests/2.json", "manifests/10.json", "manifest.json", "binaries/1.0/a/avika-agent-x"):
        store.put_immutable(key, b"x")
    store.put_mutable("helm-values.yaml", b"y")  # creates the hidden lock file
    assert store.list("manifests/") == ["manifests/10.json", "manifests/2.json"]
    assert store.list("manifest") == ["manifest.json", "manifests/10.json", "manifests/2.json"]
    assert store.list("binaries/1.0/") == ["binaries/1.0/a/avika-agent-x"]
    assert ".avika-publish.lock" not in store.list("")


@pytest.mark.parametrize(
    "key", ["../escape", "a/../../escape", "/etc/passwd", ".hidden", "a//b", "a/./b", ""]
)
def test_keys_never_escape_the_store(store: Store, key: str) -> None:
    with pytest.raises(StoreError, match="invalid store key"):
        store.put_immutable(key, b"x")


def test_stream_yields_bounded_chunks_and_missing_is_not_found(store: Store) -> None:
    data = bytes(range(256)) * (CHUNK // 128)  # 2 MiB
    store.put_immutable("binaries/v/s/avika-agent-p", data)
    chunks = list(store.stream("binaries/v/s/avika-agent-p"))
    assert b"".join(chunks) == data and all(len(c) <= CHUNK for c in chunks)
    with pytest.raises(NotFound):
        list(store.stream("binaries/v/s/avika-agent-missing"))


def test_open_store_accepts_file_urls_and_plain_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    by_url = open_store(f"file://{tmp_path}/updates")
    assert isinstance(by_url, DirStore) and by_url.root == tmp_path / "updates"
    monkeypatch.chdir(tmp_path)
    by_path = open_store("updates")
    assert isinstance(by_path, DirStore) and by_path.root == tmp_path / "updates"


@pytest.mark.parametrize(
    "url, message",
    [
        ("s3:///prefix", "no bucket"),
        ("file://otherhost/srv/updates", "file:///absolute/path"),
        ("file:relative", "file:///absolute/path"),
        ("https://cdn.example.com/updates", "read-only"),
        ("ftp://host/x", "unsupported scheme"),
    ],
)
def test_open_store_refuses_what_it_cannot_publish_to(url: str, message: str) -> None:
    with pytest.raises(Refused, match=message) as info:
        open_store(url)
    assert info.value.exit_code == 2


def test_open_reader_prefers_url_and_strips_manifest_json() -> None:
    reader = open_reader("./updates", "http://127.0.0.1:1/updates/manifest.json")
    assert reader.location == "http://127.0.0.1:1/updates"
    with pytest.raises(Refused):
        open_reader(None, "file:///srv/updates")


@pytest.mark.parametrize(
    "key, content_type, cache_control",
    [
        ("manifest.json", "application/json", "public, max-age=60"),
        ("helm-values.yaml", "application/yaml", "public, max-age=60"),
        ("manifests/42.json", "application/json", "public, max-age=31536000, immutable"),
        ("binaries/0.1.44/" + "a" * 64 + "/avika-agent-linux-amd64", "application/octet-stream",
         "public, max-age=31536000, immutable"),
        ("notes.txt", "application/octet-stream", "no-cache"),
    ],
)  # fmt: skip
def test_object_headers_follow_the_layout_table(key: str, content_type: str, cache_control: str) -> None:
    assert object_headers(key) == (content_type, cache_control)


def test_layout_key_parsers() -> None:
    assert archive_serial("manifests/42.json") == 42
    assert archive_serial("manifests/042.json") is None
    assert archive_serial("manifests/x.json") is None
    assert archive_serial("manifests/.42.json.tmp") is None
    sha = "b" * 64
    assert parse_binary_key(f"binaries/0.1.44/{sha}/avika-agent-linux-arm64") == (
        "0.1.44",
        sha,
        "linux-arm64",
    )
    assert parse_binary_key(f"binaries/0.1.44/{sha}/other") is None
