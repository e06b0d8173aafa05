"""The controller's configuration, from its environment (DESIGN section 10).

A Deployment sets environment variables (a ConfigMap and a Secret in ``packaging/kubernetes/``),
so there is no file. An invalid value is a :class:`ConfigError` naming the variable and the value
(``avika-controller`` exits 2 with it). Durations as the agent's (``30s``, ``5m``, ``1h30m``).

| variable | default | meaning |
|---|---|---|
| ``AVIKA_UPDATE_SERVER`` | (required) | directory URL holding ``manifest.json`` |
| ``AVIKA_PUBLIC_KEYS`` | keys embedded at build time | comma-separated base64 Ed25519 keys |
| ``AVIKA_SIGNATURE_THRESHOLD`` | ``1`` | distinct trusted keys that must sign |
| ``AVIKA_CLUSTER_ID`` | (required) | this cluster's name in agent ids and workload waves |
| ``AVIKA_NAMESPACES`` | every namespace it may read | comma-separated namespaces to manage |
| ``AVIKA_NAMESPACE`` | the service account's namespace | where its Lease and state ConfigMap live |
| ``AVIKA_STATE_CONFIGMAP`` | ``avika-controller-state`` | highest serial, bad versions, last reports |
| ``AVIKA_LEASE_NAME`` | ``avika-controller`` | the Lease that lets one replica act |
| ``AVIKA_LEASE_DURATION`` | ``30s`` | how long a silent leader keeps the Lease |
| ``AVIKA_HEALTH_WINDOW`` | ``5m`` | Ready without a restart for this long = healthy |
| ``AVIKA_PROGRESS_DEADLINE`` | ``10m`` | a new pod not Ready by then rolls the release back |
| ``AVIKA_RECONCILE_INTERVAL`` | ``10s`` | how often pods are looked at (and the Lease renewed) |
| ``AVIKA_STATE_DIR`` | ``/var/lib/avika-controller`` | the report queues (an ``emptyDir``) |
| ``AVIKA_IDENTITY`` | ``$POD_NAME``, else the host name | this replica's name in the Lease |
| ``UPDATE_INTERVAL`` | ``5m`` | how often the manifest is fetched (ETag: a 304 is cheap) |
| ``UPDATE_REPORT_URL`` | the manifest's ``reports_url`` | where reports go; ``disabled`` stops them |
| ``UPDATE_REPORT_TOKEN`` | none | ``AGENT_ID=TOKEN`` entries, comma-separated (a bare token: any workload) |
| ``UPDATE_HEARTBEAT_INTERVAL`` | ``1h`` | a quiet workload says it is alive this often (``0``: never) |
| ``UPDATE_BINARY_ORIGINS`` | none | origins allowed for absolute binary URLs, as the agent's |
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.manifest import PublicKey, parse_duration, parse_public_keys, url_origin
from controller import buildinfo
from controller.objects import ObjectError, check_cluster_id
from infra.reports.auth import TOKEN_RE
from infra.reports.validation import valid_agent_id

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULTS = {
    "AVIKA_STATE_CONFIGMAP": "avika-controller-state",
    "AVIKA_LEASE_NAME": "avika-controller",
    "AVIKA_LEASE_DURATION": "30s",
    "AVIKA_HEALTH_WINDOW": "5m",
    "AVIKA_PROGRESS_DEADLINE": "10m",
    "AVIKA_RECONCILE_INTERVAL": "10s",
    "AVIKA_STATE_DIR": "/var/lib/avika-controller",
    "UPDATE_INTERVAL": "5m",
    "UPDATE_HEARTBEAT_INTERVAL": "1h",
}
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class ConfigError(ValueError):
    code = "invalid_config"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class ReportTokens:
    """``UPDATE_REPORT_TOKEN``: one token per workload agent id (``avika-publish enroll AGENT_ID``).

    A report token is an HMAC of one agent id, so a controller needs one per workload; a bare token
    (no ``AGENT_ID=``) is used for any workload without its own entry (a cluster with one workload).
    """

    by_agent: Mapping[str, str] = field(default_factory=dict)
    fallback: str | None = None

    def for_agent(self, agent_id: str) -> str | None:
        return self.by_agent.get(agent_id, self.fallback)


def parse_tokens(text: str) -> ReportTokens:
    by_agent: dict[str, str] = {}
    fallback = None
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        agent_id, sep, token = entry.rpartition("=")
        if not TOKEN_RE.fullmatch(token):
            raise ConfigError("UPDATE_REPORT_TOKEN: a token is 64 hex digits (avika-publish enroll AGENT_ID)")
        if not sep:
            fallback = token.lower()
        elif not valid_agent_id(agent_id):
            raise ConfigError(f"UPDATE_REPORT_TOKEN: {agent_id!r} is not an agent id")
        else:
            by_agent[agent_id] = token.lower()
    return ReportTokens(by_agent, fallback)


@dataclass(frozen=True)
class ControllerConfig:
    update_server: str
    public_keys: tuple[PublicKey, ...]
    threshold: int
    cluster: str
    namespaces: tuple[str, ...] | None
    namespace: str
    state_configmap: str
    lease_name: str
    lease_duration: int
    health_window: int
    progress_deadline: int
    reconcile_interval: int
    state_dir: Path
    identity: str
    interval: int
    report_url: str | None
    tokens: ReportTokens
    heartbeat_interval: int
    binary_origins: tuple[str, ...] = ()

    @property
    def manifest_url(self) -> str:
        return manifest_url_for(self.update_server)

    @property
    def reports_disabled(self) -> bool:
        return self.report_url == "disabled"


def manifest_url_for(server: str) -> str:
    """``AVIKA_UPDATE_SERVER`` is a directory URL, as the agent's ``UPDATE_SERVER``; a URL that
    already ends in ``.json`` is taken as the manifest itself."""
    return server if server.endswith(".json") else server.rstrip("/") + "/manifest.json"


def _duration(env: Mapping[str, str], key: str, minimum: int = 0) -> int:
    value = env.get(key) or DEFAULTS[key]
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} is not a duration like 30s, 5m or 1h30m") from None
    if seconds < minimum:
        raise ConfigError(f"{key}={value!r} is below the minimum of {minimum}s")
    return seconds


def trusted_keys(text: str | None, *, where: str = "AVIKA_PUBLIC_KEYS") -> tuple[PublicKey, ...]:
    """Keys from ``text`` (comma-separated base64), else the ones embedded at build time."""
    source = text if text and text.strip() else buildinfo.PUBLIC_KEYS
    try:
        keys = tuple(parse_public_keys(source or ""))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not keys:
        raise ConfigError(
            f"{where} is not set and this build embeds no keys: the manifest cannot be verified"
        )
    return keys


def _own_namespace(env: Mapping[str, str]) -> str:
    if env.get("AVIKA_NAMESPACE"):
        return env["AVIKA_NAMESPACE"]
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def load(env: Mapping[str, str] | None = None) -> ControllerConfig:
    env = dict(os.environ if env is None else env)
    server = (env.get("AVIKA_UPDATE_SERVER") or "").strip()
    if not server:
        raise ConfigError("AVIKA_UPDATE_SERVER is required (the directory URL that holds manifest.json)")
    if url_origin(server) is None:
        raise ConfigError(f"AVIKA_UPDATE_SERVER={server!r} is not an http(s) URL")
    cluster = (env.get("AVIKA_CLUSTER_ID") or "").strip()
    if not cluster:
        raise ConfigError("AVIKA_CLUSTER_ID is required (names this cluster in agent ids and waves)")
    try:
        check_cluster_id(cluster)
    except ObjectError as exc:
        raise ConfigError(f"AVIKA_CLUSTER_ID: {exc}") from None
    threshold_text = env.get("AVIKA_SIGNATURE_THRESHOLD") or "1"
    keys = trusted_keys(env.get("AVIKA_PUBLIC_KEYS"))
    if not threshold_text.isdigit() or not 1 <= int(threshold_text) <= len(keys):
        raise ConfigError(
            f"AVIKA_SIGNATURE_THRESHOLD={threshold_text!r} must be a whole number from 1 to {len(keys)} "
            "(the number of trusted keys)"
        )
    namespaces = None
    if (env.get("AVIKA_NAMESPACES") or "").strip():
        namespaces = tuple(sorted({n.strip() for n in env["AVIKA_NAMESPACES"].split(",") if n.strip()}))
        for ns in namespaces:
            if not _NAME_RE.fullmatch(ns):
                raise ConfigError(f"AVIKA_NAMESPACES: {ns!r} is not a namespace name")
    names = {k: env.get(k) or DEFAULTS[k] for k in ("AVIKA_STATE_CONFIGMAP", "AVIKA_LEASE_NAME")}
    for key, value in names.items():
        if not _NAME_RE.fullmatch(value):
            raise ConfigError(f"{key}={value!r} is not a Kubernetes object name")
    report_url = (env.get("UPDATE_REPORT_URL") or "").strip() or None
    if report_url not in (None, "disabled") and url_origin(report_url) is None:
        raise ConfigError(f"UPDATE_REPORT_URL={report_url!r} is not an http(s) URL (or 'disabled')")
    origins = []
    for part in (env.get("UPDATE_BINARY_ORIGINS") or "").split(","):
        if part.strip():
            origin = url_origin(part.strip())
            if origin is None:
                raise ConfigError(f"UPDATE_BINARY_ORIGINS: {part.strip()!r} is not an http(s) origin")
            origins.append(origin)
    lease_duration = _duration(env, "AVIKA_LEASE_DURATION", 5)
    reconcile = _duration(env, "AVIKA_RECONCILE_INTERVAL", 1)
    if reconcile * 2 > lease_duration:
        raise ConfigError(
            f"AVIKA_RECONCILE_INTERVAL ({reconcile}s) must be at most half of AVIKA_LEASE_DURATION "
            f"({lease_duration}s): the leader renews its Lease once per loop"
        )
    identity = env.get("AVIKA_IDENTITY") or env.get("POD_NAME") or socket.gethostname()
    return ControllerConfig(
        update_server=server,
        public_keys=keys,
        threshold=int(threshold_text),
        cluster=cluster,
        namespaces=namespaces,
        namespace=_own_namespace(env),
        state_configmap=names["AVIKA_STATE_CONFIGMAP"],
        lease_name=names["AVIKA_LEASE_NAME"],
        lease_duration=lease_duration,
        health_window=_duration(env, "AVIKA_HEALTH_WINDOW"),
        progress_deadline=_duration(env, "AVIKA_PROGRESS_DEADLINE", 1),
        reconcile_interval=reconcile,
        state_dir=Path(env.get("AVIKA_STATE_DIR") or DEFAULTS["AVIKA_STATE_DIR"]),
        identity=identity[:128],
        interval=_duration(env, "UPDATE_INTERVAL", 1),
        report_url=report_url,
        tokens=parse_tokens(env.get("UPDATE_REPORT_TOKEN") or ""),
        heartbeat_interval=_duration(env, "UPDATE_HEARTBEAT_INTERVAL"),
        binary_origins=tuple(origins),
    )
