"""The operator docs are executable: runbook commands run as written, cited tests exist, nginx works.

- ``docs/operations.md``: every fenced ``sh`` block right after a ``<!-- runnable -->`` line runs,
  in document order, in ONE bash session (``set -euo pipefail``: variables carry over, as in an
  operator's terminal), from a throw-away "checkout" (the Makefile, ``pyproject.toml``,
  ``packaging/`` and the virtualenv of this repository, linked into a temp dir). The first blocks
  are the rehearsal: they create the signing key, the store, ``avika-publish serve`` and a
  stand-in host themselves, and point ``AVIKA_STORE``, ``AVIKA_SIGNING_KEY``, ``AVIKA_REPORTS``,
  ``UPDATE_SERVER`` ... at files under the temp dir, so the later commands read as an operator
  types them. Every background process the blocks start dies with their process group.
- ``docs/security.md``: every ``tests/test_x.py::test_name`` it cites is a test function (ast).
- ``packaging/nginx/avika-updates.conf``: ``nginx -t`` with a temp prefix, then nginx really
  serves a published store on 127.0.0.1 and ``avika-agent check`` goes through it (http and
  https), ``avika-publish verify --url`` audits it, reports are proxied to ``avika-publish serve``.
  Skipped only when no ``nginx`` binary can be found (CI installs nginx-light: ``.ci/run``).
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ROOT / "docs" / "operations.md"
SECURITY = ROOT / "docs" / "security.md"
NGINX_CONF = ROOT / "packaging" / "nginx" / "avika-updates.conf"
VENV = Path(sys.prefix)
BIN = VENV / "bin"
MARKER = "<!-- runnable -->"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# ---------------------------------------------------------------- helpers


def runnable_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the fence, body) of every ```sh block right after the runnable marker."""
    lines = text.splitlines()
    blocks: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        assert i + 1 < len(lines) and lines[i + 1].strip() == "```sh", (
            f"operations.md:{i + 1}: {MARKER} must be followed by a ```sh fence"
        )
        body: list[str] = []
        for j in range(i + 2, len(lines)):
            if lines[j].strip() == "```":
                break
            body.append(lines[j])
        else:
            raise AssertionError(f"operations.md:{i + 2}: unterminated ```sh block")
        blocks.append((i + 2, "\n".join(body)))
    return blocks


def clean_env(home: Path) -> dict[str, str]:
    """A fresh shell's environment: nothing of ours (AVIKA_*, UPDATE_*) leaks in."""
    return {
        "PATH": SYSTEM_PATH,
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
    }


def fake_checkout(dest: Path) -> Path:
    """A directory that looks like a checkout after ``make venv``, without copying anything.

    ``.venv`` is a shim (links to this virtualenv's bin/lib/pyvenv.cfg plus a fresh install stamp)
    so ``make agent-binary`` never decides to re-run ``pip install`` here.
    """
    if not (VENV / "pyvenv.cfg").is_file() or not (BIN / "avika-publish").exists():
        pytest.skip(f"the tests do not run from the project's virtualenv ({VENV})")
    dest.mkdir()
    for name in ("Makefile", "pyproject.toml", "packaging"):
        (dest / name).symlink_to(ROOT / name)
    shim = dest / ".venv"
    shim.mkdir()
    for name in ("bin", "lib", "lib64", "include", "pyvenv.cfg"):
        if (VENV / name).exists():
            (shim / name).symlink_to(VENV / name)
    (shim / ".installed-stamp").touch()
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"{what} is not listening on {port} after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def run(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- operations.md


def test_runnable_blocks_are_marked_and_cover_the_runbook() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    blocks = runnable_blocks(text)
    assert len(blocks) >= 20
    joined = "\n".join(body for _, body in blocks)
    for command in (
        "avika-publish halt",
        "avika-publish rollout 50",
        "canary 0.1.44",
        "avika-publish rollback-to",
        "avika-publish history",
        "--min-version",
        "avika-publish refresh",
        "avika-agent status --json",
        "avika-publish enroll",
        "helm-values.yaml",
    ):
        assert command in joined, f"no runnable block runs {command!r}"


def test_runbook_commands_run_as_written(tmp_path: Path) -> None:
    missing = [
        tool for tool in ("bash", "make", "openssl", "curl") if not shutil.which(tool, path=SYSTEM_PATH)
    ]
    if missing:
        pytest.skip(f"the rehearsal needs {', '.join(missing)}")
    blocks = runnable_blocks(OPERATIONS.read_text(encoding="utf-8"))
    checkout = fake_checkout(tmp_path / "checkout")
    (tmp_path / "home").mkdir()
    script = ["set -euo pipefail"]
    for n, (line, body) in enumerate(blocks, 1):
        script.append(f"echo '### runnable block {n}/{len(blocks)} (docs/operations.md:{line})'")
        script.append(body)
    script.append("echo '### every runnable block passed'")
    (tmp_path / "runbook.sh").write_text("\n".join(script) + "\n")
    proc = subprocess.Popen(
        ["bash", str(tmp_path / "runbook.sh")],
        cwd=checkout,
        env=clean_env(tmp_path / "home"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: `serve &` and friends die with it
    )
    try:
        out, _ = proc.communicate(timeout=150)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    tail = "\n".join(out.splitlines()[-60:])
    assert proc.returncode == 0, f"a runnable block failed (exit {proc.returncode}); last output:\n{tail}"
    assert "### every runnable block passed" in out, tail
    # What the runbook says you should see.
    for expected in (
        '"reason": "not_in_wave"',
        "rollout      0% (salt '0.1.44')",
        "canary exit 4",
        '"reason": "newer_version"',
        '"reason": "downgrade"',
        '"reason": "below_min_version"',
        "min_version  -",
        "downgrade    yes",
        '"accepted":1,"duplicates":0} HTTP 202',
        "smoke-test",
        'tag: "0.1.48"',
        '"reason": "container"',
        '"error": "signature_invalid"',
        "check exit 3",
        "Cache-Control: public, max-age=60",
    ):
        assert expected in out, f"the runbook promises {expected!r}; output:\n{tail}"


# ---------------------------------------------------------------- security.md

CITATION = re.compile(r"tests/(test_\w+\.py)::(\w+(?:::\w+)?)")


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name.startswith("test"):
                    names.add(f"{node.name}::{item.name}")
    return names


def test_every_test_cited_in_security_md_exists() -> None:
    cited = CITATION.findall(SECURITY.read_text(encoding="utf-8"))
    assert len(set(cited)) >= 20, "the threat model cites too few tests"
    missing = []
    for filename, name in sorted(set(cited)):
        path = ROOT / "tests" / filename
        if not path.is_file() or name not in defined_tests(path):
            missing.append(f"tests/{filename}::{name}")
    assert not missing, f"security.md cites tests that do not exist: {missing}"


def test_every_threat_row_cites_a_test() -> None:
    text = SECURITY.read_text(encoding="utf-8")
    table = text.split("## Threat model", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| attack")]
    rows = [r for r in rows if not set(r) <= set("|- ")]
    assert len(rows) >= 12
    for row in rows:
        assert CITATION.search(row), f"threat row without a test: {row[:80]}"


# ---------------------------------------------------------------- nginx


def find_nginx() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path=SYSTEM_PATH)


LOOPBACK_SAN = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])


def self_signed(dest: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(LOOPBACK_SAN, False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    crt, pem = dest / "avika-updates.crt", dest / "avika-updates.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return crt, pem


def site_config(srv: Path, http_port: int, https_port: int, reports_port: int, crt: Path, key: Path) -> str:
    """The sample with its EDIT points set for this test; every one must be where the file says."""
    text = NGINX_CONF.read_text(encoding="utf-8")
    edits = [
        ("root /srv/avika;", f"root {srv};", 2),
        ("listen 5021;", f"listen 127.0.0.1:{http_port};", 1),
        ("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;", 1),
        ("/etc/nginx/tls/avika-updates.crt", str(crt), 1),
        ("/etc/nginx/tls/avika-updates.key", str(key), 1),
        ("http://127.0.0.1:8081", f"http://127.0.0.1:{reports_port}", 1),
    ]
    for old, new, count in edits:
        assert text.count(old) == count, f"avika-updates.conf: expected {count} x {old!r}"
        text = text.replace(old, new)
    # IPv6 may be missing where the tests run; the [::] listeners are the only other difference.
    return "\n".join(line for line in text.splitlines() if "listen [::]" not in line) + "\n"


def main_config(prefix: Path, site: Path) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""  # tmp_path is 0700: workers must read it
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = " ".join(f"{kind}_temp_path {prefix / kind};" for kind in kinds)
    return (
        f"{user}daemon off;\nworker_processes 1;\npid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} warn;\nevents {{ worker_connections 64; }}\n"
        f"http {{\n  access_log {prefix / 'access.log'};\n  {temp}\n  include {site};\n}}\n"
    )


@pytest.fixture
def published_store(tmp_path: Path) -> Iterator[dict[str, object]]:
    """A store at <srv>/updates with 0.1.44 published (stub binaries), its key, an agent's env."""
    srv = tmp_path / "srv"
    store = srv / "updates"
    store.mkdir(parents=True)
    env = {**clean_env(tmp_path), "PATH": f"{BIN}:{SYSTEM_PATH}"}
    key = tmp_path / "signing-key.pem"
    keygen = run([str(BIN / "avika-publish"), "keygen", "--out", str(key), "--json"], env)
    assert keygen.returncode == 0, keygen.stderr
    public = json.loads(keygen.stdout)["public_key"]
    stub = tmp_path / "dist" / "avika-agent"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\necho 0.1.44\n")
    stub.chmod(0o755)
    env |= {"AVIKA_STORE": str(store), "AVIKA_SIGNING_KEY": str(key), "AVIKA_FLEET_SECRET": uuid.uuid4().hex}
    release = run(
        [str(BIN / "avika-publish"), "release", "0.1.44", "--init", "--image", "hellodk/avika-agent:0.1.44"]
        + [f"--binary=linux-{arch}={stub}" for arch in ("amd64", "arm64")]
        + ["--no-inspect"],  # a shell stub, not an agent build
        env,
    )
    assert release.returncode == 0, release.stderr
    host = tmp_path / "host"
    host.mkdir()
    (host / "avika-agent").write_text("#!/bin/sh\necho 0.1.43\n")
    (host / "avika-agent").chmod(0o755)
    agent_env = {
        **env,
        "AGENT_ID": "web-01.eu-west",
        "DEPLOYMENT_MODE": "vm",
        "UPDATE_PUBLIC_KEYS": public,
        "UPDATE_TARGET": str(host / "avika-agent"),
        "UPDATE_STATE_DIR": str(host / "state"),
        "UPDATE_REPORT_URL": "disabled",
    }
    yield {"srv": srv, "store": store, "env": env, "agent_env": agent_env, "public": public}


def test_nginx_serves_the_store_to_agents(tmp_path: Path, published_store: dict) -> None:
    nginx = find_nginx()
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light); .ci/run installs it")
    env, agent_env = published_store["env"], published_store["agent_env"]
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    crt, key = self_signed(prefix)
    http_port, https_port = free_port(), free_port()

    reports = subprocess.Popen(
        [
            str(BIN / "avika-publish"),
            "serve",
            *("--root", str(published_store["store"]), "--port", "0"),
            *("--reports", f"sqlite:///{tmp_path / 'reports.db'}"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = reports.stdout.readline()  # "serving <root> on http://127.0.0.1:<port>"
        assert " on http://127.0.0.1:" in line, line
        reports_port = int(line.rsplit(":", 1)[1])
        site = prefix / "avika-updates.conf"
        site.write_text(site_config(published_store["srv"], http_port, https_port, reports_port, crt, key))
        main = prefix / "nginx.conf"
        main.write_text(main_config(prefix, site))
        base = [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(main)]
        tested = run([*base, "-t"], env)
        assert tested.returncode == 0, tested.stderr
        server = subprocess.Popen(base, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_port(http_port, server, "nginx")
            wait_for_port(https_port, server, "nginx")
            check_nginx(published_store, http_port, https_port, crt, env, agent_env)
        finally:
            stop(server)
    finally:
        stop(reports)


def check_nginx(store: dict, http_port: int, https_port: int, crt: Path, env: dict, agent_env: dict) -> None:
    url = f"http://127.0.0.1:{http_port}/updates"
    agent = [str(BIN / "avika-agent"), "check"]
    publish = str(BIN / "avika-publish")

    # An agent checks through nginx; the publisher's audit passes.
    done = run(agent, {**agent_env, "UPDATE_SERVER": url})
    assert done.returncode == 0, done.stderr
    decision = json.loads(done.stdout)
    assert (decision["manifest_version"], decision["action"]) == ("0.1.44", "update"), decision
    audit = run([publish, "verify", "--url", url, "--public-key", store["public"]], env)
    assert audit.returncode == 0, audit.stdout + audit.stderr

    # Headers per DESIGN section 2; no ETag on the mutable pointers.
    manifest = requests.get(f"{url}/manifest.json", timeout=5)
    assert manifest.status_code == 200
    assert manifest.headers["Cache-Control"] == "public, max-age=60"
    assert manifest.headers["Content-Type"] == "application/json" and "ETag" not in manifest.headers
    helm = requests.get(f"{url}/helm-values.yaml", timeout=5)
    assert helm.headers["Content-Type"] == "application/yaml" and 'tag: "0.1.44"' in helm.text
    binary_url = json.loads(run([publish, "show", "--json"], env).stdout)["binaries"]["linux-amd64"]["url"]
    binary = requests.get(f"{url}/{binary_url}", timeout=5)
    assert binary.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert binary.headers["Content-Type"] == "application/octet-stream" and binary.headers.get("ETag")
    ranged = requests.get(f"{url}/{binary_url}", headers={"Range": "bytes=0-3"}, timeout=5)
    assert ranged.status_code == 206 and ranged.content == binary.content[:4]
    archived = requests.get(f"{url}/manifests/1.json", timeout=5)
    assert archived.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    for path in ("", "/", "/binaries/", "/manifests/", "/.avika-publish.lock", "/binaries/0.1.44/"):
        assert requests.get(f"{url}{path}", timeout=5).status_code == 404, path
    assert requests.get(f"http://127.0.0.1:{http_port}/", timeout=5).status_code == 404

    # Two re-signs within a second have the same size: the agent must still see each one.
    for percent in (20, 30, 40):
        assert run([publish, "rollout", str(percent)], env).returncode == 0
        seen = run(agent, {**agent_env, "UPDATE_SERVER": url})
        assert seen.returncode == 0, seen.stderr
        live = json.loads(run([publish, "show", "--json"], env).stdout)["serial"]
        assert json.loads(seen.stdout)["serial"] == live

    # HTTPS: the same store, and the reports endpoint behind proxy_pass.
    tls = f"https://127.0.0.1:{https_port}"
    secure = run(agent, {**agent_env, "UPDATE_SERVER": f"{tls}/updates", "SSL_CERT_FILE": str(crt)})
    assert secure.returncode == 0, secure.stderr
    token = run([publish, "enroll", "web-01.eu-west"], env).stdout.strip()
    event = {
        "event_id": str(uuid.uuid4()),
        "agent_id": "web-01.eu-west",
        "stream": f"{int(time.time() * 1000):013x}{os.urandom(8).hex()}",
        "seq": 1,
        "time": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "state": "checking",
        "version": "0.1.43",
        "mode": "vm",
        "platform": "linux-amd64",
        "target_version": None,
        "manifest_serial": None,
    }
    posted = requests.post(
        f"{tls}/v1/reports",
        json={"events": [event]},
        headers={"Authorization": f"Bearer {token}"},
        verify=str(crt),
        timeout=5,
    )
    assert (posted.status_code, posted.json()) == (202, {"accepted": 1, "duplicates": 0})
    assert requests.get(f"{tls}/v1/reports", verify=str(crt), timeout=5).status_code == 405
    assert requests.post(f"http://127.0.0.1:{http_port}/v1/reports", timeout=5).status_code == 404
