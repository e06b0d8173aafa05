"""A download bigger than a few write-back steps (agent/fetch.py's ``_WriteBack``) lands intact.

The fetcher sends what it wrote to disk while it downloads and drops it from the page cache (the
agent's cgroup counts page cache); the bytes read back from the file must be exactly the served
ones, and a resumed download (pages already dropped, read back from disk to hash) too.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from agent import fetch
from tests.agent_fixtures import LocalServer

SIZE = 3 * fetch.WRITEBACK_STEP + 12345


def test_a_download_of_several_write_back_steps_lands_intact(tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    digest = hashlib.sha256(data).hexdigest()
    with LocalServer() as server:
        server.serve("/big", data)
        out = tmp_path / "big"
        fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            result = fetch.HttpFetcher().download(server.url("/big"), fd, SIZE, digest)
        finally:
            os.close(fd)
        assert (result.size, result.sha256) == (SIZE, digest)
        assert out.read_bytes() == data
        # Resume from the middle of the second step: the first bytes are read back (from disk) and hashed.
        half = fetch.WRITEBACK_STEP + 4096
        fd = os.open(out, os.O_RDWR)
        try:
            os.ftruncate(fd, half)
            result = fetch.HttpFetcher().download(server.url("/big"), fd, SIZE, digest, resume_from=half)
        finally:
            os.close(fd)
        assert result.sha256 == digest and out.read_bytes() == data
