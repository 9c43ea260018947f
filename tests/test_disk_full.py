"""A full disk, for real: the data folder on a small tmpfs. Uploads that do not fit answer 507
``insufficient_storage`` (never a 500 with a traceback), leave nothing behind, and the server
goes on answering."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from tests.conftest import _token, error_message

from nox_api.app import create_app
from nox_api.config import load_settings
from nox_api.engine.fake import FakeSandbox
from nox_api.services.tokens import Role

MIB = 1 << 20


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 16 MiB tmpfs (root only: the suite runs as root, as CI does)."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs: run the suite as root (make test does)")
    mount_point = Path(tempfile.mkdtemp(prefix="nox-small-disk-"))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "nox-small-disk", str(mount_point)],
        check=True, timeout=30,
    )  # fmt: skip
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, timeout=30)
        mount_point.rmdir()


@pytest.fixture
def client(small_disk: Path) -> Iterator[TestClient]:
    settings = load_settings(data_dir=small_disk / "data", pool_size=0)
    settings.data_path.mkdir()
    token = _token(settings, Role.ADMIN)
    app = create_app(settings, sandbox=FakeSandbox())
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(app, headers=headers, raise_server_exceptions=False) as c:
        yield c


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.startswith(".nox-")]


def test_an_upload_larger_than_the_free_space_is_507_and_leaves_nothing(
    client: TestClient, small_disk: Path
) -> None:
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    body = b"x" * (free + 2 * MIB)
    for attempt in (
        lambda: client.put("/api/files/big.bin", content=body),
        lambda: client.post("/put", files={"file": ("big.bin", body)}),
    ):
        message = error_message(attempt(), 507, "insufficient_storage")
        assert "disk is full" in message
        assert _leftovers(small_disk) == []
        assert not (small_disk / "data/workspaces/default/big.bin").exists()
    # the server goes on: reads work, and a small upload fits again
    assert client.get("/api/me").status_code == 200
    assert client.put("/api/files/small.txt", content=b"fits").status_code == 201
