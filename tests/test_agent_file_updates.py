"""A real agent file updates itself on each Python it supports, and its code cache stays bounded.

``make agent-binary`` files (tests/agent_files.py) on a simulated host (tests/agent_harness.py):
``python3`` on the host's PATH is CPython 3.9, then 3.13 (the file's shebang is
``/usr/bin/env python3``); the running agent downloads each new release, smoke-tests it, swaps it
in and execs into it (same pid), and commits. After several updates the cache
(``AVIKA_AGENT_CACHE``, DESIGN section 4) holds exactly two builds, the current one and the backup,
and nothing of the smoke tests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent import cache
from agent.manifest import LocalSigner, generate_private_key
from tests.agent_files import agent_files, python3_env
from tests.agent_harness import COMMITTED_CHAIN, Host, site, wait_for

VERSIONS = ("1.0.0", "1.1.0", "1.2.0", "1.3.0")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def releases(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalSigner, dict[str, Path]]:
    signer = LocalSigner(generate_private_key())
    files = agent_files(tmp_path_factory)
    return signer, {v: files.get(v, signer.public_key.b64) for v in VERSIONS}


@pytest.mark.parametrize("python", ["3.9", "3.13"])
def test_a_built_file_updates_itself_and_keeps_two_builds(
    releases: tuple[LocalSigner, dict[str, Path]], tmp_path: Path, python: str
) -> None:
    signer, files = releases
    with site(signer) as updates:
        host = Host(tmp_path / "host", updates.url, python3_env(tmp_path / "bin", python))
        host.target.parent.mkdir(parents=True)
        shutil.copy2(files[VERSIONS[0]], host.target)
        agent = host.start()
        try:
            wait_for(lambda: host.running_version() == VERSIONS[0], 60, f"{VERSIONS[0]} to run")
            for version in VERSIONS[1:]:
                updates.release(version, files[version].read_bytes())
                wait_for(lambda v=version: "committed" in host.chain(v), 120, f"{version} to commit")
                assert host.chain(version)[-len(COMMITTED_CHAIN) :] == COMMITTED_CHAIN
                assert host.running_version() == version
            record = host.agent_record()
            assert record is not None and record["pid"] == agent.pid  # exec: the same process throughout
            assert host.pending() is None
            tag = f"cp{python.replace('.', '')}"
            root = host.dir / "cache"
            current, backup = (cache.build_id_of(files[v]) for v in VERSIONS[-1:-3:-1])
            # The commit is reported, then the cache is tidied.
            wait_for(lambda: len(list(root.iterdir())) == 2, 30, "the cache to hold two builds")
            assert sorted(p.name for p in root.iterdir()) == sorted([current, backup])
            for build_id in (current, backup):
                assert sorted(p.name for p in (root / build_id).iterdir()) == sorted([cache.BUILD_INFO, tag])
            assert cache.build_id_of(host.target) == current and cache.build_id_of(host.backup) == backup
        finally:
            host.kill_all()
