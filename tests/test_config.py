"""Agent configuration (DESIGN section 3, contract).

- file syntax: ``KEY=value``, double or single quotes, an ``export`` prefix, spaces around ``=``,
  ``#`` comment lines, blank lines; a non-blank line without ``=`` is an error naming its line;
  an empty value means the default; unknown keys are ignored;
- environment variables override the file; a missing default file is fine, a missing explicit
  file is an error;
- every value is validated and an error names the key and the value;
- durations, UPDATE_SERVER derived from GATEWAYS, ``disabled``;
- the agent id: configured, else saved, else generated and saved;
- the keys of issue 10 (UPDATE_BINARY_ORIGINS, UPDATE_FETCH_TIMEOUT, UPDATE_DOWNLOAD_TIMEOUT,
  UPDATE_COMMIT_DEADLINE, UPDATE_HEARTBEAT_INTERVAL) with DESIGN's defaults;
- mistakes are named: an unknown ``UPDATE_*`` key (file or environment) is a warning naming the
  nearest known key; a file holding UPDATE_REPORT_TOKEN that others or another group can read, and
  any config file others can write, draws a warning; the README table and the sample file list
  every key with the defaults the code has.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import buildinfo, config
from agent.config import ConfigError, from_values, load, parse_duration, parse_file, resolve_agent_id
from agent.manifest import public_key_of
from infra.reports.validation import valid_agent_id

KEY1 = public_key_of(Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)).b64
KEY2 = public_key_of(Ed25519PrivateKey.from_private_bytes(b"\x02" * 32)).b64
BASE = {"UPDATE_SERVER": "http://gw.example.com:5021/updates", "UPDATE_PUBLIC_KEYS": KEY1}


@pytest.fixture(autouse=True)
def no_embedded_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # A built agent may embed keys; these tests describe a source checkout with none.
    monkeypatch.setattr(buildinfo, "PUBLIC_KEYS", "")


def conf(**values: str) -> config.AgentConfig:
    return from_values({**BASE, **values})


# ---------------------------------------------------------------- file syntax


def test_file_syntax_of_the_existing_agent_is_read() -> None:
    text = """\
# SELF-UPDATE CONFIGURATION
UPDATE_SERVER=http://gw:5021/updates

UPDATE_INTERVAL="30m"
UPDATE_MODE='vm-only'
export UPDATE_RESTART_METHOD=systemd
export\tUPDATE_SYSTEMD_UNIT=avika
  UPDATE_ROLLOUT_PERCENT = 25
UPDATE_TARGET = " /usr/local/bin/avika-agent "
    # an indented comment
CHANGELOG_URL=# not a comment: no inline comments
"""
    assert parse_file(text) == {
        "UPDATE_SERVER": "http://gw:5021/updates",
        "UPDATE_INTERVAL": "30m",
        "UPDATE_MODE": "vm-only",
        "UPDATE_RESTART_METHOD": "systemd",
        "UPDATE_SYSTEMD_UNIT": "avika",
        "UPDATE_ROLLOUT_PERCENT": "25",
        "UPDATE_TARGET": " /usr/local/bin/avika-agent ",
        "CHANGELOG_URL": "# not a comment: no inline comments",
    }


@pytest.mark.parametrize(
    ("line", "value"),
    [
        pytest.param('K="a=b"', "a=b", id="only the first = splits"),
        pytest.param("K='it''s'", "it''s", id="inner quotes are kept"),
        pytest.param('K="unbalanced', '"unbalanced', id="an unbalanced quote is kept"),
        pytest.param("K=\"mixed'", "\"mixed'", id="mismatched quotes are kept"),
        pytest.param('K=""', "", id="empty double quotes are an empty value"),
        pytest.param("K=", "", id="nothing after = is an empty value"),
        pytest.param("K=a # b", "a # b", id="a hash inside a value is not a comment"),
    ],
)
def test_values_are_unquoted_once(line: str, value: str) -> None:
    assert parse_file(line) == {"K": value}


def test_a_line_without_equals_is_an_error_naming_its_line_number() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_file(
            "# comment\n\nUPDATE_MODE=auto\nUPDATE_SERVER http://x\n", source="/etc/avika/avika-agent.conf"
        )
    assert "/etc/avika/avika-agent.conf:4" in caught.value.message
    assert "UPDATE_SERVER http://x" in caught.value.message


def test_a_bad_key_name_is_an_error_naming_its_line_number() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_file("A=1\n2BAD=x\n", source="c")
    assert "c:2" in caught.value.message


def test_a_later_line_overrides_an_earlier_one() -> None:
    assert parse_file("K=1\nK=2\n") == {"K": "2"}


def test_an_empty_value_means_the_default() -> None:
    cfg = from_values({**BASE, "UPDATE_INTERVAL": "", "UPDATE_MODE": "  ", "UPDATE_ROLLOUT_PERCENT": ""})
    assert (cfg.update_interval, cfg.update_mode, cfg.rollout_percent) == (3600, "auto", 100)


def test_defaults_match_the_contract_table() -> None:
    cfg = conf()
    assert cfg.update_interval == 3600
    assert cfg.update_mode == "auto"
    assert cfg.deployment_mode is None
    assert cfg.restart_method == "exec"
    assert cfg.systemd_unit == "avika-agent"
    assert cfg.rollout_percent == 100
    assert cfg.signature_threshold == 1
    assert cfg.state_dir == Path("/var/lib/avika-agent")
    assert cfg.health_window == 60
    assert cfg.max_boot_attempts == 3
    assert cfg.report_url is None and cfg.report_disabled is False and cfg.report_token is None
    assert cfg.buffer_dir == Path("/var/lib/avika-agent/data")
    assert cfg.agent_id is None


def test_unknown_keys_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "agent.conf"
    path.write_text(
        f"UPDATE_SERVER=http://gw/updates\nUPDATE_PUBLIC_KEYS={KEY1}\nLOG_LEVEL=debug\nWAL_SIZE=x\n"
    )
    cfg = load(path, environ={})
    assert cfg.update_server == "http://gw/updates"


# ---------------------------------------------------------------- file and environment


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.conf"
    path.write_text(f"UPDATE_SERVER=http://file/updates\nUPDATE_PUBLIC_KEYS={KEY1}\nUPDATE_MODE=vm-only\n")
    cfg = load(path, environ={"UPDATE_MODE": "signal-only", "UNRELATED": "x"})
    assert cfg.update_mode == "signal-only"
    assert cfg.update_server == "http://file/updates"


def test_environment_alone_configures_the_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "missing.conf")
    cfg = load(None, environ={"GATEWAYS": "gw1:5020", "UPDATE_PUBLIC_KEYS": KEY1})
    assert cfg.update_server == "http://gw1:5021/updates"


def test_a_missing_default_file_means_defaults_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "missing.conf")
    cfg = load(None, environ={"UPDATE_MODE": "disabled"})
    assert cfg.update_mode == "disabled"
    assert cfg.updates_disabled


def test_a_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path / "missing.conf", environ={"UPDATE_MODE": "disabled"})
    assert "missing.conf" in caught.value.message


def test_a_file_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "agent.conf"
    path.write_text("UPDATE_MODE=auto\nnonsense\n")
    with pytest.raises(ConfigError) as caught:
        load(path, environ={})
    assert f"{path}:2" in caught.value.message


# ---------------------------------------------------------------- validation

BAD_VALUES = [
    pytest.param("UPDATE_INTERVAL", "0s", id="a zero interval"),
    pytest.param("UPDATE_INTERVAL", "abc", id="an interval that is not a duration"),
    pytest.param("UPDATE_INTERVAL", "1.5h", id="a fractional interval"),
    pytest.param("UPDATE_INTERVAL", "30", id="an interval without a unit"),
    pytest.param("UPDATE_INTERVAL", "-5m", id="a negative interval"),
    pytest.param("UPDATE_INTERVAL", "1w", id="an interval in weeks"),
    pytest.param("UPDATE_MODE", "sometimes", id="an unknown update mode"),
    pytest.param("UPDATE_MODE", "AUTO", id="an update mode in capitals"),
    pytest.param("UPDATE_ROLLOUT_PERCENT", "101", id="a rollout percent above 100"),
    pytest.param("UPDATE_ROLLOUT_PERCENT", "-1", id="a negative rollout percent"),
    pytest.param("UPDATE_ROLLOUT_PERCENT", "x", id="a rollout percent that is not a number"),
    pytest.param("UPDATE_ROLLOUT_PERCENT", "50%", id="a rollout percent with a percent sign"),
    pytest.param("DEPLOYMENT_MODE", "vmware", id="an unknown deployment mode"),
    pytest.param("UPDATE_RESTART_METHOD", "reboot", id="an unknown restart method"),
    pytest.param("UPDATE_SYSTEMD_UNIT", "avika agent", id="a unit name with a space"),
    pytest.param("UPDATE_SIGNATURE_THRESHOLD", "2", id="a threshold above the number of keys"),
    pytest.param("UPDATE_SIGNATURE_THRESHOLD", "0", id="a threshold of zero"),
    pytest.param("UPDATE_SIGNATURE_THRESHOLD", "one", id="a threshold that is not a number"),
    pytest.param("UPDATE_PUBLIC_KEYS", "not-a-key", id="a public key that is not base64"),
    pytest.param("UPDATE_PUBLIC_KEYS", base64.b64encode(b"x" * 31).decode(), id="a public key of 31 bytes"),
    pytest.param("UPDATE_PUBLIC_KEYS", f"{KEY1},bogus", id="one bad key among good ones"),
    pytest.param("AGENT_ID", "web 01", id="an agent id with a space"),
    pytest.param("AGENT_ID", "a" * 129, id="an agent id of 129 characters"),
    pytest.param("AGENT_ID", "h\u00f6st", id="an agent id with a non-ASCII letter"),
    pytest.param("UPDATE_SERVER", "ftp://x", id="an ftp update server"),
    pytest.param("UPDATE_SERVER", "gw.example.com/updates", id="an update server without a scheme"),
    pytest.param("UPDATE_REPORT_URL", "file:///tmp/reports", id="a file report URL"),
    pytest.param("UPDATE_HEALTH_WINDOW", "0s", id="a zero health window"),
    pytest.param("UPDATE_MAX_BOOT_ATTEMPTS", "0", id="zero boot attempts"),
    pytest.param("UPDATE_MAX_BOOT_ATTEMPTS", "three", id="boot attempts that are not a number"),
    pytest.param("UPDATE_BINARY_ORIGINS", "cdn.example.com", id="an origin without a scheme"),
    pytest.param("UPDATE_BINARY_ORIGINS", "ftp://cdn.example.com", id="an ftp origin"),
    pytest.param("UPDATE_BINARY_ORIGINS", "https://cdn.example.com/avika", id="an origin with a path"),
    pytest.param("UPDATE_BINARY_ORIGINS", "https://u@cdn.example.com", id="an origin with userinfo"),
    pytest.param("UPDATE_BINARY_ORIGINS", "https://cdn.example.com?x", id="an origin with a query"),
    pytest.param("UPDATE_BINARY_ORIGINS", "https://cdn example.com", id="an origin with a space"),
    pytest.param("UPDATE_BINARY_ORIGINS", "https://cdn.example.com:99999", id="an origin with a bad port"),
    pytest.param("UPDATE_FETCH_TIMEOUT", "0s", id="a zero fetch timeout"),
    pytest.param("UPDATE_FETCH_TIMEOUT", "2 minutes", id="a fetch timeout in words"),
    pytest.param("UPDATE_DOWNLOAD_TIMEOUT", "30", id="a download timeout without a unit"),
    pytest.param("UPDATE_COMMIT_DEADLINE", "1m", id="a commit deadline not past the health window"),
    pytest.param("UPDATE_HEARTBEAT_INTERVAL", "-1s", id="a negative heartbeat interval"),
    pytest.param("UPDATE_HEARTBEAT_INTERVAL", "never", id="a heartbeat interval in words"),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_an_invalid_value_is_an_error_naming_key_and_value(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        conf(**{key: value})
    error = caught.value
    assert error.code == "invalid_config"
    assert error.key == key
    assert key in error.message
    shown = "bogus" if value.startswith(KEY1) else value
    assert shown in error.message


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("not-hex", id="not hex"),
        pytest.param("ab" * 31, id="62 hex digits"),
        pytest.param("ab" * 32 + "ab", id="66 hex digits"),
    ],
)
def test_a_bad_report_token_is_an_error_naming_the_key_but_not_echoing_the_secret(token: str) -> None:
    with pytest.raises(ConfigError) as caught:
        conf(UPDATE_REPORT_TOKEN=token)
    assert caught.value.key == "UPDATE_REPORT_TOKEN"
    assert "UPDATE_REPORT_TOKEN" in caught.value.message
    assert token not in caught.value.message


def test_a_report_token_is_read_as_lowercase_hex() -> None:
    assert conf(UPDATE_REPORT_TOKEN="AB" * 32).report_token == "ab" * 32


@pytest.mark.parametrize(
    ("key", "value", "attribute", "expected"),
    [
        pytest.param("UPDATE_MODE", "signal-only", "update_mode", "signal-only", id="signal-only mode"),
        pytest.param("DEPLOYMENT_MODE", "container", "deployment_mode", "container", id="container override"),
        pytest.param("UPDATE_RESTART_METHOD", "signal", "restart_method", "signal", id="signal restart"),
        pytest.param(
            "UPDATE_SYSTEMD_UNIT", "avika-agent@1.service", "systemd_unit", "avika-agent@1.service", id="unit"
        ),
        pytest.param("UPDATE_ROLLOUT_PERCENT", "0", "rollout_percent", 0, id="a halted local cap"),
        pytest.param("UPDATE_MAX_BOOT_ATTEMPTS", "5", "max_boot_attempts", 5, id="five boot attempts"),
        pytest.param("UPDATE_HEALTH_WINDOW", "2m", "health_window", 120, id="a two minute health window"),
        pytest.param("UPDATE_REPORT_URL", "disabled", "report_disabled", True, id="reports disabled"),
        pytest.param(
            "UPDATE_REPORT_URL", "https://r.example.com/v1", "report_url", "https://r.example.com/v1", id="r"
        ),
        pytest.param("UPDATE_STATE_DIR", "/srv/avika", "state_dir", Path("/srv/avika"), id="a state dir"),
        pytest.param(
            "AGENT_ID", "web-01.prod:a@b/c+d=e_f", "agent_id", "web-01.prod:a@b/c+d=e_f", id="an agent id"
        ),
        pytest.param("AGENT_ID", "a" * 128, "agent_id", "a" * 128, id="an agent id of 128 characters"),
    ],
)
def test_a_valid_value_is_read(key: str, value: str, attribute: str, expected: object) -> None:
    assert getattr(conf(**{key: value}), attribute) == expected


@pytest.mark.parametrize(
    ("values", "attribute", "expected"),
    [
        pytest.param({}, "binary_origins", (), id="no other binary origin by default"),
        pytest.param(
            {
                "UPDATE_BINARY_ORIGINS": "HTTPS://CDN.example.com:443/, http://[2001:DB8::1]:8080,https://cdn.example.com"
            },
            "binary_origins",
            ("https://cdn.example.com", "http://[2001:db8::1]:8080"),
            id="origins are normalised and folded",
        ),
        pytest.param({}, "fetch_timeout", 120, id="fetch timeout 2m"),
        pytest.param({"UPDATE_FETCH_TIMEOUT": "30s"}, "fetch_timeout", 30, id="fetch timeout 30s"),
        pytest.param({}, "download_timeout", 1800, id="download timeout 30m"),
        pytest.param({"UPDATE_DOWNLOAD_TIMEOUT": "1h"}, "download_timeout", 3600, id="download timeout 1h"),
        pytest.param({}, "commit_deadline_s", 60 + 600, id="commit deadline: health window + 10m"),
        pytest.param(
            {"UPDATE_HEALTH_WINDOW": "5m"}, "commit_deadline_s", 900, id="follows the health window"
        ),
        pytest.param({"UPDATE_COMMIT_DEADLINE": "20m"}, "commit_deadline_s", 1200, id="commit deadline 20m"),
        pytest.param({}, "heartbeat_interval", 3600, id="heartbeat 1h"),
        pytest.param({"UPDATE_HEARTBEAT_INTERVAL": "0"}, "heartbeat_interval", 0, id="heartbeat 0 is never"),
        pytest.param(
            {"UPDATE_HEARTBEAT_INTERVAL": "0s"}, "heartbeat_interval", 0, id="heartbeat 0s is never"
        ),
        pytest.param({"UPDATE_HEARTBEAT_INTERVAL": "15m"}, "heartbeat_interval", 900, id="heartbeat 15m"),
    ],
)
def test_the_keys_of_issue_10_have_designs_defaults(
    values: dict[str, str], attribute: str, expected: object
) -> None:
    assert getattr(conf(**values), attribute) == expected


def test_keys_and_threshold_are_read_and_duplicates_fold() -> None:
    cfg = conf(UPDATE_PUBLIC_KEYS=f"{KEY1}, {KEY2},{KEY1}", UPDATE_SIGNATURE_THRESHOLD="2")
    assert [k.b64 for k in cfg.public_keys] == [KEY1, KEY2]
    assert cfg.signature_threshold == 2
    with pytest.raises(ConfigError):
        conf(UPDATE_PUBLIC_KEYS=f"{KEY1},{KEY1}", UPDATE_SIGNATURE_THRESHOLD="2")


def test_keys_embedded_in_the_binary_are_used_when_none_are_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(buildinfo, "PUBLIC_KEYS", f"{KEY1},{KEY2}")
    cfg = from_values({"UPDATE_SERVER": "http://gw/updates"})
    assert [k.b64 for k in cfg.public_keys] == [KEY1, KEY2]
    assert [k.b64 for k in conf(UPDATE_PUBLIC_KEYS=KEY2).public_keys] == [KEY2]


def test_no_keys_at_all_is_an_error_unless_updates_are_disabled() -> None:
    with pytest.raises(ConfigError) as caught:
        from_values({"UPDATE_SERVER": "http://gw/updates"})
    assert caught.value.key == "UPDATE_PUBLIC_KEYS"
    assert from_values({"UPDATE_SERVER": "disabled"}).public_keys == ()
    assert from_values({"UPDATE_SERVER": "http://gw/updates", "UPDATE_MODE": "disabled"}).updates_disabled


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("1h", 3600),
        ("1h30m", 5400),
        ("2d", 172800),
        ("1h1m1s", 3661),
        ("1d12h", 129600),
        (" 45s ", 45),
        ("1s", 1),
    ],
)
def test_durations_are_whole_numbers_with_units(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "1.5h", "h", "1h 30m", "1H", "30sec", "-1s", "1w"])
def test_a_duration_without_units_or_with_other_units_is_an_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_an_interval_of_one_second_is_valid() -> None:
    assert conf(UPDATE_INTERVAL="1s").update_interval == 1


# ---------------------------------------------------------------- update server


@pytest.mark.parametrize(
    ("gateways", "server"),
    [
        pytest.param(
            "gw1.example.com:5020,gw2:5020",
            "http://gw1.example.com:5021/updates",
            id="the first gateway's host",
        ),
        pytest.param(" gw1:5020 , gw2:5020", "http://gw1:5021/updates", id="spaces around gateways"),
        pytest.param(",gw2:5020", "http://gw2:5021/updates", id="an empty first entry is skipped"),
        pytest.param("gw1", "http://gw1:5021/updates", id="a bare host"),
        pytest.param("10.0.0.7:5020", "http://10.0.0.7:5021/updates", id="an IPv4 address"),
        pytest.param("[::1]:5020", "http://[::1]:5021/updates", id="an IPv6 address with a port"),
        pytest.param(
            "[2001:db8::1]", "http://[2001:db8::1]:5021/updates", id="an IPv6 address without a port"
        ),
    ],
)
def test_update_server_is_derived_from_the_first_gateway(gateways: str, server: str) -> None:
    cfg = from_values({"GATEWAYS": gateways, "UPDATE_PUBLIC_KEYS": KEY1})
    assert cfg.update_server == server
    assert cfg.manifest_url == server + "/manifest.json"


def test_an_explicit_update_server_wins_over_gateways() -> None:
    cfg = from_values(
        {
            "GATEWAYS": "gw1:5020",
            "UPDATE_SERVER": "https://cdn.example.com/avika",
            **{"UPDATE_PUBLIC_KEYS": KEY1},
        }
    )
    assert cfg.update_server == "https://cdn.example.com/avika"
    assert cfg.gateways == ("gw1:5020",)


def test_no_server_and_no_gateways_is_an_error_unless_updates_are_disabled() -> None:
    with pytest.raises(ConfigError) as caught:
        from_values({"UPDATE_PUBLIC_KEYS": KEY1})
    assert caught.value.key == "UPDATE_SERVER"
    cfg = from_values({"UPDATE_MODE": "disabled"})
    assert cfg.updates_disabled
    assert cfg.update_server is None


def test_update_server_disabled_turns_updates_off() -> None:
    cfg = from_values({"UPDATE_SERVER": "disabled", "GATEWAYS": "gw1:5020"})
    assert cfg.update_server is None
    assert cfg.updates_disabled
    with pytest.raises(ConfigError):
        _ = cfg.manifest_url


def test_the_manifest_url_is_inside_the_server_directory() -> None:
    assert (
        conf(UPDATE_SERVER="http://gw:5021/updates/").manifest_url == "http://gw:5021/updates/manifest.json"
    )


# ---------------------------------------------------------------- agent id


def test_a_configured_agent_id_wins(tmp_path: Path) -> None:
    (tmp_path / "agent_id").write_text("saved-id\n")
    cfg = conf(AGENT_ID="configured-id", BUFFER_DIR=str(tmp_path))
    assert resolve_agent_id(cfg, hostname="host") == "configured-id"
    assert (tmp_path / "agent_id").read_text() == "saved-id\n"


def test_a_saved_agent_id_is_reused(tmp_path: Path) -> None:
    (tmp_path / "agent_id").write_text("saved-id\n")
    assert resolve_agent_id(conf(BUFFER_DIR=str(tmp_path)), hostname="host") == "saved-id"


def test_an_agent_id_is_generated_from_the_hostname_saved_and_stable(tmp_path: Path) -> None:
    buffer_dir = tmp_path / "data" / "nested"
    cfg = conf(BUFFER_DIR=str(buffer_dir))
    first = resolve_agent_id(cfg, hostname="web 01.example.com")
    assert valid_agent_id(first)
    assert first.startswith("web-01.example.com-")
    assert (buffer_dir / "agent_id").read_text().strip() == first
    assert resolve_agent_id(cfg, hostname="another-host") == first
    assert sorted(p.name for p in buffer_dir.iterdir()) == ["agent_id"]


@pytest.mark.parametrize(
    "hostname",
    [
        pytest.param("x" * 300, id="a very long hostname"),
        pytest.param("h\u00f6st/\u65e5\u672c", id="non-ASCII"),
    ],
)
def test_a_generated_agent_id_is_valid_whatever_the_hostname(tmp_path: Path, hostname: str) -> None:
    assert valid_agent_id(resolve_agent_id(conf(BUFFER_DIR=str(tmp_path)), hostname=hostname))


def test_an_invalid_saved_agent_id_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "agent_id").write_text("not valid at all\n")
    new = resolve_agent_id(conf(BUFFER_DIR=str(tmp_path)), hostname="host")
    assert new.startswith("host-") and valid_agent_id(new)
    assert (tmp_path / "agent_id").read_text().strip() == new


# ---------------------------------------------------------------- mistakes are named (DESIGN section 3)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (
            "UPDATE_INTERVL",
            "unknown key UPDATE_INTERVL in the file is ignored; did you mean UPDATE_INTERVAL?",
        ),
        (
            "UPDATE_PUBLIC_KEY",
            "unknown key UPDATE_PUBLIC_KEY in the file is ignored; did you mean UPDATE_PUBLIC_KEYS?",
        ),
        ("UPDATE_SERVERS", "unknown key UPDATE_SERVERS in the file is ignored; did you mean UPDATE_SERVER?"),
        (
            "UPDATE_BINARY_ORIGIN",
            "unknown key UPDATE_BINARY_ORIGIN in the file is ignored; did you mean UPDATE_BINARY_ORIGINS?",
        ),
        (
            "update_interval",
            "unknown key update_interval in the file is ignored; did you mean UPDATE_INTERVAL?",
        ),
        ("UPDATE_FOO", "unknown key UPDATE_FOO in the file is ignored"),
        ("UPDATE_NOTIFIER_ENABLED", "unknown key UPDATE_NOTIFIER_ENABLED in the file is ignored"),
    ],
)
def test_an_unknown_update_key_names_the_nearest_known_key(key: str, expected: str) -> None:
    assert config.unknown_key_warnings([key], "the file") == [expected]


def test_known_keys_and_other_keys_draw_no_warning() -> None:
    assert config.unknown_key_warnings([*config.KEYS, "LOG_LEVEL", "WAL_SIZE", "UPDATER"], "x") == []


def test_unknown_keys_in_the_file_and_the_environment_are_warnings_not_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "agent.conf"
    path.write_text(f"UPDATE_SERVER=http://gw/updates\nUPDATE_PUBLIC_KEYS={KEY1}\nUPDATE_INTERVL=5m\n")
    path.chmod(0o600)
    cfg = load(path, environ={"UPDATE_MODEE": "disabled", "PATH": "/bin"})
    assert cfg.update_interval == 3600 and cfg.update_mode == "auto"  # the typo changed nothing
    assert cfg.warnings == (
        f"unknown key UPDATE_INTERVL in config file {path} is ignored; did you mean UPDATE_INTERVAL?",
        "unknown key UPDATE_MODEE in the environment is ignored; did you mean UPDATE_MODE?",
    )
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == list(cfg.warnings)


MODE_CASES = [
    # mode, file group is the agent's own, holds a token, expected fragments
    pytest.param(0o600, True, True, [], id="0600 with a token"),
    pytest.param(0o400, True, True, [], id="0400 with a token"),
    pytest.param(0o640, True, True, [], id="0640, the agent's group, with a token"),
    pytest.param(0o640, False, True, ["readable by group"], id="0640, another group, with a token"),
    pytest.param(0o644, True, True, ["readable by others"], id="0644 with a token"),
    pytest.param(0o604, True, True, ["readable by others"], id="0604 with a token"),
    pytest.param(0o644, True, False, [], id="0644 without a token"),
    pytest.param(0o664, False, False, ["writable by group"], id="0664 without a token"),
    pytest.param(
        0o646, True, True, ["readable by others", "writable by group or others"], id="0646 with a token"
    ),
]


@pytest.mark.parametrize(("mode", "own_group", "token", "expected"), MODE_CASES)
def test_a_config_file_that_exposes_the_token_or_the_keys_is_named(
    mode: int, own_group: bool, token: bool, expected: list[str]
) -> None:
    path = Path("/etc/avika/avika-agent.conf")
    warnings = config.file_mode_warnings(path, 0o100000 | mode, 1000 if own_group else 0, 1000, token)
    assert len(warnings) == len(expected)
    for fragment, warning in zip(expected, warnings):
        assert fragment in warning and str(path) in warning and f"{mode:04o}" in warning
        assert "chmod" in warning


def test_the_group_warning_names_both_groups() -> None:
    (warning,) = config.file_mode_warnings(Path("/c"), 0o100640, 0, 4, True)
    assert "group root (0)" in warning and "agent's group (adm (4))" in warning


def test_a_token_file_readable_by_others_warns_on_load(tmp_path: Path) -> None:
    path = tmp_path / "agent.conf"
    path.write_text(
        f"UPDATE_SERVER=http://gw/updates\nUPDATE_PUBLIC_KEYS={KEY1}\nUPDATE_REPORT_TOKEN={'ab' * 32}\n"
    )
    path.chmod(0o644)
    (warning,) = load(path, environ={}).warnings
    assert "readable by others (mode 0644)" in warning and "ab" * 32 not in warning
    path.chmod(0o600)
    assert load(path, environ={}).warnings == ()
    path.write_text("UPDATE_REPORT_TOKEN=\nUPDATE_MODE=disabled\n")  # empty: no token in the file
    path.chmod(0o644)
    assert load(path, environ={"UPDATE_REPORT_TOKEN": "ab" * 32}).warnings == ()


def test_a_config_file_larger_than_any_config_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.conf"
    path.write_bytes(b"#" * (config.MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than"):
        load(path, environ={})


# ---------------------------------------------------------------- the documented keys

ROOT = Path(__file__).resolve().parent.parent


def _readme_table() -> dict[str, tuple[str, str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Agent configuration", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_]+)` \| (.*?) \| (.*?) \|$", section, re.MULTILINE)
    return {key: (default, meaning) for key, default, meaning in rows}


def test_the_readme_table_lists_every_key_once() -> None:
    assert sorted(_readme_table()) == sorted(config.KEYS)


@pytest.mark.parametrize(
    ("key", "default", "meaning"),
    [
        ("UPDATE_BINARY_ORIGINS", "—", "allowed for absolute binary URLs besides the manifest's own"),
        ("UPDATE_FETCH_TIMEOUT", "`2m`", "however slowly bytes arrive"),
        ("UPDATE_DOWNLOAD_TIMEOUT", "`30m`", "a stall of 60 s also fails it"),
        ("UPDATE_COMMIT_DEADLINE", "health window + `10m`", "rolled back whatever it is doing"),
        ("UPDATE_HEARTBEAT_INTERVAL", "`1h`", "`0` = never"),
    ],
)
def test_the_readme_gives_the_new_keys_designs_defaults_and_meanings(
    key: str, default: str, meaning: str
) -> None:
    row_default, row_meaning = _readme_table()[key]
    assert row_default == default
    assert meaning in row_meaning


def test_the_readme_defaults_are_the_codes_defaults() -> None:
    table, cfg = _readme_table(), conf()
    for key, attribute in [
        ("UPDATE_INTERVAL", "update_interval"),
        ("UPDATE_HEALTH_WINDOW", "health_window"),
        ("UPDATE_FETCH_TIMEOUT", "fetch_timeout"),
        ("UPDATE_DOWNLOAD_TIMEOUT", "download_timeout"),
        ("UPDATE_HEARTBEAT_INTERVAL", "heartbeat_interval"),
    ]:
        assert parse_duration(table[key][0].strip("`")) == getattr(cfg, attribute), key
    assert cfg.commit_deadline_s == cfg.health_window + parse_duration("10m")


def test_the_sample_file_lists_every_key_and_is_a_valid_config_of_defaults() -> None:
    sample = ROOT / "packaging" / "avika-agent.conf"
    values = parse_file(sample.read_text(encoding="utf-8"), str(sample))
    assert sorted(values) == sorted(config.KEYS)
    assert config.unknown_key_warnings(values, str(sample)) == []
    cfg = from_values({**values, "UPDATE_PUBLIC_KEYS": KEY1})
    defaults = conf()
    for attribute in (
        "update_interval",
        "update_mode",
        "health_window",
        "max_boot_attempts",
        "binary_origins",
        "fetch_timeout",
        "download_timeout",
        "commit_deadline_s",
        "heartbeat_interval",
    ):
        assert getattr(cfg, attribute) == getattr(defaults, attribute), attribute


def test_the_docs_give_the_mode_for_a_file_holding_the_token() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8").split("## Agent configuration", 1)[1]
    sample = (ROOT / "packaging" / "avika-agent.conf").read_text(encoding="utf-8")
    for text in (readme, sample):
        assert "chmod 600" in text and "chmod 640" in text and "root:avika-agent" in text
