"""CPU one verification costs when the envelope carries junk signature entries (issue 10).

A store writer cannot forge a signature, but could pad ``manifest.json`` with thousands of well-formed
signature entries that each cost an Ed25519 verification per trusted key: before DESIGN section 2
capped the list at 16 entries, 4,000 of them were verified at every check. This measures the CPU
time (``time.process_time``) of ``verify_manifest`` on such envelopes, for the verifier of this
checkout and of an older git revision (``--rev``, default ``c1e9e09``: before the cap), with 1 and 3
trusted keys. Prints figures; asserts nothing.

Run from the repository root: ``.venv/bin/python bench/junk_signatures.py [--rev REV] [--no-results]``;
the figures are appended to ``bench/RESULTS.md`` unless ``--no-results`` is given.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

from results import Report, append, command_line, load_average

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ENTRIES = (16, 17, 4000)
RUNS = 3


def load_manifest_module(rev: str | None, tmp: Path) -> ModuleType:
    """``agent/manifest.py`` of this checkout, or of ``rev`` (it imports no other agent module)."""
    if rev is None:
        path = ROOT / "agent" / "manifest.py"
    else:
        source = subprocess.run(
            ["git", "show", f"{rev}:agent/manifest.py"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        path = tmp / f"manifest_{rev}.py"
        path.write_bytes(source)
    spec = importlib.util.spec_from_file_location(f"bench_manifest_{rev or 'head'}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def junk_envelope(m: ModuleType, signer: object, entries: int) -> bytes:
    """A validly signed envelope whose signatures list is ``entries`` long: junk, then the real one."""
    payload = json.dumps(
        {
            "schema": 1,
            "serial": 42,
            "version": "0.1.44",
            "released_at": "2026-02-15T20:00:00Z",
            "expires": "2026-03-17T20:00:00Z",
            "binaries": {"linux-amd64": {"url": "binaries/a", "sha256": "ab" * 32, "size": 10}},
        },
        separators=(",", ":"),
    ).encode()
    real = json.loads(m.sign_envelope(payload, [signer]))
    # A well-formed signature of these very bytes by a key nobody trusts: each costs a full Ed25519
    # verification (arbitrary bytes are often refused early, as a non-canonical scalar).
    outsider = m.LocalSigner(m.generate_private_key())
    sig = outsider.sign(m.pae(m.PAYLOAD_TYPE, payload))
    junk = {"keyid": real["signatures"][0]["keyid"], "sig": base64.b64encode(sig).decode()}
    real["signatures"] = [junk] * (entries - 1) + real["signatures"]
    return json.dumps(real).encode()


def measure(m: ModuleType, entries: int, keys: int) -> tuple[float, str]:
    """(best CPU seconds of RUNS verifications, the outcome: ok or the error code)."""
    signer = m.LocalSigner(m.generate_private_key())
    trusted = [m.public_key_of(m.generate_private_key()) for _ in range(keys - 1)] + [signer.public_key]
    data = junk_envelope(m, signer, entries)
    best, outcome = float("inf"), ""
    for _ in range(RUNS):
        start = time.process_time()
        try:
            m.verify_manifest(data, trusted=trusted, now=NOW - timedelta(days=1), platform="linux-amd64")
            outcome = "ok"
        except m.ManifestError as exc:
            outcome = exc.code
        best = min(best, time.process_time() - start)
    return best, outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="c1e9e09", help="older revision to compare with (default c1e9e09)")
    parser.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    report = Report()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, rev in ((f"{args.rev} (before the cap)", args.rev), ("this checkout", None)):
            m = load_manifest_module(rev, Path(tmp))
            for entries in ENTRIES:
                for keys in (1, 3):
                    seconds, outcome = measure(m, entries, keys)
                    rows.append([label, entries, keys, f"{seconds * 1000:.1f} ms", outcome])
    report(f"CPU time of one verify_manifest, best of {RUNS}; load average {load_average()}")
    report()
    report.table(["verifier", "signature entries", "trusted keys", "CPU", "outcome"], rows)
    if not args.no_results:
        append(report.lines, title="bench/junk_signatures.py", command=command_line())


if __name__ == "__main__":
    sys.exit(main())
