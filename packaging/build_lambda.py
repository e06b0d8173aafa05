#!/usr/bin/env python3
"""Build the reports + console Lambda's deployment package (DESIGN sections 5 and 9).

    make lambda-zip [OUT=dist/avika-reports-lambda.zip] [LAMBDA_PLATFORM=linux-arm64] [LAMBDA_PYTHON=3.12]
    .venv/bin/python packaging/build_lambda.py --out FILE [--platform linux-arm64|linux-amd64] [--python 3.12]
    .venv/bin/python packaging/build_lambda.py --out FILE --from-this-python

One zip, handler ``infra.reports.handler.handler``. The reports route needs only ``infra/`` (the
standard library, and boto3 from the Lambda runtime); the operator API's routes sign manifests, so
the zip also holds ``publisher/``, ``agent/`` (the one manifest definition) and their run-time
dependencies: ``cryptography`` and ``packaging`` with everything they require (cffi, ...), never
boto3/botocore (the runtime's are used). The handler imports the console only for console routes,
so the reports route's cold start does not grow (``bench/handler_importtime.py``).

Where the dependencies come from:
- default: ``pip install --target`` of manylinux wheels for the Lambda's platform and Python
  (binary wheels only, resolved from the package index at build time, i.e. at set-up, never at
  run time; the template's function is ``python3.12`` on ``arm64``);
- ``--from-this-python``: this interpreter's installed distributions, copied (offline; the zip then
  runs only on this platform and Python minor version: for tests and same-platform builds).

The zip is reproducible for identical inputs (sorted entries, fixed timestamps); ``__pycache__``,
tests and dist-info ``RECORD`` files are left out.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP_PACKAGES = ("infra", "publisher", "agent")
RUNTIME_ROOTS = ("cryptography", "packaging")
PROVIDED = frozenset({"boto3", "botocore", "s3transfer", "jmespath", "urllib3", "python-dateutil", "six"})
PLATFORMS = {"linux-arm64": "aarch64", "linux-amd64": "x86_64"}
FIXED_TIME = (2020, 1, 1, 0, 0, 0)
SKIP_DIRS = {"__pycache__", "tests", "console"}  # console/: the page is served by CloudFront, not the Lambda


class BuildError(Exception):
    pass


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def requirement_closure(roots: tuple[str, ...] = RUNTIME_ROOTS) -> list[metadata.Distribution]:
    """``roots`` and what they require in this interpreter (markers evaluated, no extras)."""
    from packaging.requirements import Requirement

    found: dict[str, metadata.Distribution] = {}
    pending = [_canonical(r) for r in roots]
    while pending:
        name = pending.pop()
        if name in found or name in PROVIDED:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise BuildError(f"{name} is not installed in {sys.prefix}; run `make venv`") from None
        found[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                pending.append(_canonical(req.name))
    return [found[n] for n in sorted(found)]


def stage_from_this_python(target: Path) -> None:
    for dist in requirement_closure():
        for file in dist.files or []:
            source = Path(dist.locate_file(file))
            parts = Path(file).parts
            if not source.is_file() or ".." in parts or "__pycache__" in parts or parts[-1] == "RECORD":
                continue
            dest = target / file
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)


def stage_from_index(target: Path, platform: str, python: str) -> None:
    """manylinux wheels for the Lambda (needs the package index: a set-up step, like `make venv`)."""
    arch = PLATFORMS[platform]
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "--target", str(target), "--only-binary=:all:", "--implementation", "cp",
        "--python-version", python,
        "--platform", f"manylinux2014_{arch}", "--platform", f"manylinux_2_28_{arch}",
        *RUNTIME_ROOTS,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BuildError(f"pip could not resolve the Lambda's wheels:\n{done.stderr.strip()}")
    for name in PROVIDED:
        for path in target.glob(f"{name.replace('-', '_')}*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def stage_app(target: Path) -> None:
    for package in APP_PACKAGES:
        for source in sorted((ROOT / package).rglob("*.py")):
            relative = source.relative_to(ROOT)
            if SKIP_DIRS & set(relative.parts[:-1]):
                continue
            dest = target / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)


def write_zip(staged: Path, out: Path) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    files = sorted(p for p in staged.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for path in files:
            info = zipfile.ZipInfo(path.relative_to(staged).as_posix(), FIXED_TIME)
            info.external_attr = (0o755 if os.access(path, os.X_OK) else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    os.replace(tmp, out)
    return len(files)


def build(
    out: Path, *, platform: str = "linux-arm64", python: str = "3.12", from_this_python: bool = False
) -> int:
    with tempfile.TemporaryDirectory(prefix="avika-lambda-") as tmp:
        staged = Path(tmp) / "package"
        staged.mkdir()
        if from_this_python:
            stage_from_this_python(staged)
        else:
            stage_from_index(staged, platform, python)
        stage_app(staged)
        if not (staged / "infra" / "reports" / "handler.py").is_file():
            raise BuildError("infra/reports/handler.py is missing from the package")
        return write_zip(staged, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist" / "avika-reports-lambda.zip")
    parser.add_argument("--platform", choices=sorted(PLATFORMS), default="linux-arm64")
    parser.add_argument("--python", default="3.12", help="the Lambda runtime's Python (python3.12: 3.12)")
    parser.add_argument(
        "--from-this-python",
        action="store_true",
        help="copy this interpreter's packages (offline, same platform)",
    )
    args = parser.parse_args(argv)
    try:
        count = build(
            args.out, platform=args.platform, python=args.python, from_this_python=args.from_this_python
        )
    except BuildError as exc:
        print(f"build_lambda: error: {exc}", file=sys.stderr)
        return 1
    size = args.out.stat().st_size
    source = "this Python" if args.from_this_python else f"{args.platform}, Python {args.python}"
    print(f"{args.out}: {count} files, {size / 1e6:.1f} MB ({source}); handler infra.reports.handler.handler")
    return 0


if __name__ == "__main__":
    sys.exit(main())
