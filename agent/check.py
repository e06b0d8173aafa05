"""The check workflow: thin I/O around the pure core (DESIGN sections 2, 3 and 7).

One check, step by step (python-tuf's updater shape):

1. ``UPDATE_MODE=disabled`` / ``UPDATE_SERVER=disabled``: nothing is fetched or written;
2. read the cached envelope and its ETag from the state dir; GET the manifest with
   ``If-None-Match`` (only while the cached envelope still verifies, and the ETag is a plain header
   value); a 304 means the cached envelope is verified again, expiry included;
3. verify with :func:`agent.manifest.verify_manifest` (trusted keys, threshold, the highest serial
   accepted so far, the platform on a VM, the binary URLs' origins); the highest serial is never
   below the cached envelope's (:func:`rebuild_trust`: a corrupt ``state.json`` was set aside);
4. only after every check passed: cache the envelope + ETag and persist the new highest serial and
   its digest (one atomic ``state.json`` write);
5. decide with :func:`agent.decide.decide`; the versions it must not install are
   :func:`agent.lifecycle.blocked_pairs` at ``now`` (a crash for good, a missed commit deadline
   until its back-off ends).

Every check, passed or refused, records ``last_check``, ``last_result`` and ``last_error``
(``{"code", "message", "state"}``) in ``state.json``; a refusal leaves the trust state as it was.
Steps 3-5 run in one :func:`agent.state.state_transaction`, verified against the trust state as it
is then, so a concurrent ``update`` or ``run`` loses nothing; the fetch comes before it, so the
state lock is never held across the network.
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion

from agent import buildinfo, environment, lifecycle
from agent.config import AgentConfig, resolve_agent_id
from agent.decide import NONE, Decision, Host, decide
from agent.fetch import DownloadError, Fetcher, FetchFailed, HttpFetcher
from agent.manifest import (
    MAX_ENVELOPE_BYTES,
    Manifest,
    ManifestError,
    TrustState,
    format_time,
    normalize_version,
    parse_manifest,
    verify_envelope,
    verify_manifest,
)
from agent.state import (
    CACHED_ENVELOPE,
    CACHED_ETAG,
    AgentState,
    state_transaction,
    write_bytes_atomic,
    write_text_atomic,
)

log = logging.getLogger(__name__)

CHECKING = "checking"  # the DESIGN section 4 state a failed check is reported in
VERSION_TIMEOUT = 10.0
_VERSION_TOKEN_RE = re.compile(r"^[vV]?\d+(?:\.\d+)+\S*$")
MAX_ETAG_CHARS = 1024
# An ETag goes back into an If-None-Match header: visible ASCII and spaces only, never CR or LF.
_ETAG_RE = re.compile(r"[\x20-\x7e]{1,1024}")


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


def read_cached_envelope(state_dir: Path) -> bytes | None:
    """The cached envelope's bytes, or None (missing, unreadable, or larger than any envelope)."""
    try:
        with open(state_dir / CACHED_ENVELOPE, "rb") as fh:
            data = fh.read(MAX_ENVELOPE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the cached manifest %s: %s", state_dir / CACHED_ENVELOPE, exc)
        return None
    return data if len(data) <= MAX_ENVELOPE_BYTES else None


def read_cached_etag(state_dir: Path) -> str | None:
    """The cached ETag if it can go into a header as it is (visible ASCII, at most 1 KiB), else None."""
    try:
        with open(state_dir / CACHED_ETAG, "rb") as fh:
            raw = fh.read(MAX_ETAG_CHARS + 2)
    except OSError:
        return None
    text = raw.strip().decode("ascii", errors="replace")
    return text if len(text) <= MAX_ETAG_CHARS and _ETAG_RE.fullmatch(text) else None


def load_cache(state_dir: Path) -> tuple[bytes | None, str | None]:
    """The last verified envelope and its ETag; an ETag without an envelope is useless."""
    envelope = read_cached_envelope(state_dir)
    if envelope is None:
        return None, None
    return envelope, read_cached_etag(state_dir)


def save_cache(state_dir: Path, envelope: bytes, etag: str | None) -> None:
    write_bytes_atomic(state_dir / CACHED_ENVELOPE, envelope)
    if etag:
        write_text_atomic(state_dir / CACHED_ETAG, etag + "\n")
    else:
        with contextlib.suppress(FileNotFoundError):
            (state_dir / CACHED_ETAG).unlink()


def _cached_manifest(config: AgentConfig, envelope: bytes) -> Manifest:
    """The cached envelope, verified with the configured keys and parsed; its expiry, serial and
    URLs are not checked (it was accepted once). Raises ``ManifestError``."""
    return parse_manifest(verify_envelope(envelope, config.public_keys, config.signature_threshold))


def rebuild_trust(config: AgentConfig, state: AgentState) -> None:
    """Never lower the trust state below the cached envelope's (DESIGN section 4).

    ``state.json`` may have been set aside (corrupt, mistyped) or lost; the envelope this agent last
    accepted is cached beside it. Once its signature verifies with the configured keys (expiry
    ignored: it is only a witness of what was accepted), its serial and digest are a floor for the
    highest serial, so a broken state file never reopens the door to a replayed older manifest.
    """
    envelope = read_cached_envelope(config.state_dir)
    if envelope is None:
        if state.highest_serial is None and state.corrupt:
            log.warning(
                "no cached manifest to rebuild the trust state from: the next manifest that verifies "
                "sets the highest serial again"
            )
        return
    try:
        cached = _cached_manifest(config, envelope)
    except ManifestError as exc:
        if state.highest_serial is None:
            log.warning("the cached manifest cannot rebuild the trust state: %s: %s", exc.code, exc.message)
        return
    if state.highest_serial is None or cached.serial > state.highest_serial:
        log.warning(
            "trust state rebuilt from the cached manifest: highest serial %s -> %d",
            state.highest_serial,
            cached.serial,
        )
        state.highest_serial, state.highest_digest = cached.serial, cached.digest
    elif cached.serial == state.highest_serial and state.highest_digest is None:
        state.highest_digest = cached.digest


# ---------------------------------------------------------------- the workflow


def _platform(mode: str) -> str | None:
    """The manifest key for this host; a container agent may run on anything."""
    if mode == "vm":
        return environment.platform_key()
    try:
        return environment.platform_key()
    except environment.UnsupportedPlatform:
        return None


def make_fetcher(config: AgentConfig) -> HttpFetcher:
    """The agent's fetcher, with the configured deadlines (DESIGN section 3)."""
    return HttpFetcher(fetch_timeout=config.fetch_timeout, download_timeout=config.download_timeout)


def fetch(config: AgentConfig, fetcher: Fetcher) -> tuple[int, bytes, str | None]:
    """Step 2: (status, envelope to verify, ETag). Raises ``DownloadError`` or ``TooLarge``."""
    url = config.manifest_url
    cached, cached_etag = load_cache(config.state_dir)
    if cached is not None and cached_etag is not None:
        try:
            _cached_manifest(config, cached)
        except ManifestError as exc:
            # A 304 would mean "verify this broken cache" at every check: fetch it whole instead.
            log.warning(
                "the cached manifest does not verify (%s: %s): fetching without If-None-Match",
                exc.code,
                exc.message,
            )
            cached_etag = None
    status, body, etag = fetcher.get_manifest(url, cached_etag if cached is not None else None)
    if status == 304:
        if cached is None:
            raise FetchFailed(f"{url}: HTTP 304 but no manifest is cached")
        return status, cached, cached_etag
    return status, body, etag


def verify_and_record(
    config: AgentConfig,
    state: AgentState,
    fetched: tuple[int, bytes, str | None],
    *,
    now: datetime,
    platform: str | None,
) -> Manifest:
    """Steps 3-4, inside the caller's state transaction. Raises ``ManifestError``."""
    status, body, etag = fetched
    rebuild_trust(config, state)
    manifest = verify_manifest(
        body,
        trusted=config.public_keys,
        threshold=config.signature_threshold,
        now=now,
        trust=TrustState(state.highest_serial, state.highest_digest),
        platform=platform,
        manifest_url=config.manifest_url,
        binary_origins=config.binary_origins,
    )
    if status == 200:
        save_cache(config.state_dir, body, etag)
    state.highest_serial = manifest.serial
    state.highest_digest = manifest.digest
    log.info("manifest serial %d (version %s) verified (HTTP %d)", manifest.serial, manifest.version, status)
    return manifest


def _record_error(state: AgentState, exc: ManifestError | DownloadError) -> None:
    state.last_result = "error"
    state.last_error = {"code": exc.code, "message": exc.message, "state": CHECKING}


def check(
    config: AgentConfig,
    *,
    fetcher: Fetcher | None = None,
    now: datetime | None = None,
    mode: str | None = None,
    ignore_backoff: bool = False,
) -> CheckResult:
    """One check. Raises ``ManifestError`` (refused), ``DownloadError`` (network) or ``OSError``.

    ``mode`` defaults to :func:`agent.environment.detect` with ``DEPLOYMENT_MODE`` as override.
    ``ignore_backoff`` (``update --force``): a version that only missed its commit deadline is
    not blocked while it backs off (a crashed one always is).
    """
    now = now or datetime.now(timezone.utc)
    mode = mode or environment.detect(config.deployment_mode).mode
    if config.updates_disabled:
        agent_id = config.agent_id
        with contextlib.suppress(OSError):
            agent_id = resolve_agent_id(config)
        return CheckResult(current_version(config), mode, agent_id, Decision(NONE, "disabled"))

    platform = _platform(mode)
    agent_id = resolve_agent_id(config)
    version = current_version(config)
    own_fetcher = fetcher is None
    fetcher = fetcher or make_fetcher(config)
    try:
        fetched = fetch(config, fetcher)
    except (ManifestError, DownloadError) as exc:  # too_large is found while fetching
        with state_transaction(config.state_dir) as state:
            rebuild_trust(config, state)
            state.last_check = format_time(now)
            _record_error(state, exc)
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
    refused: ManifestError | None = None
    with state_transaction(config.state_dir) as state:
        state.last_check = format_time(now)
        try:
            manifest = verify_and_record(
                config, state, fetched, now=now, platform=platform if mode == "vm" else None
            )
        except ManifestError as exc:
            _record_error(state, exc)  # recorded (the transaction saves it), then raised
            refused = exc
        else:
            blocked = lifecycle.blocked_pairs(state, now=now, ignore_backoff=ignore_backoff)
            decision = decide(manifest, host, blocked)
            state.last_result = decision.action
            state.last_error = None
    if refused is not None:
        raise refused
    return CheckResult(version, mode, agent_id, decision, platform, manifest, fetched[0])
