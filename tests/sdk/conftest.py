"""Servers the SDK tests talk to: real ``nox-api serve`` processes on 127.0.0.1 with the real
bubblewrap sandbox, started once for the whole folder.

``server``: a working server whose policy limits runner tokens to 1 request per second, gives
the workspace ``tiny`` no quota at all and caps code at 64 KiB. ``broken``: a server without
bubblewrap on its PATH, whose uploads are capped at 1 KiB and whose disk counts as full.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import SANDBOX_ROOT, free_port, nox_serve, write_policy

from noxsdk import AsyncNoxClient, NoxClient

POLICY = """
rate_limits:
  roles:
    runner: 1/second
    admin: 100000/minute
  auth_failures_per_client: 1000/minute
quotas:
  workspaces:
    tiny: {runs_per_day: 0, storage_mib: 0}
limits:
  maxima:
    code_bytes: 65536
"""
CODE_BYTES_MAX = 65536


@dataclass(frozen=True)
class Server:
    url: str
    token: str  # NOX_API_TOKEN: an admin of the workspace "default"
    data_dir: Path

    def client(self, token: str | None = None, **options: Any) -> NoxClient:
        return NoxClient(self.url, self.token if token is None else token, **options)

    def aclient(self, token: str | None = None, **options: Any) -> AsyncNoxClient:
        return AsyncNoxClient(self.url, self.token if token is None else token, **options)


@contextmanager
def _serve(policy: str | None = None, **env: str) -> Iterator[Server]:
    folder = Path(tempfile.mkdtemp(prefix="nox-sdk-", dir=os.path.realpath(SANDBOX_ROOT)))
    folder.chmod(0o711)
    data = folder / "data"
    data.mkdir(mode=0o711)
    if policy is not None:
        env["NOX_POLICY_FILE"] = str(write_policy(folder, policy))
    token = secrets.token_urlsafe(32)
    env.update(NOX_API_TOKEN=token, NOX_BACKUP_KEY=secrets.token_hex(32))
    port = free_port()
    try:
        with nox_serve(data, port, **env):
            yield Server(f"http://127.0.0.1:{port}", token, data)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="package")
def server() -> Iterator[Server]:
    with _serve(POLICY, NOX_DISK_FREE_MIN_MIB="0") as running:
        yield running


@pytest.fixture(scope="package")
def broken() -> Iterator[Server]:
    no_tools = Path(tempfile.mkdtemp(prefix="nox-sdk-path-"))  # no bwrap on the PATH
    try:
        with _serve(
            PATH=str(no_tools), NOX_MAX_UPLOAD_BYTES="1024", NOX_DISK_FREE_MIN_MIB=str(2**40)
        ) as running:
            yield running
    finally:
        no_tools.rmdir()


@pytest.fixture
def admin(server: Server) -> Iterator[NoxClient]:
    with server.client() as client:
        yield client
