"""Deployment-mode detection and platform key (DESIGN section 3, contract).

- container if any of the five signals is present, else VM; each signal is reported by its
  contract name (as ``avika-agent detect --json`` prints them);
- ``DEPLOYMENT_MODE`` overrides detection and is reported as the override;
- the root and the environment are injected: the machines that run these tests are containers.
- ``platform_key``: x86_64/amd64 -> linux-amd64, aarch64/arm64 -> linux-arm64, anything else is
  an error.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import environment
from agent.environment import Detection, UnsupportedPlatform, detect, platform_key

FILE_SIGNALS = [
    "/var/run/secrets/kubernetes.io/serviceaccount",
    "/.dockerenv",
    "/run/.containerenv",
    "/run/systemd/container",
]


def create(root: Path, signal: str, *, directory: bool = False) -> None:
    path = root / signal.lstrip("/")
    if directory:
        path.mkdir(parents=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("docker\n")


def test_an_empty_root_and_environment_is_a_vm(tmp_path: Path) -> None:
    detection = detect(root=tmp_path, environ={})
    assert detection == Detection(mode="vm", signals=[], override=None)
    assert detection.to_dict() == {"mode": "vm", "signals": [], "override": None}


@pytest.mark.parametrize("signal", FILE_SIGNALS, ids=lambda s: f"{s} alone means container")
def test_each_file_signal_alone_means_container(tmp_path: Path, signal: str) -> None:
    create(tmp_path, signal, directory=signal.endswith("serviceaccount"))
    detection = detect(root=tmp_path, environ={})
    assert detection.mode == "container"
    assert detection.signals == [signal]


def test_kubernetes_service_host_alone_means_container(tmp_path: Path) -> None:
    detection = detect(root=tmp_path, environ={"KUBERNETES_SERVICE_HOST": "10.96.0.1"})
    assert detection.mode == "container"
    assert detection.signals == ["KUBERNETES_SERVICE_HOST"]


def test_an_empty_kubernetes_service_host_is_no_signal(tmp_path: Path) -> None:
    # As the seed's Go: os.Getenv(...) != "".
    assert detect(root=tmp_path, environ={"KUBERNETES_SERVICE_HOST": ""}).mode == "vm"


def test_signals_accumulate_one_by_one_in_contract_order(tmp_path: Path) -> None:
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    expected = ["KUBERNETES_SERVICE_HOST"]
    for signal in FILE_SIGNALS:
        create(tmp_path, signal)
        expected.append(signal)
        assert detect(root=tmp_path, environ=environ).to_dict() == {
            "mode": "container",
            "signals": expected,
            "override": None,
        }


def test_a_dangling_symlink_still_counts_as_a_signal(tmp_path: Path) -> None:
    (tmp_path / ".dockerenv").symlink_to(tmp_path / "nowhere")
    assert detect(root=tmp_path, environ={}).signals == ["/.dockerenv"]


def test_other_files_and_variables_are_no_signals(tmp_path: Path) -> None:
    create(tmp_path, "/run/.dockerenv")
    create(tmp_path, "/var/run/secrets/other")
    detection = detect(
        root=tmp_path, environ={"KUBERNETES_PORT": "tcp://10.96.0.1:443", "container": "podman"}
    )
    assert detection.mode == "vm"
    assert detection.signals == []


@pytest.mark.parametrize(
    ("override", "signals", "mode"),
    [
        pytest.param("vm", True, "vm", id="vm override wins over container signals"),
        pytest.param("container", False, "container", id="container override wins on a bare host"),
        pytest.param("container", True, "container", id="container override agrees with the signals"),
        pytest.param("vm", False, "vm", id="vm override agrees with a bare host"),
    ],
)
def test_the_override_wins_and_is_reported(tmp_path: Path, override: str, signals: bool, mode: str) -> None:
    environ = {}
    if signals:
        create(tmp_path, "/.dockerenv")
        environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    detection = detect(override=override, root=tmp_path, environ=environ)
    assert detection.mode == mode
    assert detection.override == override
    # The signals are still reported, so `detect` can say why the override matters.
    assert detection.signals == (["KUBERNETES_SERVICE_HOST", "/.dockerenv"] if signals else [])


@pytest.mark.parametrize(
    ("machine", "key"),
    [
        ("x86_64", "linux-amd64"),
        ("amd64", "linux-amd64"),
        ("AMD64", "linux-amd64"),
        ("aarch64", "linux-arm64"),
        ("arm64", "linux-arm64"),
    ],
)
def test_platform_key_maps_machines_to_manifest_keys(machine: str, key: str) -> None:
    assert platform_key(machine) == key


@pytest.mark.parametrize("machine", ["riscv64", "i686", "armv7l", "ppc64le", "s390x", ""])
def test_an_unsupported_machine_is_an_error(machine: str) -> None:
    with pytest.raises(UnsupportedPlatform) as caught:
        platform_key(machine)
    assert repr(machine) in str(caught.value)
    assert caught.value.code == "unsupported_platform"


def test_platform_key_defaults_to_this_hosts_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(environment._platform, "machine", lambda: "aarch64")
    assert platform_key() == "linux-arm64"
    monkeypatch.setattr(environment._platform, "machine", lambda: "riscv64")
    with pytest.raises(UnsupportedPlatform):
        platform_key()
