"""Backend selection for real: no bubblewrap gives 503 with the fix, a sandbox user that cannot
reach the interpreter fails the start-up probe, and the explicit unsafe backend runs code."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from nox_api.app import create_app
from nox_api.config import load_settings


def test_without_bwrap_runs_answer_503_with_the_fix(
    data_dir: Path, admin_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(data_dir))  # no bwrap anywhere on it
    settings = load_settings(data_dir=data_dir, pool_size=0)
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {admin_token}"}) as c:
        resp = c.post("/run_py", json={"code": "print(1)"})
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "sandbox_unavailable"
        assert "apt-get install bubblewrap" in resp.json()["error"]["message"]
        assert c.get("/health").status_code == 200


@pytest.mark.sandbox
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start sandboxes as another uid")
def test_an_interpreter_the_sandbox_user_cannot_reach_fails_the_probe(
    data_dir: Path, admin_token: str
) -> None:
    hidden = data_dir / "private"
    hidden.mkdir(mode=0o700)
    (hidden / "python3").symlink_to("/usr/bin/python3")
    settings = load_settings(data_dir=data_dir, pool_size=0, sandbox_python=str(hidden / "python3"))
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {admin_token}"}) as c:
        info = c.app.state.nox.sandbox.info()  # type: ignore[attr-defined]
        # The symlink resolves into /usr, which every sandbox sees, but bwrap starts the path
        # as given, below a 0700 folder the sandbox user cannot cross.
        assert not info.available
        resp = c.post("/run_py", json={"code": "print(1)"})
        assert resp.status_code == 503
        assert "cannot run a trivial program" in resp.json()["error"]["message"]


def test_unsafe_backend_runs_code_and_says_so(
    data_dir: Path, admin_token: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(data_dir=data_dir, pool_size=1, sandbox_backend="unsafe")
    with (
        caplog.at_level(logging.WARNING),
        TestClient(create_app(settings), headers={"Authorization": f"Bearer {admin_token}"}) as c,
    ):
        info = c.app.state.nox.sandbox.info()  # type: ignore[attr-defined]
        assert (info.name, info.isolation, info.available) == ("unsafe", "none", True)
        resp = c.post("/run_py", json={"code": "import os; print(os.getcwd())", "timeout_s": 5})
        assert resp.json()["status"] == "ok"
        assert resp.json()["stdout"] == f"{settings.workspaces_dir / 'default'}\n"
        slow = c.post("/run_sh", json={"cmd": "sleep 5", "timeout_s": 0.5})
        assert slow.json()["status"] == "timeout"
    assert any("WITHOUT ANY ISOLATION" in r.message for r in caplog.records)
