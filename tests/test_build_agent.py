"""packaging/build_agent.py's parts on data, and the file's entry point refusing hosts it cannot run on.

The whole build is tests/test_agent_binary.py; here the pieces that decide what goes into the
file: which of ``infra/`` the agent imports, extension module names, wheels' paths, ELF machines,
and ``packaging/agent_main.py`` (the archive's ``__main__``) run under a real interpreter with a
BUILD it cannot satisfy.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "packaging"))

import build_agent  # noqa: E402


def test_the_file_holds_the_infra_modules_the_agent_imports_when_it_starts() -> None:
    files = {p.as_posix() for p in build_agent.app_files()}
    assert {"agent/cli.py", "agent/cache.py", "infra/reports/validation.py"} <= files
    assert {"infra/__init__.py", "infra/reports/__init__.py"} <= files
    # Imported only inside functions or under TYPE_CHECKING: not the agent's (boto3 behind them);
    # the endpoint and its stores are the server's (the agent needs only the report rules).
    server = ("dynamodb", "handler", "core", "store", "auth")
    assert not [f"infra/reports/{name}.py" for name in server if f"infra/reports/{name}.py" in files]
    assert "agent/_embedded.py" not in files


@pytest.mark.parametrize(
    ("relative", "module"),
    [
        ("_cffi_backend.cpython-39-x86_64-linux-gnu.so", "_cffi_backend"),
        ("cryptography/hazmat/bindings/_rust.abi3.so", "cryptography.hazmat.bindings._rust"),
        ("pkg/fast.cpython-313-aarch64-linux-gnu.so", "pkg.fast"),
        ("cffi.libs/libffi-abc.so.8.1.2", None),  # a vendored library, not a module
        ("pkg/README.txt", None),
    ],
)
def test_extension_module_names(relative: str, module: str | None) -> None:
    assert build_agent.module_name(relative) == module


def test_a_wheel_with_a_path_out_of_site_packages_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("evil/__init__.py", "")
        zf.writestr("evil-1.0.data/purelib/../../../escape.py", "")
    with pytest.raises(build_agent.BuildError, match="unsafe path"):
        build_agent._unpack_wheel(wheel, tmp_path / "site")
    assert not (tmp_path / "escape.py").exists()


def test_data_files_of_a_wheel_are_left_out_and_purelib_is_kept(tmp_path: Path) -> None:
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
        zf.writestr("pkg-1.0.data/purelib/extra.py", "")
        zf.writestr("pkg-1.0.data/scripts/tool", "#!/bin/sh\n")
    build_agent._unpack_wheel(wheel, tmp_path / "site")
    assert sorted(p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("*.py")) == [
        "extra.py",
        "pkg/__init__.py",
    ]


def test_native_code_for_another_machine_fails_the_build() -> None:
    x86 = b"\x7fELF" + bytes(14) + (62).to_bytes(2, "little")
    arm = b"\x7fELF" + bytes(14) + (183).to_bytes(2, "little")
    build_agent.check_natives("linux-amd64", {"a.so": x86})
    with pytest.raises(build_agent.BuildError, match=r"not aarch64 in the linux-arm64 build: a\.so$"):
        build_agent.check_natives("linux-arm64", {"a.so": x86, "b.so": arm})


def test_a_missing_interpreter_is_named() -> None:
    with pytest.raises(build_agent.BuildError, match=r"no working CPython 2\.99 found .*--python X\.Y=PATH"):
        build_agent.find_interpreters(["2.99"])
    with pytest.raises(build_agent.BuildError, match=r"no working CPython 3\.9 found"):
        build_agent.find_interpreters(["3.9"], {"3.9": sys.executable})  # not a 3.9


BUILD = {
    "name": "avika-agent",
    "version": "1.2.3",
    "platform": "linux-amd64",
    "build_id": "1.2.3-0123456789abcdef",
    "pythons": ["3.9", "3.10", "3.11", "3.12", "3.13"],
    "glibc": [2, 17],
    "machines": ["amd64", "x86_64"],
    "tags": {f"cp{sys.version_info[0]}{sys.version_info[1]}": {}},
}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"glibc": [9, 99]}, "avika-agent 1.2.3 (linux-amd64) needs glibc >= 9.99; this host has glibc 2."),
        (
            {"machines": ["riscv64"]},
            "avika-agent 1.2.3 (linux-amd64) is for linux-amd64 hosts; this one is linux ",
        ),
        (
            {"tags": {}},
            "avika-agent 1.2.3 (linux-amd64) runs on CPython 3.9, 3.10, 3.11, 3.12 or 3.13; this is ",
        ),
    ],
    ids=["old-glibc", "other-machine", "other-python"],
)
def test_the_entry_point_refuses_a_host_in_one_line(tmp_path: Path, changes: dict, message: str) -> None:
    main = tmp_path / "__main__.py"
    main.write_bytes(build_agent.render_main({**BUILD, **changes}))
    done = subprocess.run([sys.executable, str(main), "version"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(message), done.stderr


def test_the_entry_point_template_keeps_its_placeholder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "agent_main.py"
    broken.write_text("BUILD = None\n")
    monkeypatch.setattr(build_agent, "MAIN_TEMPLATE", broken)
    with pytest.raises(build_agent.BuildError, match=re.escape("lost its `BUILD = {}")):
        build_agent.render_main(BUILD)
