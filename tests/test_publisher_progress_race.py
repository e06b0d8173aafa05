"""``progress`` when other publishes get in the way (publisher/progress.py, DESIGN section 6).

- Concurrent ``avika-publish progress`` processes (real processes, a directory store, SQLite
  reports) after a soak: exactly one advances, each of the others says ``waiting`` (exit 0,
  no traceback), and exactly one serial is signed.
- The race made certain, on a directory and on S3 (moto): another run signs the next serial
  between this run's decision and its write. This run's archive write loses (create-only), it
  reads again and reports ``waiting`` with a note; one serial is signed.
- A person's ``halt`` lands between the decision and the re-sign: the serial moved, so the run
  reads again, says ``halted`` and signs nothing; the halt stands.
- A publish caught between its archive write and ``manifest.json`` is waited out; one that never
  completes (an interrupted publish) is named, exit 1, nothing signed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import reports_fixtures
from reports_fixtures import create_table

from agent.manifest import LocalSigner
from infra.reports.store import ReportStore
from publisher import progress as progressing
from publisher.release import ReleaseSpec, release, sign_checked
from publisher.resign import read_live, resign, resigned
from publisher.stores import DirStore, Store, archive_key
from tests.progress_fixtures import Reporter, agents_in_wave
from tests.publisher_fixtures import make_binary, new_signer, proc_env, run_publish

aws = reports_fixtures.aws
VERSION = "0.1.44"


class Hooked(Store):
    """A real store with a hook that runs just before chosen calls (another publisher's move)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.location = inner.location
        self.before_archive: Callable[[], None] | None = None
        self.before_read_live: Callable[[int], None] | None = None
        self.live_reads = 0

    def read(self, key: str, **kwargs: Any) -> bytes | None:
        return self.inner.read(key, **kwargs)

    def stream(self, url: str) -> Iterator[bytes]:
        return self.inner.stream(url)

    def read_versioned(self, key: str, **kwargs: Any) -> Any:
        if key == "manifest.json":
            self.live_reads += 1
            if self.before_read_live is not None:
                self.before_read_live(self.live_reads)
        return self.inner.read_versioned(key, **kwargs)

    def size(self, key: str) -> int | None:
        return self.inner.size(key)

    def list(self, prefix: str) -> list[str]:
        return self.inner.list(prefix)

    def put_immutable(self, key: str, source: Any, **kwargs: Any) -> None:
        hook, self.before_archive = self.before_archive, None  # once
        if hook is not None and key.startswith("manifests/"):
            hook()
        self.inner.put_immutable(key, source, **kwargs)

    def put_mutable(self, key: str, data: bytes, **kwargs: Any) -> None:
        self.inner.put_mutable(key, data, **kwargs)


def publish(store: Store, signer: LocalSigner, tmp: Path, *, soak: str = "1s") -> None:
    from publisher.plan import plan_from_options

    binary = tmp / "dist" / "avika-agent"
    make_binary(binary, 2048, VERSION)
    spec = ReleaseSpec(
        VERSION,
        {"linux-amd64": binary},
        rollout_percent=10,
        init=True,
        rollout_plan=plan_from_options("10,50,100", soak),
    )
    release(store, [signer], spec)


def archived(store: Store) -> list[str]:
    return store.list("manifests/")


@pytest.fixture(params=["dir+sqlite", "s3+dynamodb"])
def stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Store, Callable[[], ReportStore]]]:
    """A release store and a way to open the reports store (``take_step`` closes what it opens)."""
    if request.param == "dir+sqlite":
        url = f"sqlite:///{tmp_path / 'reports.db'}"
        ReportStore.from_url(url).close()
        yield DirStore(tmp_path / "updates"), lambda: ReportStore.from_url(url)
        return
    request.getfixturevalue("aws")
    import boto3

    from publisher.s3store import S3Store

    boto3.client("s3").create_bucket(Bucket="avika-releases")
    create_table("avika-reports")
    yield S3Store("avika-releases", "updates"), lambda: ReportStore.from_url("dynamodb://avika-reports")


def healthy_wave(reports: Callable[[], ReportStore]) -> None:
    store = reports()
    try:
        Reporter(store).committed(*agents_in_wave(3, 10))
    finally:
        store.close()


def test_a_run_that_loses_the_race_reports_waiting_and_signs_nothing(
    stores: tuple[Store, Callable[[], ReportStore]], tmp_path: Path
) -> None:
    inner, reports = stores
    signer = new_signer()
    publish(inner, signer, tmp_path, soak="1h")
    healthy_wave(reports)
    live = read_live(inner, [signer])[1]
    now = live.signed_at + timedelta(hours=1)  # the soak is over; both runs look at the same moment
    store = Hooked(inner)
    rival: list[progressing.StepResult] = []
    store.before_archive = lambda: rival.append(progressing.take_step(inner, [signer], reports, now=now))
    slept: list[float] = []

    result = progressing.take_step(store, [signer], reports, now=now, sleep=slept.append)

    assert rival[0].decision.action == "advanced" and rival[0].decision.percent == 50
    assert result.decision.action == "waiting" and result.decision.percent == 50
    assert result.decision.serial == rival[0].decision.serial == live.serial + 1
    assert result.lost and "another publish came first" in result.lost[0] and slept
    assert "another publish came first" in result.to_json()["message"]
    assert archived(inner) == [archive_key(live.serial), archive_key(live.serial + 1)]
    assert read_live(inner, [signer])[1].rollout.percent == 50


def test_a_halt_between_the_decision_and_the_re_sign_stands(
    stores: tuple[Store, Callable[[], ReportStore]], tmp_path: Path
) -> None:
    inner, reports = stores
    signer = new_signer()
    publish(inner, signer, tmp_path, soak="1h")
    healthy_wave(reports)
    live = read_live(inner, [signer])[1]
    now = live.signed_at + timedelta(hours=1)
    store = Hooked(inner)

    def halt_on_second_look(reads: int) -> None:
        if reads == 2:  # the re-sign's own read of manifest.json: a person halts just before it
            assert resign(inner, [signer], percent=0).status == "published"

    store.before_read_live = halt_on_second_look
    result = progressing.take_step(store, [signer], reports, now=now, sleep=lambda s: None)

    assert result.decision.action == "halted" and result.outcome is None
    assert result.lost and "another publish came first" in result.lost[0]
    now = read_live(inner, [signer])[1]
    assert (now.serial, now.rollout.percent) == (live.serial + 1, 0)
    assert archived(inner) == [archive_key(live.serial), archive_key(live.serial + 1)]


def _archive_next(store: Store, signer: LocalSigner, percent: int) -> bytes:
    """Sign the live release at ``percent`` and archive it, leaving ``manifest.json`` behind:
    a publish between its two writes."""
    view, live = read_live(store, [signer])
    now = datetime.now(UTC).replace(microsecond=0)
    manifest = resigned(
        live, serial=view.next_serial(), now=now, expires_in=timedelta(days=30), percent=percent
    )
    manifest, envelope = sign_checked(manifest, [signer], now)
    store.put_immutable(archive_key(manifest.serial), envelope)
    return envelope


def test_a_publish_in_flight_is_waited_out(tmp_path: Path) -> None:
    store = DirStore(tmp_path / "updates")
    url = f"sqlite:///{tmp_path / 'reports.db'}"
    ReportStore.from_url(url).close()
    signer = new_signer()
    publish(store, signer, tmp_path, soak="1h")
    envelope = _archive_next(store, signer, 50)  # someone's `rollout 50`, half done
    slept: list[float] = []

    def finish(seconds: float) -> None:
        slept.append(seconds)
        store.put_mutable("manifest.json", envelope)  # ... and now done

    result = progressing.take_step(store, [signer], lambda: ReportStore.from_url(url), sleep=finish)
    assert slept == [progressing.BACKOFF]
    assert (result.decision.action, result.decision.percent, result.decision.serial) == ("waiting", 50, 2)
    assert result.lost and "waited for it" in result.lost[0]


def test_an_interrupted_publish_is_named_and_nothing_is_signed(tmp_path: Path) -> None:
    site_key = tmp_path / "key.pem"
    assert run_publish("keygen", "--out", str(site_key)).returncode == 0
    from publisher.signing import load_signers

    signer = load_signers([str(site_key)], [])[0]
    store = DirStore(tmp_path / "updates")
    publish(store, signer, tmp_path)
    _archive_next(store, signer, 50)  # archived, never made live: the publisher died in between
    before = archived(store), store.read("manifest.json")
    reports = f"sqlite:///{tmp_path / 'reports.db'}"
    ReportStore.from_url(reports).close()
    done = run_publish("progress", "--reports", reports, "--key", str(site_key), "--store", str(store.root))
    assert done.returncode == 1, done.stderr
    assert (
        "manifests/2.json" in done.stderr and "interrupted" in done.stderr and "Traceback" not in done.stderr
    )
    assert (archived(store), store.read("manifest.json")) == before


def test_concurrent_progress_processes_advance_once(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    assert run_publish("keygen", "--out", str(key)).returncode == 0
    from publisher.signing import load_signers

    signer = load_signers([str(key)], [])[0]
    store = DirStore(tmp_path / "updates")
    db = tmp_path / "reports.db"
    publish(store, signer, tmp_path, soak="1h")
    healthy_wave(lambda: ReportStore.from_url(f"sqlite:///{db}"))
    live = read_live(store, [signer])[1]
    # All runs look at the same moment, the end of the soak: a process that starts a second later
    # than another must not see the next step's soak as over too (that would be a second, correct,
    # advance, not the race under test).
    now = (live.signed_at + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    argv = [sys.executable, "-m", "publisher.cli", "progress", "--json", "--reports", f"sqlite:///{db}",
            "--key", str(key), "--store", str(store.root), "--now", now]  # fmt: skip
    runs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=proc_env())
        for _ in range(4)
    ]
    outputs = [run.communicate(timeout=120) for run in runs]
    results = [(run.returncode, out, err) for run, (out, err) in zip(runs, outputs, strict=True)]
    for code, _, stderr in results:
        assert code == 0 and "Traceback" not in stderr, stderr
    actions = sorted(json.loads(stdout)["action"] for _, stdout, _ in results)
    assert actions == ["advanced", "waiting", "waiting", "waiting"], results
    assert archived(store) == [archive_key(1), archive_key(2)]
    now = read_live(store, [signer])[1]
    assert (now.serial, now.rollout.percent) == (2, 50)
    assert all(json.loads(stdout)["serial"] == 2 for _, stdout, _ in results)
