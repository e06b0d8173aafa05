"""agent/cache.py: where an agent file unpacks its code, and keeping that place bounded (DESIGN 4).

Unit tests on real directories, zip archives and processes, without building an agent file (that
is tests/test_agent_binary.py): a small archive in the agent file's layout, holding a module in
``site.zip`` and a real extension module of this interpreter, is booted in child processes. Also
the install steps that use the cache: the pre-flight counts the unpacked code's space, and the
smoke test leaves nothing behind. Runs under every Python an agent file supports (``make test``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from agent import cache, install

TAG = f"cp{sys.version_info[0]}{sys.version_info[1]}"
BUILD_ID = "1.2.3-0123456789abcdef"
OTHER_ID = "1.2.4-fedcba9876543210"
ROOT = Path(__file__).resolve().parent.parent


def extension() -> Path:
    spec = importlib.util.find_spec("xxlimited")
    if spec is None or spec.origin is None or not spec.origin.endswith(".so"):
        pytest.skip("this interpreter has no xxlimited extension module to stand in for native code")
    return Path(spec.origin)


def small_zip(files: dict[str, str]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as inner:
        for name, text in files.items():
            inner.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), text)
    return out.getvalue()


DEPS = "DEP = 'hello from deps.zip'\n"


def make_archive(path: Path, build_id: str = BUILD_ID, deps: str = DEPS) -> dict[str, Any]:
    """An archive in the agent file's layout: ``hello`` in site.zip, ``dep`` in the dependencies'
    zip (a blob named by content, as the native library), ``fake.xxlimited`` native."""
    so = extension()
    site = small_zip({"hello.py": "GREETING = 'hello from site.zip'\n", "fake/__init__.py": ""})
    dep_zip = small_zip({"dep.py": deps})
    dep_blob = f"{cache.DEPS_BLOBS}/{hashlib.sha256(dep_zip).hexdigest()[:32]}"
    relative = f"fake/{so.name}"
    part = {"deps": dep_blob, "natives": {relative: "native/blob"}, "modules": {"fake.xxlimited": relative}}
    build = {"build_id": build_id, "tags": {TAG: {**part, "bytes": 1}}}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(cache.BUILD_INFO, json.dumps({"schema": 1, "build_id": build_id}))
        archive.writestr(f"{TAG}/{cache.SITE}", site)
        archive.writestr(dep_blob, dep_zip)
        archive.writestr("native/blob", so.read_bytes())
    return build


BOOT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {root!r})
    from agent import cache
    facts = cache.boot({archive!r}, json.loads({build!r}), {{"AVIKA_AGENT_CACHE": {cache_root!r}}})
    import hello, dep, fake.xxlimited
    print(json.dumps([facts, hello.GREETING, fake.xxlimited.__file__, {archive!r} in sys.path, dep.DEP]))
    """
)


def boot(archive: Path, build: dict[str, Any], root: Path, **popen: Any) -> subprocess.Popen[str]:
    code = BOOT.format(root=str(ROOT), archive=str(archive), build=json.dumps(build), cache_root=str(root))
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


@pytest.fixture
def booted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """This process as if started from an agent file whose cache root is ``tmp_path/root``."""
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    module = ModuleType(cache.BOOT_MODULE)
    module.BOOTED = {"root": str(root), "build_id": BUILD_ID, "tag": TAG, "archive": "x", "bytes": 1000}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, cache.BOOT_MODULE, module)
    return root


# ---------------------------------------------------------------- where


def test_the_root_is_the_environment_s_else_var_cache_else_the_user_s() -> None:
    assert cache.candidates({"AVIKA_AGENT_CACHE": "/srv/c", "HOME": "/h"}) == [Path("/srv/c")]
    assert cache.candidates({"HOME": "/h"}) == [Path("/var/cache/avika-agent"), Path("/h/.cache/avika-agent")]
    assert cache.candidates({"HOME": "/h", "XDG_CACHE_HOME": "/x"})[1] == Path("/x/avika-agent")


def test_an_unusable_system_root_falls_back_to_the_user_s(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    system = tmp_path / "var-cache"
    system.mkdir()
    if os.geteuid() == 0:
        os.chown(system, 65534, 65534)  # someone else's directory
        assert cache.unusable(system) == "owned by uid 65534, not by this user (0)"
    else:
        system.chmod(0o500)
        system = system / "avika-agent"  # cannot be created
    monkeypatch.setattr(cache, "SYSTEM_ROOT", system)
    root = cache.cache_root({"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert root == tmp_path / "xdg" / "avika-agent" and root.is_dir()
    assert (root.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_root_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    # The cache holds code the agent runs (as root): writable by others means run by anyone.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(cache.CacheError) as caught:
        cache.cache_root({"AVIKA_AGENT_CACHE": str(shared)})
    assert f"{shared}: writable by others (mode {mode:o})" in str(caught.value)
    assert "set AVIKA_AGENT_CACHE" in str(caught.value)


def test_a_file_where_the_root_should_be_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(cache.CacheError, match=r"file: .*File exists"):
        cache.cache_root({"AVIKA_AGENT_CACHE": str(tmp_path / "file")})


# ---------------------------------------------------------------- unpack and import


def test_boot_unpacks_once_and_imports_from_the_cache_not_the_file(tmp_path: Path) -> None:
    archive = tmp_path / "agent.zip"
    build = make_archive(archive)
    root = tmp_path / "cache"
    out, err = boot(archive, build, root).communicate(timeout=60)
    facts, greeting, native, archive_on_path, dep = json.loads(out or err)
    home = root / BUILD_ID / TAG
    assert (greeting, dep) == ("hello from site.zip", "hello from deps.zip")
    assert native == str(home / "native" / "fake" / extension().name)
    assert not archive_on_path
    assert facts == {"root": str(root), "build_id": BUILD_ID, "tag": TAG, "archive": str(archive), "bytes": 1}
    assert json.loads((root / BUILD_ID / cache.BUILD_INFO).read_text())["build_id"] == BUILD_ID
    site = (home / cache.SITE).stat()
    # The file may now change (an update replaces it): a second start does not read it again.
    archive.write_bytes(b"not a zip any more")
    out, err = boot(archive, build, root).communicate(timeout=60)
    assert json.loads(out or err)[1] == "hello from site.zip", err
    assert (home / cache.SITE).stat().st_ino == site.st_ino
    assert sorted(p.name for p in root.iterdir()) == [BUILD_ID]


def test_concurrent_first_starts_unpack_one_build(tmp_path: Path) -> None:
    archive = tmp_path / "agent.zip"
    build = make_archive(archive)
    root = tmp_path / "cache"
    procs = [boot(archive, build, root) for _ in range(4)]
    results = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert sorted(p.name for p in root.iterdir()) == [BUILD_ID]
    assert sorted(p.name for p in (root / BUILD_ID).iterdir()) == [cache.BUILD_INFO, TAG]


def test_a_killed_unpack_leaves_nothing_a_start_or_a_prune_trips_on(tmp_path: Path) -> None:
    archive = tmp_path / "agent.zip"
    build = make_archive(archive)
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = root / f"{cache.TMP_PREFIX}{int(dead.stdout)}-abc"  # a half-written unpack of a dead pid
    (stale / "native").mkdir(parents=True)
    (stale / cache.SITE).write_bytes(b"PK\x03\x04 half")
    (root / BUILD_ID).mkdir()  # its build dir, never completed
    out, err = boot(archive, build, root).communicate(timeout=60)
    assert json.loads(out or err)[1] == "hello from site.zip", err
    assert cache.prune(root, {BUILD_ID}) == [stale.name]
    assert sorted(p.name for p in root.iterdir()) == [BUILD_ID]


def test_a_build_with_the_same_dependencies_links_them(tmp_path: Path) -> None:
    # The common update changes the agent, not cryptography: its 15 MB library and the 3 MB of
    # dependencies' bytecode are not inflated again (the smoke test's time, the cache's size).
    root = tmp_path / "cache"
    first, second = tmp_path / "a.zip", tmp_path / "b.zip"
    build_a, build_b = make_archive(first, BUILD_ID), make_archive(second, OTHER_ID)
    for archive, build in ((first, build_a), (second, build_b)):
        out, err = boot(archive, build, root).communicate(timeout=60)
        assert json.loads(out or err)[1::3] == ["hello from site.zip", "hello from deps.zip"], err
    relative = f"native/fake/{extension().name}"
    a, b = (root / build_id / TAG / relative for build_id in (BUILD_ID, OTHER_ID))
    assert a.stat().st_ino == b.stat().st_ino and a.read_bytes() == extension().read_bytes()
    deps_a, deps_b = (root / build_id / TAG / cache.DEPS for build_id in (BUILD_ID, OTHER_ID))
    assert deps_a.stat().st_ino == deps_b.stat().st_ino
    site_a, site_b = (root / build_id / TAG / cache.SITE for build_id in (BUILD_ID, OTHER_ID))
    assert site_a.stat().st_ino != site_b.stat().st_ino  # the agent's own code: each build's
    # A smoke test's private root links from the root it sits in; a damaged donor is not used.
    private = root / f"{cache.PRIVATE_PREFIX}1-x"
    private.mkdir()
    cache.unpack(str(second), build_b, TAG, private)
    assert (private / OTHER_ID / TAG / relative).stat().st_ino == a.stat().st_ino
    os.truncate(a, 10)  # (both names: one inode)
    third = tmp_path / "c.zip"
    build_c = make_archive(third, "1.2.5-abababababababab")
    cache.unpack(str(third), build_c, TAG, root)
    fresh = root / "1.2.5-abababababababab" / TAG / relative
    assert fresh.stat().st_ino != a.stat().st_ino and fresh.read_bytes() == extension().read_bytes()


def test_changed_dependencies_are_unpacked_not_linked(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    first, second = tmp_path / "a.zip", tmp_path / "b.zip"
    build_a = make_archive(first, BUILD_ID)
    build_b = make_archive(second, OTHER_ID, deps="DEP = 'a newer dependency'\n")
    for archive, build in ((first, build_a), (second, build_b)):
        assert boot(archive, build, root).wait(timeout=60) == 0
    out, err = boot(second, build_b, root).communicate(timeout=60)
    assert json.loads(out or err)[4] == "a newer dependency", err
    deps_a, deps_b = (root / build_id / TAG / cache.DEPS for build_id in (BUILD_ID, OTHER_ID))
    assert deps_a.stat().st_ino != deps_b.stat().st_ino and deps_a.stat().st_nlink == 1


def test_an_index_cannot_point_a_link_outside_its_build(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    first, second = tmp_path / "a.zip", tmp_path / "b.zip"
    build_a, build_b = make_archive(first, BUILD_ID), make_archive(second, OTHER_ID)
    assert boot(first, build_a, root).wait(timeout=60) == 0
    outside = tmp_path / "outside.zip"
    outside.write_bytes((root / BUILD_ID / TAG / cache.DEPS).read_bytes())
    index = root / BUILD_ID / TAG / cache.BLOBS_INDEX
    entries = json.loads(index.read_text())
    entries = {f"../../../{outside.name}" if k == cache.DEPS else k: v for k, v in entries.items()}
    index.write_text(json.dumps(entries))
    assert boot(second, build_b, root).wait(timeout=60) == 0
    assert (root / OTHER_ID / TAG / cache.DEPS).stat().st_ino != outside.stat().st_ino


def test_a_private_root_is_unpacked_without_fsync_a_real_one_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A smoke test's unpacking is thrown away or made durable by adopt(): fsyncs there are waste
    # on the update's critical path. A real root's build must survive a power cut.
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    archive = tmp_path / "a.zip"
    build = make_archive(archive)
    private = tmp_path / "root" / f"{cache.PRIVATE_PREFIX}1-x"
    private.mkdir(parents=True)
    cache.unpack(str(archive), build, TAG, private)
    assert (private / BUILD_ID / cache.BUILD_INFO).is_file() and synced == []
    cache.unpack(str(archive), build, TAG, tmp_path / "root")
    assert len(synced) >= 5  # build info, site.zip, deps.zip, the native library, the directories


def test_an_unwritable_cache_is_one_error_naming_it(tmp_path: Path) -> None:
    archive = tmp_path / "agent.zip"
    build = make_archive(archive)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    proc = boot(archive, build, shared)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "CacheError" in err and "writable by others" in err


# ---------------------------------------------------------------- metadata


def test_read_build_info_names_what_is_wrong(tmp_path: Path) -> None:
    (tmp_path / "text").write_text("#!/bin/sh\necho 1.0\n")
    with zipfile.ZipFile(tmp_path / "bare.zip", "w") as zf:
        zf.writestr("__main__.py", "")
    with zipfile.ZipFile(tmp_path / "list.zip", "w") as zf:
        zf.writestr(cache.BUILD_INFO, "[1]")
    with zipfile.ZipFile(tmp_path / "junk.zip", "w") as zf:
        zf.writestr(cache.BUILD_INFO, "{not json")
    for name, message in [
        ("text", "is not a zip archive"),
        ("bare.zip", f"without {cache.BUILD_INFO}"),
        ("list.zip", "not a JSON object"),
        ("junk.zip", "is not JSON"),
    ]:
        with pytest.raises(ValueError, match=message):
            cache.read_build_info(tmp_path / name)
        assert cache.build_id_of(tmp_path / name) is None
    make_archive(tmp_path / "agent.zip")
    assert cache.build_id_of(tmp_path / "agent.zip") == BUILD_ID
    assert cache.build_id_of(tmp_path / "missing") is None


# ---------------------------------------------------------------- keeping it small


def test_prune_keeps_what_it_is_told_and_temporary_dirs_in_use(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for name in (BUILD_ID, OTHER_ID, "0.9-aaaaaaaaaaaaaaaa"):
        (root / name / TAG).mkdir(parents=True)
    (root / "old-style").mkdir()
    (root / "old-style" / cache.BUILD_INFO).write_text("{}")  # a build dir by its metadata
    live = root / f"{cache.TMP_PREFIX}{os.getpid()}-live"
    dead = root / f"{cache.PRIVATE_PREFIX}999999999-gone"
    old = root / f"{cache.TMP_PREFIX}{os.getpid()}-old"
    for path in (live, dead, old):
        path.mkdir()
    os.utime(old, (time.time() - 2 * cache.STALE_AFTER,) * 2)  # our pid, but too old to be ours
    (root / "notes").mkdir()  # not ours: a root pointed at a shared directory loses nothing else
    (root / "README").write_text("not ours")
    removed = cache.prune(root, {BUILD_ID})
    assert sorted(removed) == sorted([OTHER_ID, "0.9-aaaaaaaaaaaaaaaa", "old-style", dead.name, old.name])
    assert sorted(p.name for p in root.iterdir()) == sorted([BUILD_ID, live.name, "notes", "README"])


def test_prune_builds_keeps_the_target_and_the_backup(booted: Path, tmp_path: Path) -> None:
    target, backup = tmp_path / "avika-agent", tmp_path / "avika-agent.backup"
    make_archive(target, OTHER_ID)
    make_archive(backup, "1.2.2-1111111111111111")
    for name in (BUILD_ID, OTHER_ID, "1.2.2-1111111111111111", "1.2.1-2222222222222222"):
        (booted / name / TAG).mkdir(parents=True)
    assert sorted(cache.prune_builds(target, backup)) == ["1.2.1-2222222222222222", BUILD_ID]
    assert sorted(p.name for p in booted.iterdir()) == ["1.2.2-1111111111111111", OTHER_ID]


def test_prune_builds_keeps_its_own_build_when_the_target_is_another_program(
    booted: Path, tmp_path: Path
) -> None:
    target = tmp_path / "go-agent"
    target.write_bytes(b"\x7fELF not a zip")
    for name in (BUILD_ID, OTHER_ID):
        (booted / name).mkdir()
    assert cache.prune_builds(target, tmp_path / "go-agent.backup") == [OTHER_ID]
    assert [p.name for p in booted.iterdir()] == [BUILD_ID]


def test_prune_builds_does_nothing_outside_an_agent_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, cache.BOOT_MODULE, raising=False)
    monkeypatch.setenv("AVIKA_AGENT_CACHE", str(tmp_path))
    (tmp_path / OTHER_ID).mkdir()
    assert cache.booted() is None
    assert cache.prune_builds(tmp_path / "t", tmp_path / "t.backup") == []
    assert [p.name for p in tmp_path.iterdir()] == [OTHER_ID]


def test_the_private_root_is_gone_after_the_block_whatever_happened(booted: Path) -> None:
    with pytest.raises(RuntimeError), cache.private_root() as private:
        assert private.parent == booted and private.name.startswith(cache.PRIVATE_PREFIX)
        (private / BUILD_ID / TAG).mkdir(parents=True)
        raise RuntimeError("the smoke test blew up")
    assert list(booted.iterdir()) == []


# ---------------------------------------------------------------- the install steps that use it


def fake_agent_file(path: Path, version: str) -> None:
    """A staged "agent file": a shell script that unpacks into its cache root as a real one would
    and answers ``version``, with an agent file's metadata appended (a zip after a script is still
    a zip archive)."""
    script = (
        "#!/bin/sh\n"
        f'mkdir -p "$AVIKA_AGENT_CACHE/{OTHER_ID}/{TAG}"\n'
        f'echo code > "$AVIKA_AGENT_CACHE/{OTHER_ID}/{TAG}/site.zip"\n'
        'echo "$AVIKA_AGENT_CACHE" > "$(dirname "$0")/cache-it-saw"\n'
        f"echo {version}\n"
        "exit 0\n"
    )
    make_archive(path.with_suffix(".zip"), OTHER_ID)
    path.write_bytes(script.encode() + path.with_suffix(".zip").read_bytes())
    path.chmod(0o755)


@pytest.mark.parametrize("printed", ["2.0.0", "1.9.9"], ids=["passes", "fails"])
def test_the_smoke_test_leaves_nothing_behind_but_a_passing_build_s_code(
    booted: Path, tmp_path: Path, printed: str
) -> None:
    staged = tmp_path / "bin" / ".avika-agent.avika-staged.2.0.0.1"
    staged.parent.mkdir()
    fake_agent_file(staged, printed)
    assert cache.build_id_of(staged) == OTHER_ID
    if printed == "2.0.0":
        install.smoke_test(staged, "2.0.0")
    else:
        with pytest.raises(install.SmokeTestFailed):
            install.smoke_test(staged, "2.0.0")
    seen = Path((staged.parent / "cache-it-saw").read_text().strip())
    assert seen.parent == booted and seen.name.startswith(
        cache.PRIVATE_PREFIX
    )  # where the pre-flight counted
    if printed == "2.0.0":  # kept as the staged build's code: its first start unpacks nothing
        assert [p.name for p in booted.iterdir()] == [OTHER_ID]
        assert (booted / OTHER_ID / TAG / cache.SITE).read_text() == "code\n"
    else:
        assert list(booted.iterdir()) == []


def test_adopt_adds_a_python_to_a_build_already_there(booted: Path, tmp_path: Path) -> None:
    (booted / OTHER_ID / "cp39").mkdir(parents=True)
    private = booted / f"{cache.PRIVATE_PREFIX}1-x"
    (private / OTHER_ID / TAG).mkdir(parents=True)
    (private / OTHER_ID / TAG / cache.SITE).write_text("code")
    assert cache.adopt(private, OTHER_ID)
    assert sorted(p.name for p in (booted / OTHER_ID).iterdir()) == sorted({"cp39", TAG})
    assert not cache.adopt(private, None) and not cache.adopt(private, "1.0-0000000000000000")


def test_the_preflight_counts_the_unpacked_code(
    booted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "avika-agent"
    target.write_text("old")
    free = install.free_bytes(tmp_path)
    assert install.preflight(target, 1000, owner_of=lambda p: None) == target  # this build's 1000 bytes fit
    with pytest.raises(install.InsufficientSpace) as caught:
        install.preflight(target, 1000, owner_of=lambda p: None, unpacked=(booted, free))
    assert f"its unpacked code in {booted} about {free}" in caught.value.message
    assert "the new binary needs 1000" in caught.value.message  # same filesystem: both counted
    # Either part alone fits; only their sum does not.
    monkeypatch.setattr(install, "free_bytes", lambda where: 3000 + install.SPACE_MARGIN)
    install.preflight(target, 2000, owner_of=lambda p: None, unpacked=(booted, 1000))
    with pytest.raises(install.InsufficientSpace):
        install.preflight(target, 2000, owner_of=lambda p: None, unpacked=(booted, 1001))
    install.preflight(target, 3000, owner_of=lambda p: None, unpacked=None)  # not an agent file: binary only
