"""``scripts/audit.sh``: pip-audit that says SKIPPED when it could not audit (instead of "No known
vulnerabilities" while checking nothing), fails on real findings, and writes a CycloneDX SBOM.
pip-audit runs for real against an OSV service on loopback that this test plays."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tests.conftest import free_port
from tests.deploy._stack import REPO

pytestmark = pytest.mark.deploy

VULNERABLE = "pyyaml"  # a dependency of Nox, so it is in the virtualenv


class _Osv(BaseHTTPRequestHandler):
    """OSV's /v1/query: one advisory for VULNERABLE, none for anything else."""

    queried: list[str]  # set on the class by the fixture

    def do_POST(self) -> None:
        query = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        name = query["package"]["name"]
        self.queried.append(name)
        answer: dict[str, object] = {}
        if name == VULNERABLE and self.server.advise:  # type: ignore[attr-defined]
            answer = {
                "vulns": [
                    {
                        "id": "GHSA-test-0000-0001",
                        "summary": "made up for the test",
                        "affected": [
                            {
                                "package": {"name": name, "ecosystem": "PyPI"},
                                "ranges": [
                                    {
                                        "type": "ECOSYSTEM",
                                        "events": [{"introduced": "0"}, {"fixed": "999.0"}],
                                    }
                                ],
                            }
                        ],
                    }
                ]
            }
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def osv() -> Iterator[tuple[ThreadingHTTPServer, list[str]]]:
    queried: list[str] = []
    handler = type("Osv", (_Osv,), {"queried": queried})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    server.advise = True  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, queried
    finally:
        server.shutdown()
        server.server_close()


def _audit(build: Path, *args: str, sbom: bool = False) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(build),  # pip-audit's cache goes there, not to the developer's
        "BUILD_DIR": str(build),
        "NOX_AUDIT_SBOM": "1" if sbom else "0",
    }
    return subprocess.run(
        [str(REPO / "scripts" / "audit.sh"), "--timeout", "5", "-s", "osv",
         "--cache-dir", str(build / "cache"), *args],
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


def test_an_unreachable_service_is_a_loud_skip_and_the_sbom_is_written(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    done = _audit(tmp_path, "--osv-url", f"http://127.0.0.1:{closed}/v1/query", sbom=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "audit: SKIPPED: could not reach the vulnerability service" in done.stdout
    assert "NOTHING WAS AUDITED" in done.stdout
    assert "No known vulnerabilities" not in done.stdout
    sbom = json.loads((tmp_path / "sbom.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX"
    names = {c["name"].lower() for c in sbom["components"]}
    assert {"fastapi", "sqlalchemy", "pyyaml", "cryptography"} <= names
    assert sbom["metadata"]["component"]["name"] == "nox-api"


def test_real_findings_fail(tmp_path: Path, osv: tuple[ThreadingHTTPServer, list[str]]) -> None:
    server, queried = osv
    done = _audit(tmp_path, "--osv-url", f"http://127.0.0.1:{server.server_port}/v1/query")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"audit: VULNERABLE {VULNERABLE} " in done.stdout
    assert "GHSA-test-0000-0001 (fixed in 999.0)" in done.stdout
    assert "audit: FAILED: 1 of " in done.stdout
    assert "SKIPPED" not in done.stdout
    assert VULNERABLE in queried
    assert "fastapi" in queried
    assert "nox-api" not in queried  # the project's own editable packages are not on PyPI
    assert (tmp_path / "pip-audit.json").is_file()
    assert not (tmp_path / "sbom.cdx.json").exists()  # NOX_AUDIT_SBOM=0


def test_no_findings_pass_and_say_how_many_were_audited(
    tmp_path: Path, osv: tuple[ThreadingHTTPServer, list[str]]
) -> None:
    server, queried = osv
    server.advise = False  # type: ignore[attr-defined]
    done = _audit(tmp_path, "--osv-url", f"http://127.0.0.1:{server.server_port}/v1/query")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"audit: no known vulnerabilities in {len(set(queried))} dependencies" in done.stdout
    assert len(set(queried)) > 20
