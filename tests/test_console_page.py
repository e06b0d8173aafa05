"""The web console in a real browser (DESIGN section 9): Debian's chromium through chromedriver.

No simulated DOM: selenium drives ``/usr/bin/chromium`` (headless, fresh profile, no network
beyond 127.0.0.1, no selenium-manager downloads) against the real ``serve --console``. Agents
report through the agent's own report queue (``agent.reports.QueueSink``) over HTTP.

Rules enforced here:
- the page signs in with a token from its form or from ``#token=`` (then gone from the address bar)
  and shows agents from real reports, states coloured with the CLI's tones;
- a click on an agent opens its history; the release card shows version, serial, percent, expiry;
- an ``operate`` token halts and sets the rollout through a confirm step (``data-action`` halt,
  rollout + ``data-field=rollout-percent``, confirm, cancel); the store then holds a manifest the
  agent's verifier accepts; a ``read`` token sees no controls;
- a release that moved behind the operator's back is not halted (412, said on the page);
- it polls with If-None-Match (304s) and picks up new reports without a reload;
- no JavaScript error and no CSP violation in the browser's console.

A screenshot of each scene lands in the test's tmp dir; the signed-in overview is also copied to
``/tmp/avika-console-screenshots/`` (``console.png``, ``console-confirm.png``) for people to look at.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from console_fixtures import OPERATE_SECRET, READ_SECRET, Site, release, sign_plan, start_site

from agent.events import Origin
from agent.reports import QueueSink
from infra.reports.auth import make_token
from publisher import fleet

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOTS = Path("/tmp/avika-console-screenshots")
WAIT = 60.0  # generous: two cores shared by many sessions


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("chromium and chromium-driver are required (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1440,1800",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what: Callable[[], Any], timeout: float = WAIT, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = what()
        except Exception as exc:  # stale elements while the page re-renders
            last = exc
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {message or what}: last {last!r}")


def css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def text_of(driver: Any, selector: str) -> str:
    found = css(driver, selector)
    return found[0].text if found else ""


def sink(site: Site, agent_id: str, version: str, mode: str = "vm") -> QueueSink:
    origin = Origin(agent_id, version, mode, "linux-amd64")
    return QueueSink(
        origin,
        state_dir=site.tmp / "agents" / agent_id,
        report_url=f"{site.url}/v1/reports",
        token=make_token("console-test-fleet-secret-0123456789", agent_id),
    )


def real_fleet(site: Site) -> None:
    """Reports through the agent's own queue and sender: commits, a rollback, a container, silence."""
    for n in range(1, 5):
        old = sink(site, f"host-{n:02d}", "0.1.43")
        for state in ("downloading", "verifying", "staged", "restarting"):
            old.emit(state, target_version="0.1.44", manifest_serial=1)
        assert old.flush(30)
        new = sink(site, f"host-{n:02d}", "0.1.44")
        for state in ("watching", "committed"):
            new.emit(state, target_version="0.1.44", manifest_serial=1)
        assert new.flush(30)
    bad = sink(site, "host-07", "0.1.43")
    for state in ("downloading", "verifying", "staged", "restarting"):
        bad.emit(state, target_version="0.1.44", manifest_serial=1)
    bad.emit(
        "rolled_back",
        target_version="0.1.44",
        manifest_serial=1,
        failed_state="watching",
        error="too_many_boots: 4 boots without a commit",
    )
    assert bad.flush(30)
    busy = sink(site, "host-08", "0.1.43")
    busy.emit("downloading", target_version="0.1.44", manifest_serial=1)
    assert busy.flush(30)
    for name in ("k8s/prod-eu/avika/daemonset/avika-agent", "k8s/prod-us/avika/deployment/avika-edge"):
        pod = sink(site, name, "0.1.43", "container")
        pod.emit(
            "update_available",
            target_version="0.1.44",
            manifest_serial=1,
            image="ghcr.io/avika/agent:0.1.44",
            in_wave=True,
        )
        assert pod.flush(30)
    # Heartbeats (the transport engineer's agents send them; here posted as they will be).
    site.heartbeat("host-05", version="0.1.43", last_result="not_in_wave")
    site.heartbeat("host-06", version="0.1.43", last_result="not_in_wave")


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = start_site(tmp_path, rollout=25)
    real_fleet(s)
    # One agent went silent four hours ago (its report received then; the store's clock is data).
    s.server.reports.clock = lambda: time.time() - 4 * 3600  # type: ignore[union-attr]
    s.report("host-09", "committed", version="0.1.44")
    s.server.reports.clock = time.time  # type: ignore[union-attr]
    yield s
    s.close()


def sign_in(driver: Any, site: Site, secret: str) -> None:
    driver.get(f"{site.url}/console/")
    box = wait_for(
        lambda: [b for b in css(driver, "#token-input") if b.is_displayed()], message="the sign-in form"
    )[0]
    box.send_keys(secret)
    css(driver, "[data-action=login]")[0].click()
    wait_for(lambda: len(css(driver, "#agents tbody tr")) >= 10, message="the agents table")


def shot(driver: Any, tmp_path: Path, name: str, keep: bool = False) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    if keep:
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SHOTS / name)
    return path


def page_problems(driver: Any) -> list[str]:
    """Browser console entries that are errors: JavaScript exceptions, CSP violations."""
    entries = driver.get_log("browser")
    return [e["message"] for e in entries if e["level"] == "SEVERE" and "favicon" not in e["message"]]


# ---------------------------------------------------------------- the story


def test_sign_in_see_the_fleet_open_a_history_and_halt(browser: Any, site: Site, tmp_path: Path) -> None:
    sign_in(browser, site, OPERATE_SECRET)
    rows = {r.get_attribute("data-agent-id"): r for r in css(browser, "#agents tbody tr")}
    assert {"host-01", "host-07", "host-09", "k8s/prod-eu/avika/daemonset/avika-agent"} <= set(rows)
    assert "rolled_back" in rows["host-07"].text and "too_many_boots" in rows["host-07"].text
    assert "silent" in rows["host-09"].text
    committed = css(browser, "[data-agent-id='host-01'] .pill")[0]
    assert "tone-ok" in committed.get_attribute("class")
    assert "tone-bad" in css(browser, "[data-agent-id='host-07'] .pill")[0].get_attribute("class")

    release_card = text_of(browser, "#release")
    assert "0.1.44" in release_card and "25 %" in release_card and "in 29d" in release_card
    assert text_of(browser, "[data-field=serial]") == "1"
    assert "containers to roll" in text_of(browser, "#attention").lower()
    assert "ghcr.io/avika/agent:0.1.44" in text_of(browser, "[data-role=containers]")
    assert "host-09" in text_of(browser, "[data-role=silent]")
    assert "host-07" in text_of(browser, "[data-role=failures]")
    assert text_of(browser, "[data-count=vm-on_live]") == "5"  # host-01..04 and host-09
    assert text_of(browser, "[data-field=verdict]") == "HOLD"  # 6 ended < 20 agents
    shot(browser, tmp_path, "console.png", keep=True)

    rows["host-07"].click()
    history = wait_for(lambda: css(browser, "[data-role=history] li"), message="the agent's history")
    assert [li.get_attribute("data-state") for li in history] == [
        "rolled_back",
        "restarting",
        "staged",
        "verifying",
        "downloading",
    ]
    assert "too_many_boots" in text_of(browser, "#agent")
    shot(browser, tmp_path, "console-agent.png", keep=True)
    css(browser, "[data-action=close-agent]")[0].click()
    wait_for(lambda: not css(browser, "#agent")[0].is_displayed(), message="the drawer to close")

    css(browser, "[data-action=halt]")[0].click()
    confirm = wait_for(lambda: css(browser, "[data-action=confirm]"), message="the confirm step")[0]
    assert "Halt 0.1.44" in text_of(browser, "[data-role=confirm]")
    assert site.live().serial == 1  # nothing signed before the confirming click
    shot(browser, tmp_path, "console-confirm.png", keep=True)
    confirm.click()
    wait_for(lambda: text_of(browser, "[data-field=serial]") == "2", message="serial 2 on the page")
    assert css(browser, "[data-field=halted]") and text_of(browser, "[data-field=percent]").startswith("0 %")

    live = site.live()  # the agent's own verifier accepts what the page made the server sign
    assert (live.version, live.serial, live.rollout.percent) == ("0.1.44", 2, 0)
    wait_for(lambda: "ops" in text_of(browser, "#audit") and "serial 1 → 2" in text_of(browser, "#audit"))
    assert page_problems(browser) == []


def test_rollout_is_confirmed_and_cancel_signs_nothing(browser: Any, site: Site, tmp_path: Path) -> None:
    sign_in(browser, site, OPERATE_SECRET)
    box = css(browser, "[data-field=rollout-percent]")[0]
    box.clear()
    box.send_keys("60")
    css(browser, "[data-action=rollout]")[0].click()
    wait_for(lambda: css(browser, "[data-action=cancel]"))[0].click()
    assert not css(browser, "[data-action=confirm]") and site.live().serial == 1
    css(browser, "[data-action=rollout]")[0].click()
    wait_for(lambda: css(browser, "[data-action=confirm]"))[0].click()
    wait_for(lambda: text_of(browser, "[data-field=percent]").startswith("60 %"), message="60 % on the page")
    assert (site.live().serial, site.live().rollout.percent) == (2, 60)
    assert page_problems(browser) == []


def test_a_release_that_moved_is_not_halted_from_a_stale_page(
    browser: Any, site: Site, tmp_path: Path
) -> None:
    sign_in(browser, site, OPERATE_SECRET)
    css(browser, "[data-action=halt]")[0].click()
    confirm = wait_for(lambda: css(browser, "[data-action=confirm]"))[0]
    release(site.root, site.key, "0.1.45", "--rollout", "10")  # published while the operator hesitated
    confirm.click()
    toast = wait_for(lambda: text_of(browser, "#toast"), message="the refusal")
    assert "Nothing signed" in toast and "serial 2" in toast
    live = site.live()
    assert (live.version, live.serial, live.rollout.percent) == ("0.1.45", 2, 10)
    wait_for(lambda: text_of(browser, "[data-field=version]") == "0.1.45", message="the new release shown")
    shot(browser, tmp_path, "console-412.png")


def test_a_token_in_the_fragment_is_taken_and_removed_and_read_sees_no_controls(
    browser: Any, site: Site, tmp_path: Path
) -> None:
    browser.get(f"{site.url}/console/#token={READ_SECRET}")
    wait_for(lambda: len(css(browser, "#agents tbody tr")) >= 10, message="the agents table")
    assert "token" not in browser.current_url and browser.execute_script("return location.hash") == ""
    assert browser.execute_script("return sessionStorage.getItem('avika.console.token')") == READ_SECRET
    assert not css(browser, "[data-action=halt]") and not css(browser, "[data-action=rollout]")
    assert "read only" in text_of(browser, "#who")
    css(browser, "[data-action=logout]")[0].click()
    wait_for(lambda: css(browser, "#token-input")[0].is_displayed())
    assert browser.execute_script("return sessionStorage.getItem('avika.console.token')") is None

    browser.get(f"{site.url}/console/#token=not-a-valid-token-0000")
    wait_for(lambda: "not accepted" in text_of(browser, "#login-error"), message="the refusal")
    assert "token" not in browser.current_url
    assert page_problems(browser) == [] or all("401" in p for p in page_problems(browser))


def test_polling_sends_if_none_match_and_picks_up_new_reports(
    browser: Any, site: Site, tmp_path: Path
) -> None:
    mount = site.server.console
    assert mount is not None
    seen: list[tuple[str, int, bool]] = []
    handle = mount.handle

    def recording(method: str, target: str, headers: Any, body: bytes) -> Any:
        answer = handle(method, target, headers, body)
        lowered = {k.lower() for k in headers}
        seen.append((target.split("?")[0], answer[0], "if-none-match" in lowered))
        return answer

    mount.handle = recording  # type: ignore[method-assign]
    sign_in(browser, site, READ_SECRET)
    wait_for(lambda: any(s == ("/v1/fleet", 304, True) for s in seen), timeout=WAIT, message="a 304 poll")
    site.report("host-10", "update_available", target_version="0.1.44")
    wait_for(lambda: css(browser, "[data-agent-id='host-10']"), message="the new agent without a reload")
    assert any(path == "/v1/releases" and status == 304 for path, status, _ in seen)


def test_the_release_card_shows_the_rollout_plan(browser: Any, site: Site, tmp_path: Path) -> None:
    manifest = sign_plan(site, (1, 10, 25, 50, 100), 25)
    sign_in(browser, site, READ_SECRET)
    plan = wait_for(lambda: css(browser, "[data-role=rollout-plan] li"), message="the plan's steps")
    assert [li.text for li in plan] == ["1 %", "10 %", "25 %", "50 %", "100 %"]
    assert [li.get_attribute("class") for li in plan] == ["done", "done", "current", "", ""]
    assert manifest.signed_at is not None
    due = (manifest.signed_at.timestamp() + 2 * 3600) % 86400
    expected = f"next: 50 % at {int(due // 3600):02d}:{int(due % 3600 // 60):02d} UTC if healthy"
    assert expected in text_of(browser, "[data-role=rollout-plan]")
    shot(browser, tmp_path, "console-plan.png", keep=True)


def test_the_page_and_the_cli_colour_states_alike() -> None:
    """publisher/console/states.js TONES is publisher/fleet.py STATE_TONES (one colour per state)."""
    text = (Path(fleet.__file__).parent / "console" / "states.js").read_text()
    block = re.search(r"export const TONES = (\{.*?\});", text, re.S)
    assert block is not None
    assert json.loads(block.group(1)) == fleet.STATE_TONES
    css_text = (Path(fleet.__file__).parent / "console" / "console.css").read_text()
    for tone in {*fleet.STATE_TONES.values(), fleet.STALE_TONE}:
        assert f".tone-{tone} {{" in css_text, tone
        assert tone in fleet.ANSI


def test_page_headers_keep_everything_on_this_origin(site: Site) -> None:
    answer = site.session.get(f"{site.url}/console/", timeout=30)
    assert answer.status_code == 200 and "text/html" in answer.headers["Content-Type"]
    csp = answer.headers["Content-Security-Policy"]
    assert csp.startswith("default-src 'self'") and "unsafe" not in csp and "http" not in csp
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert "frame-ancestors 'none'" in csp
    page = answer.text
    assert (
        "<script>" not in page and "style=" not in page and "http://" not in page and "https://" not in page
    )
    assert (
        site.session.get(f"{site.url}/console/app.js", timeout=30)
        .headers["Content-Type"]
        .startswith("text/javascript")
    )
    tag = site.session.get(f"{site.url}/console/app.js", timeout=30).headers["ETag"]
    again = site.session.get(f"{site.url}/console/app.js", headers={"If-None-Match": tag}, timeout=30)
    assert again.status_code == 304
    assert site.session.get(f"{site.url}/console/../manifest.json", timeout=30).status_code in (200, 404)
    assert site.session.get(f"{site.url}/console/nope.js", timeout=30).status_code == 404
    moved = site.session.get(f"{site.url}/console", allow_redirects=False, timeout=30)
    assert moved.status_code == 301 and moved.headers["Location"] == "/console/"
