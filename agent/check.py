"""The check workflow: thin I/O around the pure core (DESIGN sections 2, 3 and 7).

One check, step by step (python-tuf's updater shape):

1. ``UPDATE_MODE=disabled`` / ``UPDATE_SERVER=disabled``: nothing is fetched or written;
2. read the cached envelope and its ETag from the state dir; GET the manifest with
   ``If-None-Match``; a 304 means the cached envelope is verified again, expiry included;
3. verify with :func:`agent.manifest.verify_manifest` (trusted keys, threshold, the highest serial
   accepted so far, the platform on a VM);
4. only after every check passed: cache the envelope + ETag and persist the new highest serial and
   its digest (one atomic ``state.json`` write);
5. decide with :func:`agent.decide.decide`.

Every check, passed or refused, records ``last_check``, ``last_result`` and ``last_error``
(``{"code", "message", "state"}``) in ``state.json``; a refusal leaves the trust state as it was.
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion

from agent import buildinfo, environment
from agent.config import AgentConfig, resolve_agent_id
from agent.decide import NONE, Decision, Host, decide
from agent.fetch import DownloadError, Fetcher, FetchFailed, HttpFetcher
from agent.manifest import (
    Manifest,
    ManifestError,
    TrustState,
    format_time,
    normalize_version,
    verify_manifest,
)
from agent.state import (
    CACHED_ENVELOPE,
    CACHED_ETAG,
    AgentState,
    load_state,
    save_state,
    write_bytes_atomic,
    write_text_atomic,
)

log = logging.getLogger(__name__)

CHECKING = "checking"  # the DESIGN section 4 state a failed check is reported in
VERSION_TIMEOUT = 10.0
_VERSION_TOKEN_RE = re.compile(r"^[vV]?\d+(?:\.\d+)+\S*$")


@dataclass(frozen=True)
class CheckResult:
    """What one check found; :meth:`to_dict` is the ``check`` command's output (DESIGN section 7)."""

    current_version: str | None
    mode: str
    agent_id: str | None
    decision: Decision
    platform: str | None = None
    manifest: Manifest | None = None
    status: int | None = None  # 200 or 304; None when nothing was fetched

    def to_dict(self) -> dict[str, Any]:
        return {
            "current_version": self.current_version,
            "manifest_version": self.manifest.version if self.manifest else None,
            "serial": self.manifest.serial if self.manifest else None,
            "mode": self.mode,
            "agent_id": self.agent_id,
            "bucket": self.decision.bucket,
            "in_wave": self.decision.in_wave,
            "forced": self.decision.forced,
            "action": self.decision.action,
            "reason": self.decision.reason,
        }


# ---------------------------------------------------------------- current version


def parse_version_output(text: str) -> str | None:
    """The first version-like token of ``--version`` output (``v0.1.44`` -> ``0.1.44``), else None."""
    for token in text.split():
        token = token.strip("()[],;:'\"")
        if _VERSION_TOKEN_RE.match(token):
            with contextlib.suppress(InvalidVersion):
                return normalize_version(token)
    return None


def target_version(target: Path, timeout: float = VERSION_TIMEOUT) -> str | None:
    """Sidecar use: run ``<target> --version``; None (logged) if it cannot say."""
    try:
        done = subprocess.run(
            [str(target), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot run %s --version: %s", target, exc)
        return None
    if done.returncode != 0:
        log.warning("%s --version exited %d", target, done.returncode)
        return None
    version = parse_version_output(done.stdout) or parse_version_output(done.stderr)
    if version is None:
        log.warning("%s --version printed no version: %r", target, done.stdout[:200])
    return version


def is_running_executable(target: Path) -> bool:
    try:
        return target.resolve() == Path(sys.argv[0]).resolve()
    except OSError:
        return False


def current_version(config: AgentConfig) -> str | None:
    """This build's version when the target is the running executable, else the target's own."""
    if is_running_executable(config.target):
        return buildinfo.VERSION
    return target_version(config.target)


# ---------------------------------------------------------------- cache


def load_cache(state_dir: Path) -> tuple[bytes | None, str | None]:
    """The last verified envelope and its ETag; an ETag without an envelope is useless."""
    try:
        envelope = (state_dir / CACHED_ENVELOPE).read_bytes()
    except FileNotFoundError:
        return None, None
    try:
        etag = (state_dir / CACHED_ETAG).read_text(encoding="utf-8").strip() or None
    except (FileNotFoundError, UnicodeDecodeError):
        etag = None
    return envelope, etag


def save_cache(state_dir: Path, envelope: bytes, etag: str | None) -> None:
    write_bytes_atomic(state_dir / CACHED_ENVELOPE, envelope)
    if etag:
        write_text_atomic(state_dir / CACHED_ETAG, etag + "\n")
    else:
        with contextlib.suppress(FileNotFoundError):
            (state_dir / CACHED_ETAG).unlink()


# ---------------------------------------------------------------- the workflow


def bad_version_pairs(state: AgentState) -> set[tuple[str, str]]:
    """``state.bad_versions`` entries as the (version, sha256) pairs :func:`decide` takes."""
    return {
        (entry["version"], entry["sha256"])
        for entry in state.bad_versions
        if isinstance(entry, dict) and isinstance(entry.get("version"), str) and "sha256" in entry
    }


def _platform(mode: str) -> str | None:
    """The manifest key for this host; a container agent may run on anything."""
    if mode == "vm":
        return environment.platform_key()
    try:
        return environment.platform_key()
    except environment.UnsupportedPlatform:
        return None


def fetch_and_verify(
    config: AgentConfig, fetcher: Fetcher, state: AgentState, *, now: datetime, platform: str | None
) -> tuple[Manifest, int]:
    """Steps 2-4 of the module docstring. Raises ``FetchFailed`` or ``ManifestError``."""
    url = config.manifest_url
    cached, cached_etag = load_cache(config.state_dir)
    status, body, etag = fetcher.get_manifest(url, cached_etag if cached is not None else None)
    if status == 304:
        if cached is None:
            raise FetchFailed(f"{url}: HTTP 304 but no manifest is cached")
        body = cached
    manifest = verify_manifest(
        body,
        trusted=config.public_keys,
        threshold=config.signature_threshold,
        now=now,
        trust=TrustState(state.highest_serial, state.highest_digest),
        platform=platform,
    )
    if status == 200:
        save_cache(config.state_dir, body, etag)
    state.highest_serial = manifest.serial
    state.highest_digest = manifest.digest
    log.info("manifest serial %d (version %s) verified (HTTP %d)", manifest.serial, manifest.version, status)
    return manifest, status


def check(
    config: AgentConfig,
    *,
    fetcher: Fetcher | None = None,
    now: datetime | None = None,
    mode: str | None = None,
) -> CheckResult:
    """One check. Raises ``ManifestError`` (refused), ``DownloadError`` (network) or ``OSError``.

    ``mode`` defaults to :func:`agent.environment.detect` with ``DEPLOYMENT_MODE`` as override.
    """
    now = now or datetime.now(UTC)
    mode = mode or environment.detect(config.deployment_mode).mode
    if config.updates_disabled:
        agent_id = config.agent_id
        with contextlib.suppress(OSError):
            agent_id = resolve_agent_id(config)
        return CheckResult(current_version(config), mode, agent_id, Decision(NONE, "disabled"))

    platform = _platform(mode)
    agent_id = resolve_agent_id(config)
    version = current_version(config)
    state = load_state(config.state_dir)
    state.last_check = format_time(now)
    own_fetcher = fetcher is None
    fetcher = fetcher or HttpFetcher()
    try:
        manifest, status = fetch_and_verify(
            config, fetcher, state, now=now, platform=platform if mode == "vm" else None
        )
    except (ManifestError, DownloadError) as exc:
        state.last_result = "error"
        state.last_error = {"code": exc.code, "message": exc.message, "state": CHECKING}
        save_state(config.state_dir, state)
        raise
    finally:
        if own_fetcher:
            fetcher.close()
    host = Host(
        agent_id=agent_id,
        current_version=version or "",
        mode=mode,
        update_mode=config.update_mode,
        local_cap=config.rollout_percent,
        platform=platform,
    )
    decision = decide(manifest, host, bad_version_pairs(state))
    state.last_result = decision.action
    state.last_error = None
    save_state(config.state_dir, state)
    return CheckResult(version, mode, agent_id, decision, platform, manifest, status)
