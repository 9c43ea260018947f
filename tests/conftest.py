"""Shared fixtures: each test gets its own data folder, settings and app.

``client`` runs the app in-process on the in-memory fake sandbox (fast). ``bwrap_client`` runs it
on the real bubblewrap backend (marked ``sandbox``; CI always runs those too).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient
from httpx2 import Response

from nox_api.app import create_app
from nox_api.config import Settings, load_settings
from nox_api.engine.fake import FakeSandbox
from nox_api.services.tokens import Role, TokenService
from nox_api.state import Nox
from nox_api.storage.db import Database

SANDBOX_ROOT = Path(os.environ.get("NOX_TEST_TMP", "/tmp"))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's NOX_* variables."""
    for name in list(os.environ):
        if name.startswith("NOX_") and name != "NOX_TEST_TMP":
            monkeypatch.delenv(name)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A fresh data folder. Not under pytest's tmp_path: that may sit below a 0700 home folder,
    and the sandbox user must be able to reach the workspaces."""
    folder = Path(tempfile.mkdtemp(prefix="nox-test-", dir=os.path.realpath(SANDBOX_ROOT)))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def nox_serve(
    data_dir: Path, port: int, **env: str
) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """``nox-api serve`` in a process of its own on 127.0.0.1:``port`` (``NOX_*`` from ``env``
    over ``NOX_POOL_SIZE=1``), once it answers ``/health``; stopped at the end of the block,
    when ``lines`` receives its output."""
    environ = {
        "PATH": os.environ["PATH"],
        "NOX_DATA_DIR": str(data_dir),
        "NOX_PORT": str(port),
        "NOX_POOL_SIZE": "1",
        **env,
    }
    # Output goes to a file, not a pipe: a long-lived server's log would fill a pipe nobody
    # reads until the end, and then block the server.
    output = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        [sys.executable, "-m", "nox_api", "serve"],
        env=environ,
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx2.TransportError:
                time.sleep(0.1)
            assert proc.poll() is None, "the server exited during start-up"
        else:
            pytest.fail("the server did not answer /health within 30 s")
        yield proc, lines
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        output.seek(0)
        lines.extend(output.read().splitlines())
        output.close()


@contextmanager
def uvicorn_serving(app: Any) -> Iterator[tuple[str, Any]]:
    """``app`` served by uvicorn in a thread of this process, on 127.0.0.1 and a port of the
    kernel's choice (for tests that need real connections to an app they build themselves):
    its base URL and the ``uvicorn.Server``; stopped, and checked to have stopped, at the end."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped during start-up"
            assert time.monotonic() < deadline, "uvicorn did not start within 20 s"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


def serve_refused(tmp_path: Path, **env: str) -> tuple[int, list[str]]:
    """``nox-api serve`` with only ``env`` (and a data folder): its exit code and stderr lines,
    for settings that must stop it before it starts."""
    proc = subprocess.run(
        [sys.executable, "-m", "nox_api", "serve"],
        env={"NOX_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stderr.strip().splitlines()


def write_policy(folder: Path, text: str) -> Path:
    """A policy file with ``text`` (YAML; unset fields keep the safe defaults)."""
    path = folder / "policy.yaml"
    path.write_text(text)
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for servers a test starts itself)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def hold_saves(nox: Nox) -> dict[str, threading.Event]:
    """Make the server's writer thread wait before it saves a run's history row, until the
    event of the run's code in the returned dict is set (the answer never waits for it)."""
    held: dict[str, threading.Event] = {}
    real_save = nox.executions._save

    def save(execution: Any, principal: Any, source: str) -> None:
        held.setdefault(source, threading.Event()).wait(5)
        real_save(execution, principal, source)

    nox.executions._save = save  # type: ignore[method-assign]
    return held


def nox_of(c: TestClient) -> Nox:
    """The server parts behind an in-process client."""
    nox: Nox = c.app.state.nox  # type: ignore[attr-defined]
    return nox


def error_message(resp: Response, status: int, code: str) -> str:
    """Assert the error envelope of ``resp`` (API.md); return its message."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "request_id"}
    assert body["error"]["code"] == code
    assert body["error"]["request_id"] == resp.headers["X-Request-ID"]
    message: str = body["error"]["message"]
    return message


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return load_settings(data_dir=data_dir, pool_size=0)


@pytest.fixture
def fake() -> FakeSandbox:
    return FakeSandbox()


def _token(settings: Settings, role: Role, workspace: str = "default") -> str:
    db = Database(settings.sqlalchemy_url)
    db.migrate()
    try:
        return TokenService(db).create(f"test-{role.value}", role, workspace).secret
    finally:
        db.close()


@pytest.fixture
def admin_token(settings: Settings) -> str:
    return _token(settings, Role.ADMIN)


@pytest.fixture
def make_token(settings: Settings):  # type: ignore[no-untyped-def]
    def make(role: Role = Role.RUNNER, workspace: str = "default") -> str:
        return _token(settings, role, workspace)

    return make


@pytest.fixture
def client(settings: Settings, fake: FakeSandbox, admin_token: str) -> Iterator[TestClient]:
    app = create_app(settings, sandbox=fake)
    with TestClient(app, headers={"Authorization": f"Bearer {admin_token}"}) as c:
        yield c


@pytest.fixture
def bwrap_settings(data_dir: Path) -> Settings:
    return load_settings(data_dir=data_dir, pool_size=1)


@pytest.fixture
def bwrap_client(bwrap_settings: Settings) -> Iterator[TestClient]:
    token = _token(bwrap_settings, Role.ADMIN)
    app = create_app(bwrap_settings)
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as c:
        info = c.app.state.nox.sandbox.info()  # type: ignore[attr-defined]
        assert info.available, f"the bubblewrap sandbox must work on this machine: {info.reason}"
        yield c
