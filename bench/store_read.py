"""What the publisher's distrust of the store costs: ``read_store`` over N archived envelopes. Prints
figures; asserts nothing.

Every ``release``, ``rollout``, ``halt``, ``refresh``, ``rollback-to`` and ``history`` reads
``manifest.json`` and every ``manifests/<serial>.json`` and verifies each (DESIGN section 2, end:
the next serial and every inherited field come only from envelopes that verify), 8 reads at a
time. A fleet that re-signs daily and releases weekly archives ~420 serials a year.

1. A directory store with N archived envelopes (signed, as the publisher writes them) plus N/10 junk
   objects: ``read_store`` wall time, per envelope, and a whole ``refresh`` (read, sign, write).
2. The same on S3 under moto, in-process: the client's pipeline plus moto's own cost per request,
   never S3's latency. The number of GETs is printed so the cost on real S3 can be estimated:
   GETs / 8 readers x the region's GET latency (e.g. 1,000 GETs at 20 ms = 2.5 s).

Run from the repository root: ``.venv/bin/python bench/store_read.py [--sizes 100,1000,5000]
[--s3-sizes 100,1000]``; the figures are appended to ``bench/RESULTS.md`` unless ``--no-results``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from results import Report, append, command_line, load_average

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import boto3  # noqa: E402
from moto import mock_aws  # noqa: E402

from agent.manifest import (  # noqa: E402
    Binary,
    LocalSigner,
    Manifest,
    Rollout,
    generate_private_key,
    sign_envelope,
)
from publisher.archive import read_store  # noqa: E402
from publisher.resign import resign  # noqa: E402
from publisher.s3store import S3Store  # noqa: E402
from publisher.stores import DirStore, Store  # noqa: E402

BUCKET = "avika-bench"


def fill(store: Store, signer: LocalSigner, n: int) -> None:
    """Serials 1..n signed as a publisher writes them, n/10 junk archive names above them, live = n."""
    data = b"agent build"
    sha = hashlib.sha256(data).hexdigest()
    url = f"binaries/0.1.44/{sha}/avika-agent-linux-amd64"
    store.put_immutable(url, data)
    now = datetime.now(UTC).replace(microsecond=0)
    base = Manifest(
        serial=1,
        version="0.1.44",
        released_at=now,
        expires=now + timedelta(days=30),
        binaries={"linux-amd64": Binary(url, sha, len(data))},
        rollout=Rollout(10, "0.1.44"),
        reports_url="https://reports.example.com/v1/reports",
    )
    envelope = b""
    for serial in range(1, n + 1):
        envelope = sign_envelope(replace(base, serial=serial, signed_at=now).to_payload(), [signer])
        store.put_immutable(f"manifests/{serial}.json", envelope)
    for serial in range(n + 2, n + 2 + n // 10):
        store.put_immutable(f"manifests/{serial}.json", b"junk")
    store.put_mutable("manifest.json", envelope)


def measure(label: str, store: Store, signer: LocalSigner, n: int, gets: list[int]) -> list[str]:
    fill(store, signer, n)
    gets.clear()
    start = time.perf_counter()
    view = read_store(store, [signer.public_key])
    took = time.perf_counter() - start
    reads = len(gets)
    assert view.highest_serial == n and len(view.unverified()) == n // 10  # the bench measures the real thing
    start = time.perf_counter()
    outcome = resign(store, [signer], percent=None)
    refresh = time.perf_counter() - start
    assert outcome.manifest.serial == n + 1
    per_object = took / (n + n // 10) * 1e6
    return [
        label,
        str(n),
        str(n // 10),
        str(reads or "-"),
        f"{took * 1000:.0f}",
        f"{per_object:.0f}",
        f"{refresh * 1000:.0f}",
    ]


def count_gets(store: S3Store) -> list[int]:
    gets: list[int] = []
    store.client.meta.events.register("before-call.s3.GetObject", lambda **kwargs: gets.append(1))
    return gets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,5000")
    parser.add_argument("--s3-sizes", default="100,1000")
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args()
    report = Report()
    report(f"load average before: {load_average()}")
    signer = LocalSigner(generate_private_key())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.sizes.split(",") if x):
            rows.append(measure("directory", DirStore(Path(tmp) / f"store-{n}"), signer, n, []))
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    for n in (int(x) for x in args.s3_sizes.split(",") if x):
        with mock_aws():
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            store = S3Store(BUCKET, f"updates-{n}")
            rows.append(measure("s3 (moto)", store, signer, n, count_gets(store)))
    report.table(["store", "archived", "junk", "GETs", "read_store ms", "us per object", "refresh ms"], rows)
    report(f"load average after: {load_average()}")
    if not args.no_results:
        append(report.lines, title="bench/store_read.py", command=command_line())


if __name__ == "__main__":
    main()
