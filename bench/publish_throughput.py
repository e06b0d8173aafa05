"""Publish throughput: one binary of --size-mib to a directory store and to an S3 store. Prints figures;
asserts nothing.

1. SHA-256 of the file (``publisher.release.hash_file``, the publisher's one streaming pass): the ceiling
   for everything else, since every publish hashes the file once and the S3 store hashes it again while
   reading parts.
2. The directory store: ``put_immutable`` alone (copy + hash + fsync + link), and a whole ``release``
   (hash, upload, sign, archive, manifest).
3. The S3 store under moto, in-process (no network: this measures the client's pipeline - part reads,
   per-part and whole-file SHA-256, request signing - plus moto's own cost, never S3's bandwidth), with
   one part in flight and with --workers parts in flight.

Bounded: the file is at most 2 GiB and is written once to a temporary directory that is removed at the end.
Run from the repository root: ``.venv/bin/python bench/publish_throughput.py [--size-mib 256]``; the figures
are appended to ``bench/RESULTS.md`` unless ``--no-results`` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from results import Report, append, command_line, load_average

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.manifest import LocalSigner, generate_private_key  # noqa: E402
from publisher import release as publishing  # noqa: E402
from publisher.stores import DirStore, Store, binary_key  # noqa: E402

MiB = 1 << 20
MAX_SIZE_MIB = 2048
BUCKET = "avika-bench"


def write_binary(path: Path, size: int) -> None:
    with open(path, "wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(8 * MiB, left))
            out.write(chunk)
            left -= len(chunk)


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def publish(store: Store, path: Path, version: str) -> None:
    spec = publishing.ReleaseSpec(version=version, binaries={"linux-amd64": path}, init=True)
    publishing.release(store, [LocalSigner(generate_private_key())], spec)


def s3_figures(path: Path, size: int, sha: str, part_mib: int, workers: int) -> list[tuple[str, float]]:
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )  # fmt: skip
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    import boto3
    from boto3.s3.transfer import TransferConfig
    from moto import mock_aws

    from publisher.s3store import S3Store

    figures: list[tuple[str, float]] = []
    with mock_aws():
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        for inflight in sorted({1, workers}):
            transfer = TransferConfig(
                multipart_threshold=part_mib * MiB,
                multipart_chunksize=part_mib * MiB,
                max_concurrency=inflight,
            )
            store = S3Store(BUCKET, f"put-{inflight}", transfer=transfer)
            seconds = timed(
                lambda store=store: store.put_immutable(
                    binary_key("1.0.0", sha, "linux-amd64"), path, sha256=sha
                )
            )
            figures.append((f"S3 (moto) put_immutable, {inflight} part(s) in flight", seconds))
        store = S3Store(BUCKET, "release", transfer=transfer)
        figures.append(
            (f"S3 (moto) release, {workers} parts in flight", timed(lambda: publish(store, path, "1.0.0")))
        )
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="binary size (default 256, at most 2048)")
    parser.add_argument("--part-size-mib", type=int, default=8, help="S3 part size (default 8, at least 5)")
    parser.add_argument("--workers", type=int, default=8, help="S3 parts in flight (default 8)")
    parser.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    if not 1 <= args.size_mib <= MAX_SIZE_MIB or args.part_size_mib < 5 or args.workers < 1:
        parser.error(f"--size-mib 1..{MAX_SIZE_MIB}, --part-size-mib >= 5, --workers >= 1")
    size = args.size_mib * MiB
    out = Report()
    load_at_start = load_average()

    with tempfile.TemporaryDirectory(prefix="avika-bench-") as tmp:
        path = Path(tmp) / "avika-agent"
        write_binary(path, size)
        out(f"Binary: {args.size_mib} MiB; S3 parts of {args.part_size_mib} MiB, {args.workers} in flight.")
        out()

        result: dict[str, str] = {}
        seconds = timed(lambda: result.update(sha=publishing.hash_file(path)[0]))
        figures = [("sha256 (hash_file, one streaming pass)", seconds)]
        sha = result["sha"]

        store = DirStore(Path(tmp) / "dir-put")
        key = binary_key("1.0.0", sha, "linux-amd64")
        figures.append(("directory put_immutable", timed(lambda: store.put_immutable(key, path, sha256=sha))))
        figures.append(
            ("directory release", timed(lambda: publish(DirStore(Path(tmp) / "dir-release"), path, "1.0.0")))
        )
        figures += s3_figures(path, size, sha, args.part_size_mib, args.workers)

    out.table(
        ["step", "MiB/s", "time"],
        [[label, f"{size / MiB / seconds:,.1f}", f"{seconds:.3f} s"] for label, seconds in figures],
    )
    out()
    out(f"Load average at the start / the end: {load_at_start} / {load_average()}")
    if not args.no_results:
        append(out.lines, title="bench/publish_throughput.py", command=command_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
