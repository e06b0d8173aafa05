"""``avika-publish console-upload`` (DESIGN section 9): the page into ``console/`` of the bucket, on moto.

Rules enforced here:
- every file of ``publisher/console/`` lands under ``console/`` at the bucket root (beside the
  store's prefix), byte for byte, with its content type and ``Cache-Control: no-cache``;
  ``index.html`` is put last, so a new index never names a missing asset;
- what the index loads is relative and uploaded (the page works from ``/console/`` on the CDN),
  and the index itself carries the CSP (``default-src 'self'``) for when no header policy is set;
- ``--dry-run`` uploads nothing; a non-s3 store is a usage error (exit 2); a failed put names the
  object and exits 1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import boto3
import pytest
import reports_fixtures

from publisher.console_app import STATIC, page_files
from publisher.console_upload import upload_order
from tests.publisher_fixtures import cli

aws = reports_fixtures.aws
BUCKET = "avika-updates"


@pytest.fixture
def s3(aws: None) -> Iterator[object]:
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client


def test_the_page_goes_to_console_at_the_bucket_root(s3: object) -> None:
    done = cli("console-upload", "--store", f"s3://{BUCKET}/updates/stable", "--json")
    assert done.exit_code == 0, done.stderr
    report = json.loads(done.stdout)
    files = page_files()
    assert [f["key"] for f in report["files"]] == [f"console/{n}" for n in upload_order(files)]
    assert report["files"][-1]["key"] == "console/index.html"
    listed = s3.list_objects_v2(Bucket=BUCKET)["Contents"]  # type: ignore[attr-defined]
    assert sorted(o["Key"] for o in listed) == sorted(f"console/{n}" for n in files)
    for name, data in files.items():
        got = s3.get_object(Bucket=BUCKET, Key=f"console/{name}")  # type: ignore[attr-defined]
        assert got["Body"].read() == data, name
        assert got["CacheControl"] == "no-cache"
        expected = {
            ".html": "text/html; charset=utf-8",
            ".css": "text/css; charset=utf-8",
            ".js": "text/javascript; charset=utf-8",
            ".svg": "image/svg+xml",
        }[name[name.rindex(".") :]]
        assert got["ContentType"] == expected, name


def test_what_the_index_loads_is_relative_and_uploaded() -> None:
    files = page_files()
    index = files["index.html"].decode()
    refs = re.findall(r'(?:src|href)="([^"]+)"', index)
    assert refs and all("/" not in r and ":" not in r for r in refs), refs
    assert set(refs) <= set(files)
    for name, data in files.items():  # every module import is a sibling file
        if name.endswith(".js"):
            for ref in re.findall(r'from "\./([^"]+)"', data.decode()):
                assert ref in files, (name, ref)
    assert "Content-Security-Policy\" content=\"default-src 'self'" in index
    assert {p.name for p in STATIC.iterdir() if p.is_file()} == set(files)


def test_dry_run_uploads_nothing(s3: object) -> None:
    done = cli("console-upload", "--store", f"s3://{BUCKET}", "--dry-run")
    assert done.exit_code == 0 and "would upload s3://avika-updates/console/index.html" in done.stdout
    assert s3.list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0  # type: ignore[attr-defined]


def test_refusals(s3: object, tmp_path: object) -> None:
    local = cli("console-upload", "--store", str(tmp_path))
    assert local.exit_code == 2 and "serve --console" in local.stderr
    missing = cli("console-upload", "--store", "s3://no-such-bucket/x")
    assert missing.exit_code == 1 and "s3://no-such-bucket/console/" in missing.stderr
