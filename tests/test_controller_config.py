"""The controller's configuration from its environment, and the pure Lease and state rules.

An invalid value exits 2 naming the variable and the value (``avika-controller run``), before any
request is made; a Lease is held by one replica at a time; the state ConfigMap is refused, never
reset, when it does not parse (it holds the bad versions).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller.config import ConfigError, load, parse_tokens
from controller.lease import CREATE, RENEW, TAKE, WAIT, lease_step, release_ops
from controller.state import BadVersion, ControllerState, StateError, parse_state
from infra.reports.auth import make_token
from tests.controller_fixtures import PUBLIC_KEY

CONTROLLER = str(Path(sys.executable).parent / "avika-controller")
BASE = {
    "AVIKA_UPDATE_SERVER": "https://updates.example.com/avika",
    "AVIKA_CLUSTER_ID": "prod-eu",
    "AVIKA_PUBLIC_KEYS": PUBLIC_KEY,
    "AVIKA_NAMESPACE": "avika",
}
TOKEN = make_token("secret-0123456789abcdef", "x")


def test_defaults() -> None:
    cfg = load(BASE)
    assert cfg.manifest_url == "https://updates.example.com/avika/manifest.json"
    assert (cfg.health_window, cfg.progress_deadline, cfg.reconcile_interval, cfg.interval) == (
        300,
        600,
        10,
        300,
    )
    assert (cfg.state_configmap, cfg.lease_name, cfg.lease_duration) == (
        "avika-controller-state",
        "avika-controller",
        30,
    )
    assert cfg.namespaces is None and cfg.report_url is None and cfg.heartbeat_interval == 3600


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"AVIKA_UPDATE_SERVER": ""}, "AVIKA_UPDATE_SERVER is required"),
        ({"AVIKA_UPDATE_SERVER": "ftp://x/y"}, "AVIKA_UPDATE_SERVER='ftp://x/y' is not an http(s) URL"),
        ({"AVIKA_CLUSTER_ID": ""}, "AVIKA_CLUSTER_ID is required"),
        ({"AVIKA_CLUSTER_ID": "prod/eu"}, "AVIKA_CLUSTER_ID: cluster id 'prod/eu'"),
        ({"AVIKA_PUBLIC_KEYS": "not-a-key"}, "AVIKA_PUBLIC_KEYS: public key 'not-a-key' is not base64"),
        (
            {"AVIKA_SIGNATURE_THRESHOLD": "2"},
            "AVIKA_SIGNATURE_THRESHOLD='2' must be a whole number from 1 to 1",
        ),
        ({"AVIKA_HEALTH_WINDOW": "5 minutes"}, "AVIKA_HEALTH_WINDOW='5 minutes' is not a duration"),
        ({"AVIKA_RECONCILE_INTERVAL": "20s"}, "must be at most half of AVIKA_LEASE_DURATION"),
        ({"AVIKA_NAMESPACES": "avika,Bad_NS"}, "AVIKA_NAMESPACES: 'Bad_NS' is not a namespace name"),
        ({"UPDATE_REPORT_URL": "reports.example.com"}, "UPDATE_REPORT_URL='reports.example.com'"),
        ({"UPDATE_REPORT_TOKEN": "k8s/a=nothex"}, "UPDATE_REPORT_TOKEN: a token is 64 hex digits"),
        ({"UPDATE_REPORT_TOKEN": f"bad id={TOKEN}"}, "UPDATE_REPORT_TOKEN: 'bad id' is not an agent id"),
    ],
)
def test_invalid_values_name_the_variable(change: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load({**BASE, **change})
    assert message in refused.value.message


def test_tokens_per_workload_and_a_fallback() -> None:
    tokens = parse_tokens(f" k8s/prod-eu/avika/daemonset/avika-agent={TOKEN} , {TOKEN.upper()} ")
    assert tokens.for_agent("k8s/prod-eu/avika/daemonset/avika-agent") == TOKEN
    assert tokens.for_agent("k8s/prod-eu/avika/deployment/other") == TOKEN  # the bare one
    assert parse_tokens("").for_agent("x") is None


def test_run_with_an_invalid_config_exits_2_before_any_request() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AVIKA_", "UPDATE_"))}
    env.update({**BASE, "AVIKA_CLUSTER_ID": "", "KUBECONFIG": "/nonexistent"})
    done = subprocess.run(
        [CONTROLLER, "run", "--once"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert done.returncode == 2
    assert "invalid_config: AVIKA_CLUSTER_ID is required" in done.stderr


# ---------------------------------------------------------------- Lease, on data

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def lease(holder: str | None, renewed: datetime | None, rv: str | None = None) -> dict:
    spec: dict = {"leaseDurationSeconds": 30, "leaseTransitions": 2}
    if holder is not None:
        spec["holderIdentity"] = holder
    if renewed is not None:
        spec["renewTime"] = renewed.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    meta = {"name": "avika-controller", "namespace": "avika", **({"resourceVersion": rv} if rv else {})}
    return {"metadata": meta, "spec": spec}


def step(obj: dict | None, me: str = "a", now: datetime = T0):  # type: ignore[no-untyped-def]
    return lease_step(obj, me, now, 30, namespace="avika", name="avika-controller")


def test_lease_rules() -> None:
    assert step(None).kind == CREATE
    assert step(lease("a", T0 - timedelta(seconds=5))).kind == RENEW
    waiting = step(lease("b", T0 - timedelta(seconds=5)))
    assert (waiting.kind, waiting.holder, waiting.expires) == (WAIT, "b", T0 + timedelta(seconds=25))
    taken = step(lease("b", T0 - timedelta(seconds=31), rv="812"))
    assert taken.kind == TAKE
    assert taken.ops is not None and taken.ops[:2] == [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "812"},
        {"op": "test", "path": "/spec/holderIdentity", "value": "b"},
    ]
    assert {"op": "add", "path": "/spec/leaseTransitions", "value": 3} in taken.ops
    released = step(lease("", T0 - timedelta(seconds=1)))
    assert released.kind == TAKE and released.ops is not None
    assert released.ops[0] == {"op": "test", "path": "/spec/holderIdentity", "value": ""}
    assert release_ops(lease("b", T0), "a") is None
    assert release_ops(lease("a", T0), "a") == [
        {"op": "test", "path": "/spec/holderIdentity", "value": "a"},
        {"op": "add", "path": "/spec/holderIdentity", "value": ""},
    ]


# ---------------------------------------------------------------- state, on data


def test_state_round_trips_and_keeps_bad_versions_by_pair() -> None:
    state = ControllerState(7, "d" * 64).with_bad(
        BadVersion("1.2.0", "reg/a:1.2.0", "k8s/x", "CrashLoopBackOff", "t")
    )
    again = parse_state(state.to_text())
    assert again == state
    assert again.is_bad("1.2.0", "reg/a:1.2.0") and not again.is_bad("1.2.0", "reg/a@sha256:" + "e" * 64)
    assert again.with_bad(again.bad[0]) is again  # recorded once


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[]",
        '{"format": 2}',
        '{"format": 1, "highest_serial": "7"}',
        '{"format": 1, "bad": [{"version": 1}]}',
    ],
)
def test_an_unreadable_state_is_refused_never_reset(text: str) -> None:
    with pytest.raises(StateError):
        parse_state(text)
    assert parse_state(None) == parse_state("") == ControllerState()
