"""What to do about a verified manifest: a pure function of manifest, host and state.

No I/O here: `check`, `run` and `update` all call :func:`decide` with what they read, so the
whole decision table (DESIGN sections 2 and 3) is tested on data alone.

Order: disabled > vm-only in a container > version (same / older without downgrade) > halted
(rollout 0, unless ``min_version`` forces it) > container or signal-only reports > bad version >
wave (forced ``min_version`` skips it).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from packaging.version import InvalidVersion, Version

from agent.manifest import Manifest, in_wave, parse_version, rollout_bucket

NONE, UPDATE, REPORT = "none", "update", "report"


@dataclass(frozen=True)
class Host:
    """The facts about this agent that the decision needs."""

    agent_id: str
    current_version: str
    mode: str  # "vm" | "container"
    update_mode: str = "auto"
    local_cap: int = 100
    platform: str | None = None


@dataclass(frozen=True)
class Decision:
    """What this host does about a verified manifest, and the reason it reports."""

    action: str  # none | update | report
    reason: str
    bucket: int | None = None
    in_wave: bool | None = None
    forced: bool = False

    def to_dict(self) -> dict[str, object]:
        return {
            "action": self.action,
            "reason": self.reason,
            "bucket": self.bucket,
            "in_wave": self.in_wave,
            "forced": self.forced,
        }


def _version(text: str) -> Version | None:
    try:
        return parse_version(text)
    except InvalidVersion:
        return None


def decide(manifest: Manifest, host: Host, bad_versions: Collection[tuple[str, str]] = ()) -> Decision:
    """``bad_versions`` holds (version, sha256) pairs this host must never install again."""
    if host.update_mode == "disabled":
        return Decision(NONE, "disabled")
    bucket = rollout_bucket(host.agent_id, manifest.rollout.salt)
    wave = in_wave(host.agent_id, manifest.rollout, host.local_cap)
    if host.mode == "container" and host.update_mode == "vm-only":
        return Decision(NONE, "vm_only_in_container", bucket, wave)

    target = manifest.parsed_version
    current = _version(host.current_version)
    if current is not None and target == current:
        return Decision(NONE, "up_to_date", bucket, wave)
    if current is not None and target < current and not manifest.downgrade:
        return Decision(NONE, "older_than_running", bucket, wave)
    forced = bool(
        manifest.min_version
        and current is not None
        and current < parse_version(manifest.min_version)
        and target >= parse_version(manifest.min_version)
    )

    if manifest.rollout.halted and not forced:
        # Halted (DESIGN section 2): nobody acts, and containers don't call it available.
        return Decision(NONE, "halted", bucket, wave)
    if host.mode == "container":
        return Decision(REPORT, "container", bucket, wave, forced)
    if host.update_mode == "signal-only":
        return Decision(REPORT, "signal_only", bucket, wave, forced)

    binary = manifest.binaries.get(host.platform or "")
    if binary is not None and (manifest.version, binary.sha256) in bad_versions:
        return Decision(NONE, "bad_version", bucket, wave, forced)
    if forced:
        return Decision(UPDATE, "below_min_version", bucket, wave, True)
    if not wave:
        return Decision(NONE, "not_in_wave", bucket, wave)
    return Decision(
        UPDATE, "downgrade" if current is not None and target < current else "newer_version", bucket, wave
    )
