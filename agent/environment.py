"""Where the agent runs: deployment mode (VM or container) and platform key (DESIGN section 3).

The filesystem root and the environment are parameters, because the machines this project is
built on are containers themselves: tests inject both instead of trusting the host.
"""

from __future__ import annotations

import os
import platform as _platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Signal names exactly as `avika-agent detect --json` reports them.
ENV_SIGNALS = ("KUBERNETES_SERVICE_HOST",)
FILE_SIGNALS = (
    "/var/run/secrets/kubernetes.io/serviceaccount",
    "/.dockerenv",
    "/run/.containerenv",
    "/run/systemd/container",
)
_MACHINES = {
    "x86_64": "linux-amd64",
    "amd64": "linux-amd64",
    "aarch64": "linux-arm64",
    "arm64": "linux-arm64",
}


class UnsupportedPlatform(Exception):
    code = "unsupported_platform"


@dataclass(frozen=True)
class Detection:
    """What the host looks like to the agent: ``vm`` or ``container``, and why."""

    mode: str
    signals: list[str] = field(default_factory=list)
    override: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "signals": list(self.signals), "override": self.override}


def detect(
    override: str | None = None,
    root: Path | str = "/",
    environ: Mapping[str, str] | None = None,
) -> Detection:
    """Container if any signal is present, else VM; ``DEPLOYMENT_MODE`` (``override``) wins."""
    environ = os.environ if environ is None else environ
    root = Path(root)
    signals = [name for name in ENV_SIGNALS if environ.get(name)]
    signals += [name for name in FILE_SIGNALS if os.path.lexists(root / name.lstrip("/"))]
    if override is not None:
        return Detection(mode=override, signals=signals, override=override)
    return Detection(mode="container" if signals else "vm", signals=signals)


def platform_key(machine: str | None = None) -> str:
    """``linux-amd64`` / ``linux-arm64``: the manifest's binary key for this host."""
    machine = _platform.machine() if machine is None else machine
    try:
        return _MACHINES[machine.lower()]
    except KeyError:
        raise UnsupportedPlatform(
            f"machine {machine!r} is not supported (only x86_64 -> linux-amd64, aarch64 -> linux-arm64)"
        ) from None
