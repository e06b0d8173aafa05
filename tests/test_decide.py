"""The update decision: a pure function of manifest, host and bad versions (DESIGN sections 2, 3).

- ``UPDATE_MODE=disabled`` does nothing; ``vm-only`` does nothing in a container;
- the same version does nothing; an older one only with ``downgrade`` (and then in waves);
- a container (any mode but vm-only) and ``signal-only`` report instead of updating, whatever
  the wave, and say whether they are in it;
- a known-bad (version, sha256) is never installed, even when forced; other bytes are fine;
- percent 0 is halted: nobody acts and containers don't report it as available (reason
  ``halted``), unless ``min_version`` forces it;
- ``min_version`` forces the update past the wave, the local cap and a halt;
- otherwise the agent updates only inside the wave: bucket < min(percent, local cap);
- raising the percent only ever adds agents.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.decide import NONE, REPORT, UPDATE, Decision, Host, decide
from agent.manifest import Binary, Manifest, Rollout, in_wave, rollout_bucket

SHA_AMD64 = "a" * 64
SHA_ARM64 = "b" * 64
SALT = "0.2.0"


@functools.cache
def agent_in_bucket(bucket: int, salt: str = SALT) -> str:
    """An agent id whose rollout bucket under ``salt`` is ``bucket``."""
    for i in range(100_000):
        agent_id = f"host-{i}"
        if rollout_bucket(agent_id, salt) == bucket:
            return agent_id
    raise AssertionError(f"no agent id in bucket {bucket}")


def manifest(
    version: str = "0.2.0",
    *,
    percent: int = 100,
    min_version: str | None = None,
    downgrade: bool = False,
    sha: str = SHA_AMD64,
) -> Manifest:
    now = datetime(2026, 3, 1, tzinfo=timezone.utc)
    return Manifest(
        serial=7,
        version=version,
        released_at=now,
        expires=now + timedelta(days=30),
        binaries={
            "linux-amd64": Binary(url="binaries/amd64", sha256=sha, size=10),
            "linux-arm64": Binary(url="binaries/arm64", sha256=SHA_ARM64, size=10),
        },
        min_version=min_version,
        rollout=Rollout(percent=percent, salt=SALT),
        downgrade=downgrade,
    )


def host(
    bucket: int = 10,
    *,
    current: str = "0.1.0",
    mode: str = "vm",
    update_mode: str = "auto",
    cap: int = 100,
    platform: str | None = "linux-amd64",
) -> Host:
    return Host(
        agent_id=agent_in_bucket(bucket),
        current_version=current,
        mode=mode,
        update_mode=update_mode,
        local_cap=cap,
        platform=None if mode == "container" else platform,
    )


DECISIONS = [
    # -- modes
    pytest.param(manifest(), host(update_mode="disabled"), (), NONE, "disabled", id="disabled does nothing"),
    pytest.param(
        manifest(),
        host(mode="container", update_mode="vm-only"),
        (),
        NONE,
        "vm_only_in_container",
        id="vm-only in a container does nothing",
    ),
    # -- versions
    pytest.param(manifest("0.1.0"), host(), (), NONE, "up_to_date", id="the running version is up to date"),
    pytest.param(
        manifest("0.1"), host(current="v0.1.0"), (), NONE, "up_to_date", id="equal PEP 440 versions"
    ),
    pytest.param(
        manifest("0.0.9"),
        host(),
        (),
        NONE,
        "older_than_running",
        id="an older version without downgrade is ignored",
    ),
    pytest.param(
        manifest("0.0.9", downgrade=True),
        host(bucket=10),
        (),
        UPDATE,
        "downgrade",
        id="an older version with downgrade updates in the wave",
    ),
    pytest.param(
        manifest("0.0.9", downgrade=True, percent=50),
        host(bucket=80),
        (),
        NONE,
        "not_in_wave",
        id="an older version with downgrade waits outside the wave",
    ),
    pytest.param(
        manifest("0.1.10"),
        host(current="0.1.9"),
        (),
        UPDATE,
        "newer_version",
        id="0.1.10 is newer than 0.1.9",
    ),
    pytest.param(
        manifest("1.0.0"),
        host(current="1.0.0rc1"),
        (),
        UPDATE,
        "newer_version",
        id="a release is newer than its rc",
    ),
    pytest.param(
        manifest("0.2.0"),
        host(current="dev-build"),
        (),
        UPDATE,
        "newer_version",
        id="an unparsable running version updates",
    ),
    # -- waves
    pytest.param(
        manifest(percent=50), host(bucket=49), (), UPDATE, "newer_version", id="a newer version in the wave"
    ),
    pytest.param(
        manifest(percent=50), host(bucket=50), (), NONE, "not_in_wave", id="bucket equal to percent waits"
    ),
    pytest.param(
        manifest(percent=100), host(bucket=99), (), UPDATE, "newer_version", id="percent 100 takes everyone"
    ),
    # -- halted (percent 0): nobody acts, nobody calls it available (DESIGN section 2)
    pytest.param(
        manifest(percent=0), host(bucket=0), (), NONE, "halted", id="a halted release stops everyone"
    ),
    pytest.param(manifest(percent=0), host(bucket=99), (), NONE, "halted", id="halted, outside any wave"),
    pytest.param(
        manifest(percent=0),
        host(bucket=10, mode="container"),
        (),
        NONE,
        "halted",
        id="a container does not report a halted release as available",
    ),
    pytest.param(
        manifest(percent=0),
        host(bucket=10, update_mode="signal-only"),
        (),
        NONE,
        "halted",
        id="signal-only does not report a halted release",
    ),
    pytest.param(
        manifest("0.0.9", percent=0, downgrade=True),
        host(bucket=10),
        (),
        NONE,
        "halted",
        id="a halted signed downgrade stops too",
    ),
    pytest.param(
        manifest(percent=0),
        host(bucket=10),
        {("0.2.0", SHA_AMD64)},
        NONE,
        "halted",
        id="halted comes before bad_version",
    ),
    pytest.param(
        manifest("0.1.0", percent=0), host(), (), NONE, "up_to_date", id="an up-to-date agent is up to date"
    ),
    pytest.param(
        manifest(percent=1),
        host(bucket=0),
        (),
        UPDATE,
        "newer_version",
        id="percent 1 is not halted: bucket 0 updates",
    ),
    pytest.param(
        manifest(percent=100),
        host(bucket=50, cap=30),
        (),
        NONE,
        "not_in_wave",
        id="the local cap lowers the wave",
    ),
    pytest.param(
        manifest(percent=100),
        host(bucket=20, cap=30),
        (),
        UPDATE,
        "newer_version",
        id="inside the local cap updates",
    ),
    pytest.param(
        manifest(percent=30),
        host(bucket=50, cap=100),
        (),
        NONE,
        "not_in_wave",
        id="a higher local cap does not raise the wave",
    ),
    pytest.param(
        manifest(percent=60),
        host(bucket=50, cap=40),
        (),
        NONE,
        "not_in_wave",
        id="effective percent is the minimum",
    ),
    pytest.param(
        manifest(percent=100), host(bucket=0, cap=0), (), NONE, "not_in_wave", id="a local cap of 0 halts"
    ),
    # -- forced
    pytest.param(
        manifest(percent=0, min_version="0.1.5"),
        host(bucket=99),
        (),
        UPDATE,
        "below_min_version",
        id="min_version forces past a halted release",
    ),
    pytest.param(
        manifest(percent=10, min_version="0.1.5"),
        host(bucket=90),
        (),
        UPDATE,
        "below_min_version",
        id="min_version forces outside the wave",
    ),
    pytest.param(
        manifest(min_version="0.1.5"),
        host(bucket=90, cap=0),
        (),
        UPDATE,
        "below_min_version",
        id="min_version forces past the local cap",
    ),
    pytest.param(
        manifest(percent=10, min_version="0.1.0"),
        host(bucket=90),
        (),
        NONE,
        "not_in_wave",
        id="an agent at min_version is not forced",
    ),
    pytest.param(
        manifest(min_version="0.1.5"),
        host(update_mode="disabled"),
        (),
        NONE,
        "disabled",
        id="disabled pins a host even below min_version",
    ),
    # -- reporting instead of updating
    pytest.param(
        manifest(percent=50),
        host(bucket=10, mode="container"),
        (),
        REPORT,
        "container",
        id="a container reports",
    ),
    pytest.param(
        manifest(percent=50),
        host(bucket=90, mode="container"),
        (),
        REPORT,
        "container",
        id="a container reports outside the wave",
    ),
    pytest.param(
        manifest(percent=50),
        host(bucket=90, mode="container", update_mode="signal-only"),
        (),
        REPORT,
        "container",
        id="signal-only in a container reports",
    ),
    pytest.param(
        manifest("0.1.0"),
        host(mode="container"),
        (),
        NONE,
        "up_to_date",
        id="an up-to-date container is quiet",
    ),
    pytest.param(
        manifest(percent=50),
        host(bucket=90, update_mode="signal-only"),
        (),
        REPORT,
        "signal_only",
        id="signal-only on a VM reports",
    ),
    # -- bad versions
    pytest.param(
        manifest(),
        host(),
        {("0.2.0", SHA_AMD64)},
        NONE,
        "bad_version",
        id="a bad version and sha256 is never installed",
    ),
    pytest.param(
        manifest(min_version="0.1.5"),
        host(),
        {("0.2.0", SHA_AMD64)},
        NONE,
        "bad_version",
        id="a bad version is not installed even when forced",
    ),
    pytest.param(
        manifest(sha="c" * 64),
        host(),
        {("0.2.0", SHA_AMD64)},
        UPDATE,
        "newer_version",
        id="a bad version with other bytes updates",
    ),
    pytest.param(
        manifest(),
        host(),
        {("0.2.0", SHA_ARM64)},
        UPDATE,
        "newer_version",
        id="another platform's bad bytes do not matter",
    ),
    pytest.param(
        manifest(),
        host(),
        {("0.1.9", SHA_AMD64)},
        UPDATE,
        "newer_version",
        id="the same bytes under another version do not matter",
    ),
]


@pytest.mark.parametrize(("m", "h", "bad", "action", "reason"), DECISIONS)
def test_decision_table(m: Manifest, h: Host, bad: Any, action: str, reason: str) -> None:
    decision = decide(m, h, bad)
    assert (decision.action, decision.reason) == (action, reason)


def test_disabled_reports_no_wave_at_all() -> None:
    assert decide(manifest(), host(update_mode="disabled")) == Decision(NONE, "disabled")


@pytest.mark.parametrize(("bucket", "inside"), [(10, True), (90, False)])
def test_a_container_report_says_whether_it_is_in_the_wave(bucket: int, inside: bool) -> None:
    decision = decide(manifest(percent=50), host(bucket=bucket, mode="container"))
    assert decision.action == REPORT
    assert decision.in_wave is inside
    assert decision.bucket == bucket


def test_a_halted_release_gives_no_action_to_any_host_unless_forced() -> None:
    fleet = [
        host(bucket=b, mode=mode, update_mode=um)
        for b in (0, 50, 99)
        for mode in ("vm", "container")
        for um in ("auto", "signal-only")
    ]
    assert {
        (decide(manifest(percent=0), h).action, decide(manifest(percent=0), h).reason) for h in fleet
    } == {(NONE, "halted")}
    forced = {decide(manifest(percent=0, min_version="0.1.5"), h).action for h in fleet}
    assert forced == {UPDATE, REPORT}


def test_a_container_below_min_version_reports_forced() -> None:
    decision = decide(manifest(min_version="0.1.5", percent=0), host(mode="container"))
    assert (decision.action, decision.forced, decision.in_wave) == (REPORT, True, False)


def test_a_forced_update_reports_its_bucket_and_wave() -> None:
    decision = decide(manifest(min_version="0.1.5", percent=10), host(bucket=90))
    assert decision.to_dict() == {
        "action": UPDATE,
        "reason": "below_min_version",
        "bucket": 90,
        "in_wave": False,
        "forced": True,
    }


def test_the_bucket_uses_the_manifest_salt() -> None:
    agent_id = agent_in_bucket(42)
    decision = decide(manifest(), Host(agent_id, "0.1.0", "vm", platform="linux-amd64"))
    assert decision.bucket == rollout_bucket(agent_id, SALT) == 42


# ---------------------------------------------------------------- waves only grow


@settings(max_examples=200, deadline=None)
@given(
    agent_id=st.text(min_size=1, max_size=40),
    salt=st.text(max_size=10),
    p=st.integers(0, 100),
    q=st.integers(0, 100),
    cap=st.integers(0, 100),
)
def test_raising_the_percent_only_adds_agents(agent_id: str, salt: str, p: int, q: int, cap: int) -> None:
    low, high = sorted((p, q))
    if in_wave(agent_id, Rollout(low, salt), cap):
        assert in_wave(agent_id, Rollout(high, salt), cap)
    if in_wave(agent_id, Rollout(100, salt), low):
        assert in_wave(agent_id, Rollout(100, salt), high)


def test_raising_the_percent_only_adds_agents_across_a_fleet() -> None:
    fleet = [f"node-{i:05d}.example.com" for i in range(5000)]
    previous: set[str] = set()
    for percent in (0, 1, 5, 10, 25, 50, 75, 99, 100):
        m = manifest(percent=percent)
        updating = {
            a for a in fleet if decide(m, Host(a, "0.1.0", "vm", platform="linux-amd64")).action == UPDATE
        }
        assert previous <= updating
        # FNV-1a spreads ids evenly: each wave holds about `percent` % of the fleet.
        assert abs(len(updating) / len(fleet) * 100 - percent) < 3
        previous = updating
    assert previous == set(fleet)
