"""Rate limits shared by several servers through a real Redis (``NOX_REDIS_URL``).

The test starts its own ``redis-server`` on 127.0.0.1 (``make test`` installs it as root), and
two Nox apps on one data folder, as two servers behind a load balancer would run.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from tests.conftest import free_port, write_policy

from nox_api.app import create_app
from nox_api.config import Settings, load_settings
from nox_api.engine.fake import FakeSandbox
from nox_api.services.tokens import Role

POLICY = "rate_limits:\n  roles:\n    runner: 3/minute\n"


def _answers_ping(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")
    return False


@pytest.fixture
def redis_url() -> Iterator[str]:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is needed (make test installs it: apt-get install redis-server)"
    port = free_port()
    folder = tempfile.mkdtemp(prefix="nox-redis-")
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly",
         "no", "--dir", folder, "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not _answers_ping(port):
            assert proc.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not answer within 10 s"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def _settings(data_dir: Path, redis: str | None) -> Settings:
    return load_settings(
        data_dir=data_dir, pool_size=0, policy_file=write_policy(data_dir, POLICY), redis_url=redis
    )


@contextlib.contextmanager
def _two_servers(settings: Settings, token: str) -> Iterator[tuple[TestClient, TestClient]]:
    headers = {"Authorization": f"Bearer {token}"}
    with (
        TestClient(create_app(settings, sandbox=FakeSandbox()), headers=headers) as a,
        TestClient(create_app(settings, sandbox=FakeSandbox()), headers=headers) as b,
    ):
        yield a, b


def test_two_servers_share_one_window_through_redis(
    data_dir: Path, redis_url: str, make_token
) -> None:  # type: ignore[no-untyped-def]
    settings = _settings(data_dir, redis_url)
    token = make_token(Role.RUNNER)
    with _two_servers(settings, token) as (a, b):
        remaining = []
        for client in (a, b, a):
            resp = client.get("/api/me")
            assert resp.status_code == 200, resp.text
            remaining.append(resp.headers["X-RateLimit-Remaining"])
        assert remaining == ["2", "1", "0"]  # one count across both servers
        refused = b.get("/api/me")
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) >= 1


def test_without_redis_each_server_counts_alone(data_dir: Path, make_token) -> None:  # type: ignore[no-untyped-def]
    """The contrast that makes the test above mean something."""
    settings = _settings(data_dir, None)
    token = make_token(Role.RUNNER)
    with _two_servers(settings, token) as (a, b):
        for _ in range(3):
            assert a.get("/api/me").status_code == 200
        assert a.get("/api/me").status_code == 429
        assert b.get("/api/me").status_code == 200  # b has its own window


def test_redis_going_away_lets_requests_through_and_says_so(
    data_dir: Path, redis_url: str, make_token, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    settings = _settings(data_dir, redis_url)
    token = make_token(Role.RUNNER)
    port = int(redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    with _two_servers(settings, token) as (a, _b):
        assert a.get("/api/me").status_code == 200
        subprocess.run(
            ["redis-cli", "-p", str(port), "shutdown", "nosave"], check=False, capture_output=True
        )
        if _answers_ping(port):  # no redis-cli: stop it through the protocol
            with socket.create_connection(("127.0.0.1", port), 1) as s:
                s.sendall(b"SHUTDOWN NOSAVE\r\n")
        deadline = time.monotonic() + 5
        while _answers_ping(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(5):  # more than the 3/minute: the limiter fails open
            assert a.get("/api/me").status_code == 200
    assert any("rate limit storage failed" in r.getMessage() for r in caplog.records)
