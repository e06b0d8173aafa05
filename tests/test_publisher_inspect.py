"""``release`` ships only what agents can run (DESIGN section 6), and ``avika-publish inspect``.

Real agent files (tests/agent_files.py) go through the real program (``avika-publish``, a child
process). Each refusal exits 2 with one line naming the file and what is wrong, and leaves the
store exactly as it was (a release is live in it first, so "untouched" means something).
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agent.cache import BUILD_INFO
from publisher.signing import write_new_key
from tests.agent_files import ROOT, agent_files
from tests.agent_harness import dev_binary
from tests.publisher_fixtures import make_binary, proc_env, snapshot

VERSION = "2.0.0"
PUBLISH = str(Path(sys.executable).parent / "avika-publish")

pytestmark = pytest.mark.slow


class Files:
    def __init__(self, root: Path, factory: pytest.TempPathFactory) -> None:
        self.key = root / "signing.pem"
        self.public = write_new_key(self.key)
        self.other_key = root / "other.pem"
        write_new_key(self.other_key)
        files = agent_files(factory)
        self.amd64 = files.get(VERSION, self.public.b64)
        self.arm64 = files.get(VERSION, self.public.b64, "linux-arm64")
        self.keyless = files.get(VERSION, "none")


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("inspect"), tmp_path_factory)


def publish(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PUBLISH, *args], capture_output=True, text=True, env=proc_env(), timeout=120)


@pytest.fixture
def store(files: Files, tmp_path: Path) -> Path:
    """A store with release 1.0.0 live (a foreign build, published knowingly)."""
    store = tmp_path / "store"
    first = tmp_path / "first"
    make_binary(first, 4096, "1.0.0")
    done = publish(
        "release", "1.0.0", f"--binary=linux-amd64={first}", "--key", str(files.key), "--store", str(store),
        "--init", "--no-inspect",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return store


def release(
    store: Path, key: Path, version: str, *binaries: str, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    args = [
        "release",
        version,
        *(f"--binary={b}" for b in binaries),
        "--key",
        str(key),
        "--store",
        str(store),
    ]
    return publish(*args, *extra)


def test_matching_agent_files_are_published(files: Files, store: Path) -> None:
    done = release(
        store, files.key, "v" + VERSION, f"linux-amd64={files.amd64}", f"linux-arm64={files.arm64}"
    )
    assert done.returncode == 0, done.stderr
    assert "--no-inspect" not in done.stderr
    shown = json.loads(publish("show", "--store", str(store), "--json").stdout)
    assert (shown["version"], sorted(shown["binaries"])) == (VERSION, ["linux-amd64", "linux-arm64"])


def _launcher(dest: Path) -> Path:
    dev_binary(dest, VERSION)  # a development build: a Python script, not an agent file
    return dest


def _rewritten(src: Path, dest: Path, **changes: object) -> Path:
    """A copy of an agent file whose avika-build.json says something else."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dest, "w") as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename == BUILD_INFO:
                data = json.dumps({**json.loads(data), **changes}).encode()
            new.writestr(item, data)
    return dest


REFUSALS = {
    "version": (lambda f, t: (f.key, "2.0.1", [f"linux-amd64={f.amd64}"]), "is avika-agent 2.0.0, not 2.0.1"),
    "platform": (
        lambda f, t: (f.key, VERSION, [f"linux-amd64={f.arm64}", f"linux-arm64={f.amd64}"]),
        "is built for linux-amd64 but given as linux-arm64",
    ),
    "other-signing-key": (
        lambda f, t: (f.other_key, VERSION, [f"linux-amd64={f.amd64}"]),
        "none signs this release",
    ),
    "keyless": (
        lambda f, t: (f.key, VERSION, [f"linux-amd64={f.keyless}"]),
        "embeds no keys (PUBLIC_KEYS=none) and none signs this release",
    ),
    "readme": (lambda f, t: (f.key, VERSION, [f"linux-amd64={ROOT / 'README.md'}"]), "is not a zip archive"),
    "launcher": (
        lambda f, t: (f.key, VERSION, [f"linux-amd64={_launcher(t / 'dev')}"]),
        "is not a zip archive",
    ),
    "truncated": (
        lambda f, t: (f.key, VERSION, [f"linux-amd64={_truncated(f.amd64, t / 'cut')}"]),
        "not an agent build",
    ),
    "lying-metadata": (
        lambda f, t: (
            f.key,
            VERSION,
            [f"linux-arm64={_rewritten(f.amd64, t / 'liar', platform='linux-arm64')}"],
        ),
        "says linux-arm64 but carries native code for another machine",
    ),
    "another-program's-zip": (
        lambda f, t: (
            f.key,
            VERSION,
            [f"linux-amd64={_rewritten(f.amd64, t / 'other', name='something-else')}"],
        ),
        "is not an avika-agent build's",
    ),
}


def _truncated(src: Path, dest: Path) -> Path:
    dest.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dest


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_release_refuses_what_agents_cannot_run(files: Files, store: Path, tmp_path: Path, case: str) -> None:
    make, message = REFUSALS[case]
    key, version, binaries = make(files, tmp_path)
    before = snapshot(store)
    done = release(store, key, version, *binaries)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert done.stderr.startswith("avika-publish: error: ") and done.stderr.count("\n") == 1
    assert snapshot(store) == before


def test_a_foreign_build_goes_through_with_no_inspect_and_a_warning(
    files: Files, store: Path, tmp_path: Path
) -> None:
    go_agent = tmp_path / "avika-agent-go"
    go_agent.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(200))  # stand-in for a Go agent binary
    done = release(store, files.key, VERSION, f"linux-amd64={go_agent}", extra=("--no-inspect",))
    assert done.returncode == 0, done.stderr
    assert "avika-publish: note: --no-inspect:" in done.stderr and str(go_agent) in done.stderr


def test_a_dry_run_without_a_key_still_checks_version_and_platform(files: Files, store: Path) -> None:
    before = snapshot(store)
    done = publish(
        "release", "2.0.1", f"--binary=linux-amd64={files.amd64}", "--store", str(store), "--dry-run"
    )
    assert done.returncode == 2 and "not 2.0.1" in done.stderr
    trusted = ("--trusted-key", files.public.b64)  # no signing key: the store's trust is given
    done = publish(
        "release",
        VERSION,
        f"--binary=linux-amd64={files.amd64}",
        "--store",
        str(store),
        "--dry-run",
        *trusted,
    )
    assert done.returncode == 0, done.stderr
    assert snapshot(store) == before


def test_inspect_prints_the_metadata_read_without_running_the_file(files: Files) -> None:
    done = publish("inspect", str(files.arm64))
    assert done.returncode == 0, done.stderr
    lines = dict(
        line.split(None, 1)
        for line in done.stdout.splitlines()
        if not line.startswith(("key", "build", "native"))
    )
    assert (lines["version"], lines["platform"]) == (VERSION, "linux-arm64")
    assert f"key ids      {files.public.keyid}" in done.stdout
    assert "native code  " in done.stdout and " aarch64" in done.stdout
    as_json = json.loads(publish("inspect", str(files.arm64), "--json").stdout)
    assert as_json["platform"] == "linux-arm64" and as_json["key_ids"] == [files.public.keyid]
    assert as_json["pythons"] == ["3.9", "3.10", "3.11", "3.12", "3.13"]
    assert set(as_json["native"]) == {"aarch64"} and as_json["file"] == str(files.arm64)
    assert as_json["build_id"].startswith(VERSION + "-")


def test_inspect_of_something_else_exits_2_in_one_line(tmp_path: Path) -> None:
    done = publish("inspect", str(ROOT / "README.md"))
    assert (done.returncode, done.stdout) == (2, "")
    assert (
        done.stderr.count("\n") == 1 and "not an agent build" in done.stderr and "--no-inspect" in done.stderr
    )
