"""``POST /api/sandbox/clean``: leftovers and old files go, a dry run changes nothing, links are
removed as links, and the database, audit log, logs and backups are never touched."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tests.sandbox._helpers import run_py

from nox_api.config import Settings
from nox_api.services.cleaning import LEFTOVER_GRACE_S, MAX_LISTED_PATHS, UPLOAD_PREFIX
from nox_api.services.tokens import Role

DAY = 86400.0
NOW = time.time()
OLD = NOW - 10 * DAY  # older than the 5 days the tests ask for
STALE = NOW - LEFTOVER_GRACE_S - 600  # a leftover past its grace period, but not 5 days old
FRESH = NOW - 60


def _listing(root: Path) -> dict[str, tuple[str, int, int, str]]:
    """Every entry below ``root`` (links not followed): kind, size, mtime and content hash."""
    found: dict[str, tuple[str, int, int, str]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            st = path.lstat()
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", st.st_size, st.st_mtime_ns, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", 0, 0, "")  # a folder's mtime moves with its entries
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                found[rel] = ("file", st.st_size, st.st_mtime_ns, digest)
    return found


def _make(path: Path, size: int = 0, mtime: float = FRESH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    os.utime(path, (mtime, mtime))
    return path


def _age(path: Path, mtime: float) -> None:
    os.utime(path, (mtime, mtime), follow_symlinks=False)


def _clean(client: TestClient, status: int = 200, **body: Any) -> dict[str, Any]:
    resp = client.post("/api/sandbox/clean", json=body)
    assert resp.status_code == status, resp.text
    result: dict[str, Any] = resp.json()
    return result


@pytest.fixture
def outside() -> Iterator[Path]:
    """A folder outside the data folder, for link targets."""
    folder = Path(tempfile.mkdtemp(prefix="nox-outside-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def scene(client: TestClient, settings: Settings, outside: Path) -> dict[str, int]:
    """A data folder with something of every kind; returns the paths (relative to the data
    folder) a clean with ``older_than_days=5`` must remove, with their byte counts."""
    data = settings.data_path
    ws = settings.workspaces_dir
    expect: dict[str, int] = {}
    # something audited first: the audit log exists and must stay intact
    assert client.post("/api/tokens", json={"name": "s", "role": "viewer"}).status_code == 201

    def gone(path: Path, size: int = 0) -> None:
        expect[path.relative_to(data).as_posix()] = size

    # workspace "default": old files, new files, upload leftovers, a folder that empties
    gone(_make(ws / "default/old.txt", 100, OLD), 100)
    _make(ws / "default/new.txt", 50, FRESH)
    gone(_make(ws / "default/deep/er/old.bin", 2000, OLD), 2000)
    gone(ws / "default/deep/er")
    gone(ws / "default/deep")
    _make(ws / "default/mixed/new.txt", 10, FRESH)
    gone(_make(ws / "default/mixed/old.txt", 10, OLD), 10)
    gone(_make(ws / f"default/sub/{UPLOAD_PREFIX}crashed", 300, STALE), 300)
    _make(ws / f"default/sub/{UPLOAD_PREFIX}writing", 30, FRESH)  # a write under way
    _make(ws / "default/empty-before/.keep", 0, FRESH)
    (ws / "default/empty-already").mkdir()  # not emptied by the clean: stays
    # links: to a file outside (old link: removed as a link), to a folder outside (never walked)
    target = _make(outside / "precious.txt", 64, OLD)
    _make(outside / "tree/old-outside.txt", 8, OLD)
    link = ws / "default/link-out"
    link.symlink_to(target)
    _age(link, OLD)
    gone(link)
    young_link = ws / "default/young-link"
    young_link.symlink_to(outside / "tree")
    # workspace "b"
    gone(_make(ws / "b/old.txt", 7, OLD), 7)
    # staging: a crashed upload and one under way
    gone(_make(settings.staging_dir / "upload-crashed", 500, STALE), 500)
    _make(settings.staging_dir / "upload-now", 5, FRESH)
    # probe folders: one left by a crash (with a file inside), one under way
    old_probe = settings.probe_dir / "probe-old"
    gone(_make(old_probe / "x", 9, STALE), 9)
    _age(old_probe, STALE)
    gone(old_probe)
    _make(settings.probe_dir / "probe-now/y", 1, FRESH)
    # old files where a clean must never go
    for name in ("nox.db", "audit/audit.jsonl", "logs/nox.log", "backups/old.noxbak"):
        path = data / name
        if path.exists():
            _age(path, OLD)
        else:
            _make(path, 11, OLD)
    _make(data / "backups/.nox-upload-x", 3, OLD)
    _make(data / "logs/deep/old.log", 3, OLD)
    _age(data / "audit", OLD)
    return expect


# What the server itself writes while it answers (the clean is audited and logged).
_SERVER_WRITES = ("nox.db", "nox.db-wal", "nox.db-shm", "audit/audit.jsonl", "audit/audit.lock")


def _split(listing: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(entries in the folders a clean walks, every other entry but the server's own writes)"""
    walked = ("workspaces", "staging", "probe")
    inside = {p: v for p, v in listing.items() if p.split("/")[0] in walked}
    others = {
        p: v
        for p, v in listing.items()
        if p.split("/")[0] not in walked and p not in _SERVER_WRITES and p != "logs/nox.log"
    }
    return inside, others


def test_dry_run_changes_nothing_and_reports_what_a_real_run_removes(
    client: TestClient, settings: Settings, scene: dict[str, int]
) -> None:
    data = settings.data_path
    before = _listing(data)
    dry = _clean(client, older_than_days=5, dry_run=True)
    assert _split(_listing(data)) == _split(before)
    assert dry["dry_run"] is True
    assert sorted(dry["paths"]) == sorted(scene)
    assert dry["removed"] == len(scene)
    assert dry["freed_bytes"] == sum(scene.values()) == 2926

    real = _clean(client, older_than_days=5)
    assert real["dry_run"] is False
    assert (real["removed"], real["freed_bytes"]) == (dry["removed"], dry["freed_bytes"])
    assert sorted(real["paths"]) == sorted(dry["paths"])
    inside_before, others_before = _split(before)
    inside_after, others_after = _split(_listing(data))
    assert set(inside_before) - set(inside_after) == set(scene)
    assert inside_after == {p: v for p, v in inside_before.items() if p not in scene}
    assert others_after == others_before
    assert _clean(client, older_than_days=5)["removed"] == 0  # nothing left to do


def test_the_database_audit_logs_and_backups_are_never_touched(
    client: TestClient, settings: Settings, scene: dict[str, int]
) -> None:
    data = settings.data_path
    audit_before = (data / "audit/audit.jsonl").read_bytes()
    log_before = (data / "logs/nox.log").read_bytes()
    db_inode = (data / "nox.db").stat().st_ino
    _, others_before = _split(_listing(data))
    assert {"logs/deep/old.log", "backups/old.noxbak", f"backups/{UPLOAD_PREFIX}x"} <= set(
        others_before
    )
    result = _clean(client, older_than_days=0)
    assert result["removed"] > len(scene)  # older_than_days=0: every workspace file goes
    assert not (settings.workspaces_dir / "default/new.txt").exists()
    _, others_after = _split(_listing(data))
    assert others_after == others_before
    # the audit log and the server log only grew (by the clean's own lines)
    assert (data / "audit/audit.jsonl").read_bytes().startswith(audit_before)
    assert (data / "logs/nox.log").read_bytes().startswith(log_before)
    assert (data / "nox.db").stat().st_ino == db_inode
    assert not any(p.startswith(("audit", "logs", "backups", "nox.db")) for p in result["paths"])
    assert client.get("/api/audit/verify").json()["ok"] is True


def test_links_are_removed_as_links_and_never_followed(
    client: TestClient, settings: Settings, outside: Path, scene: dict[str, int]
) -> None:
    outside_before = _listing(outside)
    _clean(client, older_than_days=0)
    ws = settings.workspaces_dir / "default"
    assert not (ws / "link-out").is_symlink()
    assert not (ws / "young-link").is_symlink()  # older than 0 days too: removed as a link
    assert _listing(outside) == outside_before  # the targets and the tree behind the link


def test_without_older_than_days_only_leftovers_go(
    client: TestClient, settings: Settings, scene: dict[str, int]
) -> None:
    result = _clean(client)
    assert sorted(result["paths"]) == [
        "probe/probe-old",
        "probe/probe-old/x",
        "staging/upload-crashed",
        f"workspaces/default/sub/{UPLOAD_PREFIX}crashed",
    ]
    assert result["freed_bytes"] == 500 + 300 + 9
    assert (settings.workspaces_dir / "default/old.txt").exists()
    assert (settings.workspaces_dir / "default/sub" / f"{UPLOAD_PREFIX}writing").exists()
    assert (settings.staging_dir / "upload-now").exists()
    assert (settings.probe_dir / "probe-now/y").exists()


def test_a_named_workspace_narrows_the_clean(
    client: TestClient, settings: Settings, scene: dict[str, int]
) -> None:
    result = _clean(client, workspace="b", older_than_days=0)
    assert result["paths"] == ["workspaces/b/old.txt"]
    assert (settings.workspaces_dir / "default/old.txt").exists()
    assert (settings.staging_dir / "upload-crashed").exists()  # staging is not a workspace's
    assert (settings.probe_dir / "probe-old").exists()


def test_bad_requests(client: TestClient, make_token: Callable[..., str]) -> None:
    assert _clean(client, 404, workspace="ghost")["error"]["code"] == "not_found"
    assert _clean(client, 400, workspace="../etc")["error"]["code"] == "invalid_request"
    assert _clean(client, 422, older_than_days=-1)["error"]["code"] == "invalid_request"
    assert _clean(client, 422, dry_run=True, everything=True)["error"]["code"] == "invalid_request"
    runner = {"Authorization": f"Bearer {make_token(Role.RUNNER)}"}
    resp = client.post("/api/sandbox/clean", json={}, headers=runner)
    assert resp.status_code == 403


def test_the_clean_is_audited(client: TestClient, scene: dict[str, int]) -> None:
    _clean(client, older_than_days=5, dry_run=True)
    _clean(client, workspace="b")
    items = client.get("/api/audit", params={"action": "sandbox.clean"}).json()["items"]
    assert [(i["target"], i["details"]) for i in items] == [
        ("b", {"dry_run": False, "older_than_days": None, "removed": 0, "freed_bytes": 0}),
        (
            "*",
            {"dry_run": True, "older_than_days": 5, "removed": len(scene), "freed_bytes": 2926},
        ),
    ]
    assert {i["actor_name"] for i in items} == {"test-admin"}


def test_the_list_of_paths_is_capped(client: TestClient, settings: Settings) -> None:
    folder = settings.staging_dir
    for n in range(MAX_LISTED_PATHS + 5):
        _make(folder / f"upload-{n:05d}", 1, STALE)
    result = _clean(client, dry_run=True)
    assert result["removed"] == MAX_LISTED_PATHS + 5
    assert len(result["paths"]) == MAX_LISTED_PATHS
    assert result["paths_truncated"] is True
    assert len(list(folder.iterdir())) == MAX_LISTED_PATHS + 5


@pytest.mark.sandbox
def test_files_made_by_sandboxed_code_are_cleaned(
    bwrap_client: TestClient, bwrap_settings: Settings
) -> None:
    """Files, folders and links that a run made (as the sandbox user), aged from inside."""
    code = (
        "import os, time\n"
        "old = time.time() - 30 * 86400\n"
        "os.makedirs('made/deeper', exist_ok=True)\n"
        "open('made/deeper/old.txt', 'w').write('x' * 123)\n"
        "open('made/new.txt', 'w').write('new')\n"
        "os.symlink('/etc/passwd', 'made/passwd-link')\n"
        "for p in ('made/deeper/old.txt', 'made/passwd-link'):\n"
        "    os.utime(p, (old, old), follow_symlinks=False)\n"
        "print(sorted(os.listdir('made')))\n"
    )
    out = run_py(bwrap_client, code)
    assert out["status"] == "ok", out
    passwd = Path("/etc/passwd").read_bytes()
    result = bwrap_client.post("/api/sandbox/clean", json={"older_than_days": 7}).json()
    assert sorted(result["paths"]) == [
        "workspaces/default/made/deeper",
        "workspaces/default/made/deeper/old.txt",
        "workspaces/default/made/passwd-link",
    ]
    assert result["freed_bytes"] == 123
    assert Path("/etc/passwd").read_bytes() == passwd
    listed = run_py(bwrap_client, "import os; print(sorted(os.listdir('made')))")
    assert listed["stdout"] == "['new.txt']\n"
    assert bwrap_settings.workspaces_dir.joinpath("default/made/new.txt").exists()
