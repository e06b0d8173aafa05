"""The conformance vectors in tests/vectors/ hold for agent.manifest (DESIGN section 2, contract).

- every case of ``cases.json`` gives exactly its expected error code, or the expected manifest
  fields, payload digest and resolved binary URLs, verified as served from the top-level
  ``manifest_url`` with the case's ``binary_origins`` (``UPDATE_BINARY_ORIGINS``);
- the vectors cover every error code of the contract, and each narrowing rule (1-16 signatures,
  serials 1..2^53-1, binary URL origins, ``container_digest``, ``signed_at``, ``rollout_plan``);
- ``generate.py`` reproduces the committed files byte for byte (generator and files cannot drift)
  and never imports the agent (the vectors check the agent's code rather than echo it);
- ``rollout.json`` agrees with FNV-1a's published values, with a C reference implementation and
  with ``rollout_bucket`` (Go's ``hash/fnv.New32a`` over the UTF-8 bytes of salt + agent_id, % 100).
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from agent.manifest import (
    CLOCK_SLACK,
    ERROR_CODES,
    MAX_ENVELOPE_BYTES,
    PAYLOAD_TYPE,
    ManifestError,
    PublicKey,
    TrustState,
    fnv1a32,
    format_time,
    resolve_url,
    rollout_bucket,
    verify_manifest,
)

VECTORS = Path(__file__).resolve().parent / "vectors"
CASES_DOC = json.loads((VECTORS / "cases.json").read_text(encoding="utf-8"))
CASES: list[dict[str, Any]] = CASES_DOC["cases"]
ROLLOUT_ROWS: list[dict[str, Any]] = json.loads((VECTORS / "rollout.json").read_text(encoding="utf-8"))[
    "rows"
]
GENERATED = ("keys.json", "cases.json", "rollout.json")


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def run_case(case: dict[str, Any]) -> Any:
    data = (VECTORS / case["envelope"]).read_bytes()
    trust = case["trust"]
    return verify_manifest(
        data,
        trusted=[PublicKey.from_b64(k) for k in case["trusted_keys"]],
        threshold=case["threshold"],
        now=_time(case["now"]),
        trust=TrustState(highest_serial=trust["highest_serial"], digest=trust["digest"]),
        platform=case["platform"],
        manifest_url=CASES_DOC["manifest_url"],
        binary_origins=tuple(case["binary_origins"]),
    )


def manifest_fields(m: Any) -> dict[str, Any]:
    return {
        "schema": m.schema,
        "serial": m.serial,
        "version": m.version,
        "released_at": format_time(m.released_at),
        "expires": format_time(m.expires),
        "binaries": {
            name: {"url": b.url, "sha256": b.sha256, "size": b.size} for name, b in sorted(m.binaries.items())
        },
        "container_image": m.container_image,
        "min_version": m.min_version,
        "changelog": m.changelog,
        "rollout": {"percent": m.rollout.percent, "salt": m.rollout.salt},
        "downgrade": m.downgrade,
        "reports_url": m.reports_url,
        "container_digest": m.container_digest,
        "signed_at": None if m.signed_at is None else format_time(m.signed_at),
        "rollout_plan": None if m.rollout_plan is None else m.rollout_plan.to_dict(),
    }


# ---------------------------------------------------------------- the cases


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_vector_case_gives_its_expected_result(case: dict[str, Any]) -> None:
    expected = case["expected"]
    if expected["result"] == "error":
        with pytest.raises(ManifestError) as caught:
            run_case(case)
        assert caught.value.code == expected["error"], caught.value.message
        return
    manifest = run_case(case)
    assert manifest_fields(manifest) == expected["manifest"]
    assert manifest.digest == expected["payload_sha256"]
    resolved = {name: resolve_url(CASES_DOC["manifest_url"], b.url) for name, b in manifest.binaries.items()}
    assert resolved == expected["resolved_urls"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_vector_envelope_file_matches_its_recorded_digest(case: dict[str, Any]) -> None:
    # Guards against a checkout that rewrote line endings or whitespace in the served bytes.
    data = (VECTORS / case["envelope"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == case["envelope_sha256"]


def test_vectors_cover_every_error_code_and_valid_cases() -> None:
    codes = {c["expected"]["error"] for c in CASES if c["expected"]["result"] == "error"}
    assert codes == set(ERROR_CODES)
    assert sum(c["expected"]["result"] == "ok" for c in CASES) >= 10


# Each narrowing rule of DESIGN section 2 has accepted and refused cases: (name prefix, expected).
NARROWING = [
    ("ok_16_signatures", "ok"),
    ("malformed_envelope_no_signatures", "malformed_envelope"),
    ("malformed_envelope_17_signatures", "malformed_envelope"),
    ("ok_serial_max", "ok"),
    ("ok_serial_min", "ok"),
    ("malformed_manifest_serial_zero", "malformed_manifest"),
    ("malformed_manifest_serial_2_53", "malformed_manifest"),
    ("ok_absolute_urls_on_own_origin", "ok"),
    ("ok_absolute_urls_on_allowed_origins", "ok"),
    ("bad_url_userinfo", "bad_url"),
    ("bad_url_other_port", "bad_url"),
    ("bad_url_allowed_host_over_http", "bad_url"),
    ("ok_digest_signed_at_and_plan", "ok"),
    ("malformed_manifest_container_digest", "malformed_manifest"),
    ("malformed_manifest_signed_at", "malformed_manifest"),
    ("malformed_manifest_rollout_plan", "malformed_manifest"),
]


@pytest.mark.parametrize(("prefix", "result"), NARROWING, ids=[n[0] for n in NARROWING])
def test_vectors_cover_each_narrowing_rule(prefix: str, result: str) -> None:
    matching = [c for c in CASES if c["name"].startswith(prefix)]
    assert matching, prefix
    for case in matching:
        expected = case["expected"]
        assert expected.get("error", expected["result"]) == result, case["name"]


def test_valid_cases_carry_the_new_fields_with_values() -> None:
    full = next(c for c in CASES if c["name"] == "ok_full")["expected"]["manifest"]
    assert full["container_digest"].startswith("sha256:")
    assert full["signed_at"] == "2026-02-15T20:00:05Z"
    assert full["rollout_plan"] == {
        "steps": [1, 10, 50, 100],
        "soak": "2h",
        "max_failure_rate": "0.05",
        "min_agents": 20,
    }


def test_every_case_names_its_binary_origins() -> None:
    for case in CASES:
        assert isinstance(case["binary_origins"], list), case["name"]
    assert any(case["binary_origins"] for case in CASES)


def test_the_generator_never_imports_the_agent() -> None:
    tree = ast.parse((VECTORS / "generate.py").read_text(encoding="utf-8"))
    imported = {
        name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
    }
    assert not {name for name in imported if name.split(".")[0] in {"agent", "publisher", "controller"}}


def test_vector_constants_match_the_module() -> None:
    assert CASES_DOC["payload_type"] == PAYLOAD_TYPE
    assert CASES_DOC["max_envelope_bytes"] == MAX_ENVELOPE_BYTES
    assert CASES_DOC["clock_slack_seconds"] == CLOCK_SLACK.total_seconds()


def test_size_limit_vectors_sit_on_the_boundary() -> None:
    by_name = {c["name"]: c for c in CASES}
    assert (VECTORS / by_name["ok_exactly_max_size"]["envelope"]).stat().st_size == MAX_ENVELOPE_BYTES
    assert (
        VECTORS / by_name["too_large_signed_envelope"]["envelope"]
    ).stat().st_size == MAX_ENVELOPE_BYTES + 1


def test_every_case_file_is_listed_in_the_index() -> None:
    listed = {c["envelope"] for c in CASES}
    on_disk = {f"cases/{p.name}" for p in (VECTORS / "cases").iterdir()}
    assert on_disk == listed


# ---------------------------------------------------------------- keys


# RFC 8032 section 7.1: TEST 1, 2, 3 public keys for the seeds the vectors use.
RFC8032_PUBLIC_KEYS = {
    "k1": "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
    "k2": "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
    "k3": "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
}


def test_keys_file_holds_the_rfc8032_keys_with_their_key_ids() -> None:
    keys = {k["name"]: k for k in json.loads((VECTORS / "keys.json").read_text())["keys"]}
    for name, public_hex in RFC8032_PUBLIC_KEYS.items():
        raw = base64.b64decode(keys[name]["public_key_b64"], validate=True)
        assert raw.hex() == public_hex
        assert keys[name]["keyid"] == hashlib.sha256(raw).hexdigest() == PublicKey(raw).keyid
        assert keys[name]["trusted"] is True
    assert keys["untrusted"]["trusted"] is False
    trusted_b64 = {k["public_key_b64"] for k in keys.values() if k["trusted"]}
    for case in CASES:
        assert set(case["trusted_keys"]) <= trusted_b64, case["name"]


# ---------------------------------------------------------------- generator


def test_generator_reproduces_the_committed_vectors_byte_for_byte(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(VECTORS / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    committed = {f"cases/{p.name}" for p in (VECTORS / "cases").iterdir()} | set(GENERATED)
    assert fresh == committed
    differing = [
        name for name in sorted(fresh) if (tmp_path / name).read_bytes() != (VECTORS / name).read_bytes()
    ]
    assert differing == []


# ---------------------------------------------------------------- rollout

# Published FNV-1a 32-bit values (the FNV reference test suite; Go's hash/fnv golden32a).
PUBLISHED_FNV1A32 = {
    "": 0x811C9DC5,
    "a": 0xE40C292C,
    "b": 0xE70C2DE5,
    "ab": 0x4D2505CA,
    "abc": 0x1A47E90B,
    "foo": 0xA9F37ED7,
    "foobar": 0xBF9CF968,
}

C_FNV = r"""
#include <stdint.h>
#include <stdio.h>
#include <string.h>
/* One line of hex-encoded bytes in, FNV-1a 32 of those bytes out (decimal). */
int main(void) {
    static char line[8192];
    while (fgets(line, sizeof line, stdin)) {
        uint32_t h = 2166136261u;
        size_t n = strcspn(line, "\r\n");
        for (size_t i = 0; i + 1 < n; i += 2) {
            unsigned int octet;
            sscanf(line + i, "%2x", &octet);
            h ^= (uint8_t)octet;
            h *= 16777619u;
        }
        printf("%u\n", h);
    }
    return 0;
}
"""


def _row_bytes(row: dict[str, Any]) -> bytes:
    return (row["salt"] + row["agent_id"]).encode("utf-8")


@pytest.mark.parametrize(("text", "value"), PUBLISHED_FNV1A32.items(), ids=repr)
def test_fnv1a32_matches_published_values(text: str, value: int) -> None:
    assert fnv1a32(text.encode()) == value
    rows = [r for r in ROLLOUT_ROWS if r["salt"] + r["agent_id"] == text]
    for row in rows:
        assert row["fnv1a32"] == value


def test_rollout_vectors_include_the_published_values() -> None:
    keyed = {r["salt"] + r["agent_id"]: r["fnv1a32"] for r in ROLLOUT_ROWS}
    assert {k: keyed[k] for k in PUBLISHED_FNV1A32} == PUBLISHED_FNV1A32


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed for the C reference")
def test_rollout_vectors_match_a_c_reference_implementation(tmp_path: Path) -> None:
    source = tmp_path / "fnv.c"
    source.write_text(C_FNV)
    program = tmp_path / "fnv"
    subprocess.run(["gcc", "-O1", "-o", str(program), str(source)], check=True, capture_output=True)
    lines = "".join(_row_bytes(row).hex() + "\n" for row in ROLLOUT_ROWS)
    out = subprocess.run([str(program)], input=lines, capture_output=True, text=True, check=True).stdout
    assert [int(v) for v in out.split()] == [row["fnv1a32"] for row in ROLLOUT_ROWS]


@pytest.mark.parametrize("row", ROLLOUT_ROWS, ids=lambda r: f"{r['salt']!r}+{r['agent_id'][:24]!r}")
def test_rollout_bucket_is_go_fnv32a_of_salt_and_agent_id_mod_100(row: dict[str, Any]) -> None:
    assert fnv1a32(_row_bytes(row)) == row["fnv1a32"]
    assert int(row["fnv1a32_hex"], 16) == row["fnv1a32"]
    assert row["bucket"] == row["fnv1a32"] % 100
    assert rollout_bucket(row["agent_id"], row["salt"]) == row["bucket"]


def test_empty_salt_is_exactly_the_seeds_should_update_in_wave() -> None:
    # Go: h := fnv.New32a(); h.Write([]byte(agentID)); bucket := int(h.Sum32() % 100)
    for row in ROLLOUT_ROWS:
        if row["salt"] == "":
            assert rollout_bucket(row["agent_id"]) == fnv1a32(row["agent_id"].encode("utf-8")) % 100
