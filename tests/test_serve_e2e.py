"""The README's path, for real: `nox-api serve` in a subprocess on 127.0.0.1, its printed admin
token, runs in bubblewrap, an upload read back from code, and a restart that keeps the data."""

from __future__ import annotations

import re
import resource
from pathlib import Path

import httpx2 as httpx
import pytest
from tests.conftest import free_port, nox_serve

pytestmark = pytest.mark.sandbox


def test_serve_prints_a_token_once_and_runs_code(data_dir: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    soft_before, hard_before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard_before), hard_before))
    try:  # the server inherits a low soft limit of open files and raises it to the hard one
        with nox_serve(data_dir, port) as (proc, lines):
            limits = Path(f"/proc/{proc.pid}/limits").read_text()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft_before, hard_before))
    found = re.search(r"Max open files\s+(\S+)\s+(\S+)", limits)
    assert found is not None, limits
    assert found.group(1) == found.group(2) == str(hard_before), limits
    tokens = [m.group(0) for line in lines for m in re.finditer(r"nox_[A-Za-z0-9_-]{43}", line)]
    assert len(tokens) == 1, lines
    auth = {"Authorization": f"Bearer {tokens[0]}"}

    with (
        nox_serve(data_dir, port) as (_proc, lines2),
        httpx.Client(base_url=base, headers=auth, timeout=30) as c,
    ):
        py = c.post("/run_py", json={"code": "import os; print(os.getuid(), os.getcwd())"})
        assert py.status_code == 200, py.text
        assert py.json()["stdout"] == "65534 /workspace\n"
        sh = c.post("/run_sh", json={"cmd": "echo hi; exit 2"})
        assert (sh.json()["stdout"], sh.json()["exit_code"]) == ("hi\n", 2)
        put = c.post(
            "/put", files={"file": ("data.csv", b"a,b\n1,2\n")}, data={"path": "input/data.csv"}
        )
        assert put.status_code == 201, put.text
        read = c.post("/run_py", json={"code": "print(open('input/data.csv').read())"})
        assert read.json()["stdout"] == "a,b\n1,2\n\n"
        assert (
            c.post("/run_py", json={"code": "1"}, headers={"Authorization": "Bearer x"}).status_code
            == 401
        )
    assert not any(re.search(r"nox_[A-Za-z0-9_-]{43}", line) for line in lines2), lines2
