"""Agent configuration (DESIGN section 3, contract).

``/etc/avika/avika-agent.conf`` keeps the existing agent's syntax: ``KEY=value``, ``KEY="value"``
or ``KEY='value'`` lines, an optional ``export`` prefix, ``#`` comment lines and blank lines.
An empty value means the default; environment variables of the same name override the file.
Every value is checked here, once, so the rest of the agent only sees valid settings.
"""

from __future__ import annotations

import difflib
import grp
import logging
import os
import re
import socket
import stat
import sys
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent import buildinfo
from agent.manifest import PublicKey, parse_duration, parse_public_keys, plain_authority, url_origin
from agent.state import write_text_atomic
from infra.reports.validation import valid_agent_id

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path("/etc/avika/avika-agent.conf")
GATEWAY_UPDATE_PORT = 5021
UPDATE_MODES = ("auto", "vm-only", "signal-only", "disabled")
DEPLOYMENT_MODES = ("vm", "container")
RESTART_METHODS = ("exec", "systemd", "signal")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

KEYS = (
    "AGENT_ID",
    "GATEWAYS",
    "UPDATE_SERVER",
    "UPDATE_INTERVAL",
    "UPDATE_MODE",
    "DEPLOYMENT_MODE",
    "UPDATE_RESTART_METHOD",
    "UPDATE_SYSTEMD_UNIT",
    "UPDATE_ROLLOUT_PERCENT",
    "UPDATE_PUBLIC_KEYS",
    "UPDATE_SIGNATURE_THRESHOLD",
    "UPDATE_TARGET",
    "UPDATE_STATE_DIR",
    "UPDATE_HEALTH_WINDOW",
    "UPDATE_MAX_BOOT_ATTEMPTS",
    "UPDATE_REPORT_URL",
    "UPDATE_REPORT_TOKEN",
    "BUFFER_DIR",
    "UPDATE_BINARY_ORIGINS",
    "UPDATE_FETCH_TIMEOUT",
    "UPDATE_DOWNLOAD_TIMEOUT",
    "UPDATE_COMMIT_DEADLINE",
    "UPDATE_HEARTBEAT_INTERVAL",
)
# Past the health window, how long a new version has to commit unless UPDATE_COMMIT_DEADLINE says.
DEFAULT_COMMIT_GRACE = 600
_PREFIX = "UPDATE_"
_KNOWN_SUFFIXES = [k[len(_PREFIX) :] for k in KEYS if k.startswith(_PREFIX)]
# A config file is a few KiB; a bigger one is a mistake (and never read whole into memory).
MAX_CONFIG_BYTES = 1 << 20


class ConfigError(Exception):
    """An invalid setting: names the key and the value (exit 2, ``invalid_config``)."""

    code = "invalid_config"

    def __init__(self, message: str, key: str | None = None, value: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key
        self.value = value


def parse_file(text: str, source: str = "config") -> dict[str, str]:
    """``KEY=value`` lines to a dict; a line without ``=`` is an error naming its number."""
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export ") or stripped.startswith("export\t"):
            stripped = stripped[len("export") :].lstrip()
        if "=" not in stripped:
            raise ConfigError(f"{source}:{number}: expected KEY=value, got {line.strip()!r}")
        key, value = (part.strip() for part in stripped.split("=", 1))
        if not _KEY_RE.match(key):
            raise ConfigError(f"{source}:{number}: {key!r} is not a valid key name", key=key)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


def derive_update_server(gateways: str) -> str | None:
    """``http://<first gateway host>:5021/updates``, as the existing agent derives it."""
    first = next((g.strip() for g in gateways.split(",") if g.strip()), None)
    if first is None:
        return None
    first = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", first).split("/", 1)[0]
    if first.startswith("["):  # [v6]:port
        host = first[: first.index("]") + 1] if "]" in first else first
    else:
        host = first.rsplit(":", 1)[0] if first.count(":") == 1 else first
    if not host:
        return None
    return f"http://{host}:{GATEWAY_UPDATE_PORT}/updates"


@dataclass(frozen=True)
class AgentConfig:
    """Validated settings. ``None`` for a URL means the feature is off or unset."""

    agent_id: str | None = None
    gateways: tuple[str, ...] = ()
    update_server: str | None = None
    update_interval: int = 3600
    update_mode: str = "auto"
    deployment_mode: str | None = None
    restart_method: str = "exec"
    systemd_unit: str = "avika-agent"
    rollout_percent: int = 100
    public_keys: tuple[PublicKey, ...] = ()
    signature_threshold: int = 1
    target: Path = field(default_factory=lambda: Path(sys.argv[0]).resolve())
    state_dir: Path = Path("/var/lib/avika-agent")
    health_window: int = 60
    max_boot_attempts: int = 3
    report_url: str | None = None
    report_disabled: bool = False
    report_token: str | None = None
    buffer_dir: Path = Path("/var/lib/avika-agent/data")
    binary_origins: tuple[str, ...] = ()
    fetch_timeout: int = 120
    download_timeout: int = 1800
    # None = health window + DEFAULT_COMMIT_GRACE (see ``commit_deadline_s``).
    commit_deadline: int | None = None
    heartbeat_interval: int = 3600
    source: str = ""
    # Config mistakes that are not errors (unknown UPDATE_* keys, an exposed token): logged, and
    # shown by ``status``.
    warnings: tuple[str, ...] = ()

    @property
    def updates_disabled(self) -> bool:
        return self.update_mode == "disabled" or self.update_server is None

    @property
    def commit_deadline_s(self) -> int:
        """Seconds after the swap by which a new version must have committed (DESIGN section 4)."""
        if self.commit_deadline is not None:
            return self.commit_deadline
        return self.health_window + DEFAULT_COMMIT_GRACE

    @property
    def manifest_url(self) -> str:
        if self.update_server is None:
            raise ConfigError("updates are disabled: no UPDATE_SERVER")
        return self.update_server.rstrip("/") + "/manifest.json"


def _int(key: str, value: str, low: int, high: int | None = None) -> int:
    if not re.fullmatch(r"\d+", value):
        raise ConfigError(f"{key}={value!r}: not a whole number", key, value)
    number = int(value)
    if number < low or (high is not None and number > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(f"{key}={value!r}: must be {bound}", key, value)
    return number


def _choice(key: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(choices)}", key, value)
    return value


def _duration(key: str, value: str, minimum: int) -> int:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{key}={value!r}: {exc}", key, value) from None
    if seconds < minimum:
        raise ConfigError(f"{key}={value!r}: must be at least {minimum}s", key, value)
    return seconds


def _duration_or_zero(key: str, value: str) -> int:
    """A duration, or ``0`` / ``0s`` (the feature is off)."""
    if value == "0":
        return 0
    return _duration(key, value, 0)


def _url(key: str, value: str) -> str:
    if not re.match(r"^https?://[^\s/]+", value):
        raise ConfigError(f"{key}={value!r}: must be an http:// or https:// URL", key, value)
    return value


def _origins(key: str, value: str) -> tuple[str, ...]:
    """Comma-separated ``scheme://host[:port]`` origins, normalised as :func:`manifest.url_origin`."""
    origins: list[str] = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        origin = url_origin(part)
        authority = part.split("://", 1)[-1]
        authority = authority[:-1] if authority.endswith("/") else authority
        if origin is None or not plain_authority(authority):
            raise ConfigError(
                f"{key}={value!r}: {part!r} is not an origin like https://cdn.example.com[:port]", key, value
            )
        if origin not in origins:
            origins.append(origin)
    return tuple(origins)


def _path(key: str, value: str) -> Path:
    if "\x00" in value:
        raise ConfigError(f"{key}={value!r}: not a path", key, value)
    return Path(value).expanduser()


def from_values(values: Mapping[str, str], source: str = "", warnings: tuple[str, ...] = ()) -> AgentConfig:
    """Validate raw ``KEY -> value`` settings (empty = default) into an ``AgentConfig``."""
    get = {k: v.strip() for k, v in values.items() if k in KEYS and v.strip()}
    kw: dict[str, object] = {"source": source, "warnings": warnings}

    if "AGENT_ID" in get:
        if not valid_agent_id(get["AGENT_ID"]):
            raise ConfigError(
                f"AGENT_ID={get['AGENT_ID']!r}: 1-128 characters of A-Z a-z 0-9 . _ : @ / + = -",
                "AGENT_ID",
                get["AGENT_ID"],
            )
        kw["agent_id"] = get["AGENT_ID"]
    gateways = get.get("GATEWAYS", "")
    kw["gateways"] = tuple(g.strip() for g in gateways.split(",") if g.strip())

    update_mode = _choice("UPDATE_MODE", get.get("UPDATE_MODE", "auto"), UPDATE_MODES)
    kw["update_mode"] = update_mode
    server = get.get("UPDATE_SERVER")
    if server == "disabled":
        kw["update_server"] = None
    elif server:
        kw["update_server"] = _url("UPDATE_SERVER", server)
    else:
        kw["update_server"] = derive_update_server(gateways)
        if kw["update_server"] is None and update_mode != "disabled":
            raise ConfigError(
                "UPDATE_SERVER is not set and GATEWAYS is empty: set one, or UPDATE_MODE=disabled",
                "UPDATE_SERVER",
                "",
            )
    if "UPDATE_INTERVAL" in get:
        kw["update_interval"] = _duration("UPDATE_INTERVAL", get["UPDATE_INTERVAL"], 1)
    if "DEPLOYMENT_MODE" in get:
        kw["deployment_mode"] = _choice("DEPLOYMENT_MODE", get["DEPLOYMENT_MODE"], DEPLOYMENT_MODES)
    if "UPDATE_RESTART_METHOD" in get:
        kw["restart_method"] = _choice("UPDATE_RESTART_METHOD", get["UPDATE_RESTART_METHOD"], RESTART_METHODS)
    if "UPDATE_SYSTEMD_UNIT" in get:
        unit = get["UPDATE_SYSTEMD_UNIT"]
        if not re.fullmatch(r"[A-Za-z0-9:_.@\\-]+", unit):
            raise ConfigError(f"UPDATE_SYSTEMD_UNIT={unit!r}: not a unit name", "UPDATE_SYSTEMD_UNIT", unit)
        kw["systemd_unit"] = unit
    if "UPDATE_ROLLOUT_PERCENT" in get:
        kw["rollout_percent"] = _int("UPDATE_ROLLOUT_PERCENT", get["UPDATE_ROLLOUT_PERCENT"], 0, 100)

    keys_text = get.get("UPDATE_PUBLIC_KEYS") or buildinfo.PUBLIC_KEYS
    try:
        keys = tuple(parse_public_keys(keys_text))
    except ValueError as exc:
        raise ConfigError(f"UPDATE_PUBLIC_KEYS: {exc}", "UPDATE_PUBLIC_KEYS", keys_text) from None
    kw["public_keys"] = keys
    threshold = _int("UPDATE_SIGNATURE_THRESHOLD", get.get("UPDATE_SIGNATURE_THRESHOLD", "1"), 1)
    kw["signature_threshold"] = threshold
    if not (update_mode == "disabled" or kw["update_server"] is None):
        if not keys:
            raise ConfigError(
                "UPDATE_PUBLIC_KEYS is empty and this binary embeds no keys: updates cannot be verified",
                "UPDATE_PUBLIC_KEYS",
                "",
            )
        if threshold > len(keys):
            raise ConfigError(
                f"UPDATE_SIGNATURE_THRESHOLD={threshold}: larger than the {len(keys)} trusted key(s)",
                "UPDATE_SIGNATURE_THRESHOLD",
                str(threshold),
            )

    if "UPDATE_TARGET" in get:
        kw["target"] = _path("UPDATE_TARGET", get["UPDATE_TARGET"])
    if "UPDATE_STATE_DIR" in get:
        kw["state_dir"] = _path("UPDATE_STATE_DIR", get["UPDATE_STATE_DIR"])
    if "BUFFER_DIR" in get:
        kw["buffer_dir"] = _path("BUFFER_DIR", get["BUFFER_DIR"])
    if "UPDATE_HEALTH_WINDOW" in get:
        kw["health_window"] = _duration("UPDATE_HEALTH_WINDOW", get["UPDATE_HEALTH_WINDOW"], 1)
    if "UPDATE_MAX_BOOT_ATTEMPTS" in get:
        kw["max_boot_attempts"] = _int("UPDATE_MAX_BOOT_ATTEMPTS", get["UPDATE_MAX_BOOT_ATTEMPTS"], 1, 100)
    if "UPDATE_BINARY_ORIGINS" in get:
        kw["binary_origins"] = _origins("UPDATE_BINARY_ORIGINS", get["UPDATE_BINARY_ORIGINS"])
    if "UPDATE_FETCH_TIMEOUT" in get:
        kw["fetch_timeout"] = _duration("UPDATE_FETCH_TIMEOUT", get["UPDATE_FETCH_TIMEOUT"], 1)
    if "UPDATE_DOWNLOAD_TIMEOUT" in get:
        kw["download_timeout"] = _duration("UPDATE_DOWNLOAD_TIMEOUT", get["UPDATE_DOWNLOAD_TIMEOUT"], 1)
    if "UPDATE_COMMIT_DEADLINE" in get:
        deadline = _duration("UPDATE_COMMIT_DEADLINE", get["UPDATE_COMMIT_DEADLINE"], 1)
        if deadline <= kw.get("health_window", 60):
            raise ConfigError(
                f"UPDATE_COMMIT_DEADLINE={get['UPDATE_COMMIT_DEADLINE']!r}: must be longer than "
                f"UPDATE_HEALTH_WINDOW ({kw.get('health_window', 60)}s), or no version could ever commit",
                "UPDATE_COMMIT_DEADLINE",
                get["UPDATE_COMMIT_DEADLINE"],
            )
        kw["commit_deadline"] = deadline
    if "UPDATE_HEARTBEAT_INTERVAL" in get:
        kw["heartbeat_interval"] = _duration_or_zero(
            "UPDATE_HEARTBEAT_INTERVAL", get["UPDATE_HEARTBEAT_INTERVAL"]
        )
    report_url = get.get("UPDATE_REPORT_URL")
    if report_url == "disabled":
        kw["report_disabled"] = True
    elif report_url:
        kw["report_url"] = _url("UPDATE_REPORT_URL", report_url)
    if "UPDATE_REPORT_TOKEN" in get:
        token = get["UPDATE_REPORT_TOKEN"]
        if not re.fullmatch(r"[0-9a-fA-F]{64}", token):
            raise ConfigError(
                "UPDATE_REPORT_TOKEN: must be the 64 hex digits printed by `avika-publish enroll`",
                "UPDATE_REPORT_TOKEN",
                "<redacted>",
            )
        kw["report_token"] = token.lower()
    return AgentConfig(**kw)  # type: ignore[arg-type]


def read_values(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Raw settings: the file (``path`` None = the default path, which may be missing), then the
    environment over it. Nothing is validated here except the file's syntax."""
    return read_settings(path, environ)[0]


def read_settings(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[dict[str, str], list[str]]:
    """:func:`read_values` and the config mistakes worth a warning (DESIGN section 3): unknown
    ``UPDATE_*`` keys in the file or the environment, and a file whose mode exposes it."""
    environ = os.environ if environ is None else environ
    explicit = path is not None
    path = DEFAULT_CONFIG_PATH if path is None else path
    try:
        with open(path, "rb") as fh:
            info = os.fstat(fh.fileno())
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist") from None
        text, info = "", None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    values = parse_file(text, str(path))
    warnings = unknown_key_warnings(values, f"config file {path}")
    warnings += unknown_key_warnings(environ, "the environment")
    if info is not None:
        holds_token = bool(values.get("UPDATE_REPORT_TOKEN", "").strip())
        warnings += file_mode_warnings(path, info.st_mode, info.st_gid, os.getegid(), holds_token)
    for key in sorted(set(values) - set(KEYS)):
        log.debug("ignoring unknown config key %s in %s", key, path)
    for key in KEYS:
        if key in environ:
            values[key] = environ[key]
    return values, warnings


def unknown_key_warnings(keys: Iterable[str], where: str) -> list[str]:
    """One warning per ``UPDATE_*`` key (any case) this agent does not know, naming the nearest known
    key when one is near: a typo must not silently leave a setting at its default."""
    warnings = []
    for key in sorted(keys):
        if not key.upper().startswith(_PREFIX) or key in KEYS:
            continue
        suffix = key.upper()[len(_PREFIX) :]
        near = difflib.get_close_matches(suffix, _KNOWN_SUFFIXES, n=1, cutoff=0.6)
        hint = f"; did you mean {_PREFIX}{near[0]}?" if near else ""
        warnings.append(f"unknown key {key} in {where} is ignored{hint}")
    return warnings


def file_mode_warnings(path: Path, mode: int, gid: int, agent_gid: int, holds_token: bool) -> list[str]:
    """What the config file's mode exposes (DESIGN section 3).

    A file holding ``UPDATE_REPORT_TOKEN`` must not be readable by others, nor by a group other than
    the agent's own (the documented modes: 0600, or 0640 root:<agent group>): whoever reads the token
    can report as this agent. Any config file writable by group or others lets them change
    ``UPDATE_PUBLIC_KEYS`` and so what this agent installs.
    """
    warnings = []
    octal = f"{stat.S_IMODE(mode):04o}"
    fix = f"chmod 600 {path} (or chmod 640 and chgrp it to the agent's group)"
    if holds_token and mode & stat.S_IROTH:
        warnings.append(
            f"config file {path} holds UPDATE_REPORT_TOKEN and is readable by others (mode {octal}): "
            f"anyone on this host can report as this agent; {fix}"
        )
    elif holds_token and mode & stat.S_IRGRP and gid != agent_gid:
        warnings.append(
            f"config file {path} holds UPDATE_REPORT_TOKEN and is readable by group {_group_name(gid)} "
            f"(mode {octal}), which is not the agent's group ({_group_name(agent_gid)}): its members can "
            f"report as this agent; {fix}"
        )
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        warnings.append(
            f"config file {path} is writable by group or others (mode {octal}): they can change "
            f"UPDATE_PUBLIC_KEYS and so what this agent installs; chmod go-w {path}"
        )
    return warnings


def _group_name(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} ({gid})"
    except KeyError:
        return str(gid)


def load(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Read the file (``path`` None = the default path, which may be missing) and the environment.

    Config mistakes that are not errors are logged as warnings and kept in ``warnings`` (``status``
    shows them).
    """
    values, warnings = read_settings(path, environ)
    for warning in warnings:
        log.warning("%s", warning)
    return from_values(
        values, source=str(DEFAULT_CONFIG_PATH if path is None else path), warnings=tuple(warnings)
    )


def resolve_agent_id(config: AgentConfig, hostname: str | None = None) -> str:
    """AGENT_ID, else ``<BUFFER_DIR>/agent_id``, else a new hostname-based id saved there."""
    if config.agent_id:
        return config.agent_id
    id_file = config.buffer_dir / "agent_id"
    try:
        saved = id_file.read_text(encoding="utf-8").strip()
        if valid_agent_id(saved):
            return saved
        log.warning("ignoring invalid agent id in %s", id_file)
    except FileNotFoundError:
        pass
    host = re.sub(r"[^A-Za-z0-9._-]", "-", hostname or socket.gethostname())[:100] or "agent"
    new_id = f"{host}-{uuid.uuid4().hex[:12]}"
    write_text_atomic(id_file, new_id + "\n")
    return new_id
