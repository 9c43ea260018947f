"""Real bubblewrap runs change a workspace's files, and /api/system/stats sees it about a second
later: the run marks the workspace and the storage scanner walks it (links are not followed)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ._helpers import run_py, run_sh

pytestmark = pytest.mark.sandbox


def _files(client: TestClient) -> dict[str, Any]:
    resp = client.get("/api/system/stats", params={"workspace": "default"})
    assert resp.status_code == 200, resp.text
    files: dict[str, Any] = resp.json()["files"]
    return files


def _wait_for(client: TestClient, count: int, size: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (got := _files(client))["count"] != count or got["bytes"] != size:
        assert time.monotonic() < deadline, f"files stayed {got}, wanted {count} / {size} bytes"
        time.sleep(0.05)


def test_files_made_by_sandboxed_code_show_in_the_stats(bwrap_client: TestClient) -> None:
    bwrap_client.app.state.nox.stats.scanner.settle()  # type: ignore[attr-defined]
    before = _files(bwrap_client)
    made = run_py(
        bwrap_client,
        "import os\n"
        "os.makedirs('made/deep', exist_ok=True)\n"
        "for name, size in (('made/a', 1000), ('made/deep/b', 2345), ('made/c', 0)):\n"
        "    open(name, 'wb').write(b'z' * size)\n"
        "os.symlink('/usr/bin/python3', 'made/link')\n"
        "os.symlink('/usr', 'made/usr')\n",
    )
    assert made["status"] == "ok", made
    _wait_for(bwrap_client, before["count"] + 3, before["bytes"] + 3345)
    after = _files(bwrap_client)
    assert after["scanned_at"] > before["scanned_at"]

    gone = run_sh(bwrap_client, "rm -r made")
    assert gone["status"] == "ok", gone
    _wait_for(bwrap_client, before["count"], before["bytes"])
