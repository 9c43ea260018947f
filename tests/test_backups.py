"""Encrypted backups and restore: real files, real SQLite, real AES, the HTTP API, the offline
command line and the cron script. Every refused restore must leave the data folder as it was."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sqlite3
import stat
import struct
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tests.conftest import _token, nox_of
from tests.conftest import error_message as _error
from tests.sandbox._helpers import own_server, run_py
from typer.testing import CliRunner

from nox_api.app import create_app
from nox_api.cli import app as cli_app
from nox_api.config import Settings, load_settings
from nox_api.engine.fake import FakeSandbox
from nox_api.errors import ConfigError, Conflict, InvalidRequest
from nox_api.services import backups as backups_mod
from nox_api.services.auditing import Auditor, open_audit_log
from nox_api.services.backup_archive import ArchiveWriter, manifest_bytes
from nox_api.services.backup_format import (
    BackupFormatError,
    ChunkReader,
    ChunkWriter,
    key_material,
)
from nox_api.services.backup_unpack import extract_archive
from nox_api.services.backups import BackupService
from nox_api.services.server_lock import ServerLock
from nox_api.services.tokens import Role
from nox_api.storage.db import Database

KEY = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
OTHER_KEY = "c0ffee" * 10 + "beef"
PASSPHRASE = "correct horse battery staple"
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "backup" / "backup_nox.sh"
NOX_API = Path(sys.executable).with_name("nox-api")
MIB = 1 << 20
# Compared on their own: the database by its rows, the audit log as "old lines + new ones";
# the server log changes with every request.
_NOT_IN_TREE = ("nox.db", "nox.db-wal", "nox.db-shm", "audit", "logs")
# Tables a background thread or the audit log itself updates while the server runs.
_LIVE_TABLES = ("audit_checkpoint", "workspace_storage")


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    """The shared ``client`` fixture's server, with a backup key."""
    return load_settings(data_dir=data_dir, pool_size=0, backup_key=KEY)


@contextlib.contextmanager
def _server(settings: Settings) -> Iterator[TestClient]:
    """A server on ``settings`` (fake sandbox) with a fresh admin token."""
    token = _token(settings, Role.ADMIN)
    app = create_app(settings, sandbox=FakeSandbox())
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as c:
        yield c


def _fill_workspaces(settings: Settings) -> None:
    """Files as sandboxed code leaves them: nested folders, text, 3 MiB of random bytes (the
    backup then has several 1 MiB chunks), an empty file, a second workspace."""
    default = settings.workspaces_dir / "default"
    (default / "src" / "pkg").mkdir(parents=True, exist_ok=True)
    (default / "src" / "pkg" / "mod.py").write_text("def f():\n    return 42\n" * 50)
    (default / "notes.txt").write_text("remember the milk\n")
    (default / "blob.bin").write_bytes(os.urandom(3 * MIB))
    (default / "empty").write_bytes(b"")
    (default / "empty-dir").mkdir(exist_ok=True)
    other = settings.workspaces_dir / "team-b"
    other.mkdir(parents=True, exist_ok=True)
    (other / "data.csv").write_text("a,b\n1,2\n")


# -- the state of a data folder -----------------------------------------------------------------


@dataclass
class State:
    tree: dict[str, str]  # relative path -> "dir", "link:<target>" or the file's sha256
    rows: dict[str, list[str]]
    audit: list[dict[str, Any]]


def _tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0] in skip:
            continue
        if path.is_symlink():
            found[rel] = f"link:{os.readlink(path)}"
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _rows(settings: Settings) -> dict[str, list[str]]:
    with contextlib.closing(sqlite3.connect(settings.data_path / "nox.db")) as conn:
        tables = [
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        ]
        return {
            table: sorted(repr(row) for row in conn.execute(f"SELECT * FROM {table}"))  # noqa: S608
            for table in tables
            if table not in _LIVE_TABLES
        }


def _audit(settings: Settings) -> list[dict[str, Any]]:
    files = [*sorted(settings.audit_dir.glob("audit-*.jsonl")), settings.audit_dir / "audit.jsonl"]
    return [json.loads(line) for f in files if f.exists() for line in f.read_text().splitlines()]


def _state(settings: Settings, skip: tuple[str, ...] = ()) -> State:
    return State(_tree(settings.data_path, _NOT_IN_TREE + skip), _rows(settings), _audit(settings))


def _assert_unchanged(before: State, after: State, *recorded: tuple[str, str]) -> None:
    """Nothing changed but the audit lines ``recorded`` (action, outcome) at the log's end."""
    assert after.tree == before.tree
    assert after.rows == before.rows
    assert after.audit[: len(before.audit)] == before.audit
    added = after.audit[len(before.audit) :]
    assert [(e["action"], e["outcome"]) for e in added] == list(recorded)


def _no_evil_anywhere(data_dir: Path) -> None:
    assert not list(data_dir.rglob("*evil*"))
    assert not (data_dir.parent / "evil").exists()
    assert not Path("/tmp/evil-absolute").exists()


# -- 1. the round trip ----------------------------------------------------------------------------


def test_backup_then_loss_then_restore_brings_everything_back(
    client: TestClient, settings: Settings
) -> None:
    nox = nox_of(client)
    _fill_workspaces(settings)
    made = client.post("/api/tokens", json={"name": "ci", "role": "runner"})
    assert made.status_code == 201, made.text
    runner = {"Authorization": f"Bearer {made.json()['token']}"}
    for code in ("print(1)", "print(2)", "exit 3"):
        assert client.post("/run_py", json={"code": code}, headers=runner).status_code == 200
    files_before = _tree(settings.workspaces_dir)
    nox.executions.settle()  # the runs' rows are written just after their answers
    runs_before = _rows(settings)["executions"]
    assert len(runs_before) == 3
    tokens_before = len(_rows(settings)["tokens"])
    stored = [p for p in settings.workspaces_dir.rglob("*") if p.is_file()]
    audit_lines = len(_audit(settings))

    resp = client.post("/api/backups", json={"name": "before-loss"})
    assert resp.status_code == 201, resp.text
    info = resp.json()
    path = settings.backups_dir / "before-loss.noxbak"
    assert info["name"] == "before-loss"
    assert info["size"] == path.stat().st_size
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (settings.backups_dir / "before-loss.noxbak.sha256").read_text() == (
        f"{info['sha256']}  before-loss.noxbak\n"
    )
    assert info["created_at"].endswith("Z")
    assert b"remember the milk" not in path.read_bytes()  # encrypted, not just compressed
    assert client.get("/api/backups").json()["items"] == [info]

    # The loss: files deleted, a token revoked, the history gone.
    (settings.workspaces_dir / "default" / "notes.txt").unlink()
    (settings.workspaces_dir / "default" / "blob.bin").write_bytes(b"overwritten")
    (settings.workspaces_dir / "team-b" / "data.csv").unlink()
    (settings.workspaces_dir / "default" / "new-after-backup.txt").write_text("gone later")
    assert client.delete(f"/api/tokens/{made.json()['id']}").status_code == 204
    assert client.get("/api/me", headers=runner).status_code == 401
    with contextlib.closing(sqlite3.connect(settings.data_path / "nox.db")) as conn:
        conn.execute("DELETE FROM executions")
        conn.commit()

    resp = client.post("/api/backups/before-loss/restore")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["restored"] == {
        "workspaces": 2,
        "files": len(stored),
        "bytes": sum(p.stat().st_size for p in stored),
        "executions": 3,
        "tokens": tokens_before,
        "audit_entries": audit_lines,  # the backup's own entry comes after its snapshot
    }
    assert body["pre_restore"].startswith("pre-restore-")

    assert _tree(settings.workspaces_dir) == files_before  # same files, same sha256
    assert client.get("/api/me", headers=runner).status_code == 200
    assert _rows(settings)["executions"] == runs_before
    verify = client.get("/api/audit/verify").json()
    assert verify["ok"], verify
    entries = client.get("/api/audit", params={"limit": 2}).json()["items"]
    assert entries[0]["action"] == "backup.restore"
    assert entries[0]["target"] == "before-loss"
    assert entries[0]["details"]["pre_restore"] == body["pre_restore"]
    # the chain goes on from the restored log: what it held, the pre-restore backup, the restore
    assert entries[1]["action"] == "backup.create"
    assert entries[1]["target"] == body["pre_restore"]
    assert verify["entries"] == body["restored"]["audit_entries"] + 2
    # the log the restore replaced is kept beside the pre-restore backup (lines written while
    # that backup was made are in neither it nor the restored log)
    replaced = settings.backups_dir / f"{body['pre_restore']}.audit"
    assert (replaced / "audit.jsonl").is_file()
    assert stat.S_IMODE(replaced.stat().st_mode) == 0o700
    assert nox.sandbox.flushes == 1  # type: ignore[attr-defined]

    # The state before the restore was kept, and it is a backup like any other.
    names = [item["name"] for item in client.get("/api/backups").json()["items"]]
    assert names == [body["pre_restore"], "before-loss"]
    assert not list(settings.data_path.glob(".restore-*"))
    back = client.post(f"/api/backups/{body['pre_restore']}/restore")
    assert back.status_code == 200, back.text
    assert (settings.workspaces_dir / "default" / "new-after-backup.txt").read_text() == (
        "gone later"
    )
    assert client.get("/api/me", headers=runner).status_code == 401
    assert client.get("/api/audit/verify").json()["ok"]


def test_backups_are_listed_newest_first_and_names_are_unique(client: TestClient) -> None:
    for name in ("first", "second", "third"):
        assert client.post("/api/backups", json={"name": name}).status_code == 201
    items = client.get("/api/backups").json()["items"]
    assert [item["name"] for item in items] == ["third", "second", "first"]
    message = _error(client.post("/api/backups", json={"name": "second"}), 409, "conflict")
    assert "exists already" in message
    missing = _error(client.post("/api/backups/nope/restore"), 404, "not_found")
    assert "nope" in missing
    extra = client.post("/api/backups", json={"name": "x", "compress": False})
    _error(extra, 422, "invalid_request")


def test_links_and_fifos_in_a_workspace_are_left_out_and_counted(
    client: TestClient, settings: Settings
) -> None:
    _fill_workspaces(settings)
    default = settings.workspaces_dir / "default"
    (default / "to-passwd").symlink_to("/etc/passwd")
    (default / "to-src").symlink_to("src")
    os.mkfifo(default / "pipe")
    (settings.workspaces_dir / "Not-A-Workspace").mkdir()
    weird = os.fsencode(default) + b"/not-utf8-\xff\xfe.bin"  # sandboxed code may name files so
    with open(weird, "wb") as f:
        f.write(b"bytes")
    assert client.post("/api/backups", json={"name": "odd-files"}).status_code == 201
    entry = client.get("/api/audit", params={"action": "backup.create"}).json()["items"][0]
    assert entry["details"]["skipped"] == 4
    assert entry["details"]["files"] == 6
    os.unlink(weird)
    for name in ("to-passwd", "to-src", "pipe"):
        (default / name).unlink()
    resp = client.post("/api/backups/odd-files/restore")  # its own backup always restores
    assert resp.status_code == 200, resp.text
    assert not (default / "to-passwd").exists()
    assert not (default / "pipe").exists()
    assert (default / "src" / "pkg" / "mod.py").is_file()
    with open(weird, "rb") as f:
        assert f.read() == b"bytes"


def test_one_backup_or_restore_at_a_time(client: TestClient, settings: Settings) -> None:
    import fcntl

    fd = os.open(settings.backups_dir / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as another process's backup would
        message = _error(client.post("/api/backups", json={"name": "b"}), 409, "conflict")
        assert "another backup or restore is running" in message
    finally:
        os.close(fd)
    assert client.post("/api/backups", json={"name": "b"}).status_code == 201


@pytest.mark.parametrize(
    "name", ["", ".hidden", "-dash", "a b", "x" * 65, "ünïcode", "a\\b", "..", "semi;colon"]
)
def test_bad_backup_names_are_refused(client: TestClient, settings: Settings, name: str) -> None:
    message = _error(client.post("/api/backups", json={"name": name}), 400, "invalid_request")
    assert "must be 1-64 characters" in message
    assert not settings.backups_dir.exists() or not list(settings.backups_dir.glob("*.noxbak"))


@pytest.mark.parametrize("name", [".hidden", "-dash", "x" * 65, "a%20b", "%C3%BC"])
def test_bad_names_to_restore_are_refused(client: TestClient, name: str) -> None:
    message = _error(client.post(f"/api/backups/{name}/restore"), 400, "invalid_request")
    assert "must be 1-64 characters" in message


def test_without_a_key_backups_are_refused_naming_both_settings(data_dir: Path) -> None:
    settings = load_settings(data_dir=data_dir, pool_size=0)
    with _server(settings) as c:
        (settings.backups_dir / "old.noxbak").write_bytes(b"NOXBAK")
        for resp in (
            c.post("/api/backups", json={"name": "new"}),
            c.post("/api/backups/old/restore"),
        ):
            message = _error(resp, 400, "invalid_request")
            assert "no backup key is configured" in message
            assert "NOX_BACKUP_KEY" in message
            assert "NOX_BACKUP_PASSPHRASE" in message
        names = sorted(p.name for p in settings.backups_dir.iterdir())
        assert names == [".lock", "old.noxbak"]


def test_a_backup_that_would_leave_too_little_disk_is_507_and_writes_nothing(
    data_dir: Path,
) -> None:
    free_mib = shutil.disk_usage(data_dir.parent).free // (1 << 20)
    settings = load_settings(
        data_dir=data_dir, pool_size=0, backup_key=KEY, disk_free_min_mib=free_mib + 1024
    )
    with _server(settings) as c:
        resp = c.post("/api/backups", json={"name": "too-big"})
        message = _error(resp, 507, "insufficient_storage")
        assert "below NOX_DISK_FREE_MIN_MIB" in message
        assert sorted(p.name for p in settings.backups_dir.iterdir()) == [".lock"]
        failed = c.get("/api/audit", params={"action": "backup.create"}).json()["items"]
        assert [e["outcome"] for e in failed] == ["failed"]


def test_a_bad_key_setting_is_refused(data_dir: Path) -> None:
    with _server(load_settings(data_dir=data_dir, pool_size=0, backup_key="abc")) as c:
        message = _error(c.post("/api/backups", json={"name": "b"}), 400, "invalid_request")
        assert "NOX_BACKUP_KEY must be 64 hex characters" in message


def test_a_passphrase_derived_key_round_trips(data_dir: Path) -> None:
    settings = load_settings(data_dir=data_dir, pool_size=0, backup_passphrase=PASSPHRASE)
    with _server(settings) as c:
        _fill_workspaces(settings)
        assert c.post("/api/backups", json={"name": "phrase"}).status_code == 201
        header = (settings.backups_dir / "phrase.noxbak").read_bytes()[:300]
        assert b'"name":"scrypt"' in header
        assert b'"n":131072' in header
        (settings.workspaces_dir / "default" / "notes.txt").unlink()
        resp = c.post("/api/backups/phrase/restore")
        assert resp.status_code == 200, resp.text
        assert (settings.workspaces_dir / "default" / "notes.txt").read_text() == (
            "remember the milk\n"
        )
    # The key-encrypted side cannot open it, and says which setting is missing.
    with _server(load_settings(data_dir=data_dir, pool_size=0, backup_key=KEY)) as c:
        message = _error(c.post("/api/backups/phrase/restore"), 400, "invalid_request")
        assert "NOX_BACKUP_PASSPHRASE" in message


def test_only_sqlite_databases_are_backed_up_for_now(settings: Settings, data_dir: Path) -> None:
    pg = load_settings(
        data_dir=data_dir, backup_key=KEY, database_url="postgresql://nox@127.0.0.1/nox"
    )
    settings.backups_dir.mkdir(parents=True)
    (settings.backups_dir / "b.noxbak").write_bytes(b"NOXBAK")
    db = Database(settings.sqlalchemy_url)
    db.migrate()
    try:
        with open_audit_log(settings, db) as audit_log:
            service = BackupService(pg, db, Auditor(audit_log))
            with pytest.raises(InvalidRequest, match="only a SQLite database file for now"):
                service.create("c", None)
            with pytest.raises(InvalidRequest, match="only a SQLite database file for now"):
                service.restore("b", None)
    finally:
        db.close()
    assert sorted(p.name for p in settings.backups_dir.iterdir()) == [".lock", "b.noxbak"]


@pytest.mark.parametrize("command", ["create", "list", "restore"])
def test_offline_commands_refuse_another_database(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    monkeypatch.setenv("NOX_DATA_DIR", str(data_dir))
    monkeypatch.setenv("NOX_BACKUP_KEY", KEY)
    monkeypatch.setenv("NOX_DATABASE_URL", "postgresql://nox@127.0.0.1:9/nox")
    args = ["backup", command] + ([] if command == "list" else ["b"])
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 2, result.output
    assert "backups support only a SQLite database file for now" in result.stderr
    assert "Traceback" not in result.output


# -- 2. damaged, foreign and crafted backups change nothing ---------------------------------------


def _chunks(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of each sealed chunk of a backup file, its length field included."""
    data = path.read_bytes()
    assert data[:6] == b"NOXBAK"
    (header_length,) = struct.unpack(">H", data[7:9])
    offset = 9 + header_length
    spans = []
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        spans.append((offset, 4 + length))
        offset += 4 + length
    return spans


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def _damage(kind: str, good: bytes, spans: list[tuple[int, int]]) -> bytes:
    (mid_at, mid_len), (last_at, last_len) = spans[len(spans) // 2], spans[-1]
    (a_at, a_len), (b_at, b_len) = spans[0], spans[1]
    stamp = good.index(b'"created_at":"') + len(b'"created_at":"') + 3
    digit = b"1" if good[stamp : stamp + 1] != b"1" else b"2"
    damaged: dict[str, Callable[[], bytes]] = {
        "flip-middle-chunk": lambda: _flip(good, mid_at + mid_len // 2),
        "flip-last-chunk": lambda: _flip(good, last_at + last_len - 3),
        # a digit of created_at: still a valid header, but not the one the chunks were sealed with
        "flip-header": lambda: good[:stamp] + digit + good[stamp + 1 :],
        "cut-at-chunk-boundary": lambda: good[:last_at],
        "cut-mid-chunk": lambda: good[: mid_at + mid_len // 2],
        "swap-chunks": lambda: (
            good[:a_at]
            + good[b_at : b_at + b_len]
            + good[a_at : a_at + a_len]
            + good[b_at + b_len :]
        ),
        "extra-bytes": lambda: good + b"\x00" * 32,
    }
    return damaged[kind]()


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("flip-middle-chunk", "corrupted backup: chunk 2 does not authenticate"),
        ("flip-last-chunk", "does not authenticate"),
        ("flip-header", "wrong key or corrupted backup"),
        ("cut-at-chunk-boundary", "truncated: it ends after chunk"),
        ("cut-mid-chunk", "truncated inside chunk 2"),
        ("swap-chunks", "wrong key or corrupted backup"),
        ("extra-bytes", "data follows its final chunk"),
    ],
)
def test_a_damaged_backup_is_refused_and_nothing_changes(
    client: TestClient, settings: Settings, kind: str, fragment: str
) -> None:
    _fill_workspaces(settings)
    assert client.post("/api/backups", json={"name": "good"}).status_code == 201
    good_path = settings.backups_dir / "good.noxbak"
    spans = _chunks(good_path)
    assert len(spans) >= 4  # 3 MiB of random bytes: several 1 MiB chunks and the final one
    bad = _damage(kind, good_path.read_bytes(), spans)
    (settings.backups_dir / "bad.noxbak").write_bytes(bad)
    (settings.workspaces_dir / "default" / "notes.txt").write_text("changed after the backup")
    before = _state(settings)

    message = _error(client.post("/api/backups/bad/restore"), 400, "invalid_request")
    assert fragment in message

    _assert_unchanged(before, _state(settings), ("backup.restore", "failed"))
    assert client.get("/api/audit/verify").json()["ok"]
    assert not list(settings.data_path.glob(".restore-*"))


def test_a_backup_under_another_key_is_refused_at_its_first_chunk(
    client: TestClient, settings: Settings
) -> None:
    nox = nox_of(client)
    _fill_workspaces(settings)
    foreign = load_settings(data_dir=settings.data_dir, pool_size=0, backup_key=OTHER_KEY)
    BackupService(foreign, nox.db, nox.auditor).create("foreign", None)
    before = _state(settings)
    message = _error(client.post("/api/backups/foreign/restore"), 400, "invalid_request")
    assert message == "wrong key or corrupted backup: chunk 0 does not authenticate"
    _assert_unchanged(before, _state(settings), ("backup.restore", "failed"))


def _tar_member(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.linkname = link
    return info, data


def _forge(path: Path, settings: Settings, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    """A backup sealed by the real writer, around a tar made by hand."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    with path.open("wb") as f:
        sealed = ChunkWriter(f, key_material(settings))
        archive = ArchiveWriter(sealed)  # type: ignore[arg-type]
        archive.add_bytes("MANIFEST.json", manifest_bytes("2025-01-01T00:00:00Z", None, []))
        for info, data in members:
            archive.tar.addfile(info, io.BytesIO(data))
        archive.close()
        sealed.finish()


_WORKSPACE_START = [
    _tar_member("workspaces", tarfile.DIRTYPE),
    _tar_member("workspaces/default", tarfile.DIRTYPE),
    _tar_member("workspaces/default/fine.txt", data=b"harmless"),
]


@pytest.mark.parametrize(
    ("member", "fragment"),
    [
        (_tar_member("../../evil", data=b"owned"), "not plain and relative"),
        (_tar_member("workspaces/default/../../../evil", data=b"x"), "not plain and relative"),
        (_tar_member("/tmp/evil-absolute", data=b"x"), "absolute path"),
        (_tar_member("workspaces/default/evil", tarfile.SYMTYPE, link="/etc"), "neither a regular"),
        (
            _tar_member("workspaces/default/evil", tarfile.LNKTYPE, link="nox.db"),
            "neither a regular",
        ),
        (_tar_member("workspaces/default/evil", tarfile.FIFOTYPE), "neither a regular"),
        (_tar_member("workspaces/default/evil", tarfile.CHRTYPE), "neither a regular"),
        (_tar_member("evil", data=b"x"), "unexpected entry"),
        (_tar_member("workspaces/EVIL/x", data=b"x"), "unexpected entry"),
        (
            _tar_member("workspaces/default/fine.txt", data=b"again"),
            "holds 'workspaces/default/fine.txt' twice",
        ),
        (_tar_member("workspaces/default/fine.txt/under", data=b"x"), "entries collide"),
    ],
    ids=[
        "dotdot",
        "inner-dotdot",
        "absolute",
        "symlink",
        "hardlink",
        "fifo",
        "device",
        "top",
        "ws",
        "twice",
        "file-then-child",
    ],
)
def test_a_crafted_archive_is_refused_and_nothing_changes(
    client: TestClient,
    settings: Settings,
    data_dir: Path,
    member: tuple[tarfile.TarInfo, bytes],
    fragment: str,
) -> None:
    _fill_workspaces(settings)
    _forge(settings.backups_dir / "crafted.noxbak", settings, [*_WORKSPACE_START, member])
    before = _state(settings)
    message = _error(client.post("/api/backups/crafted/restore"), 400, "invalid_request")
    assert fragment in message
    _assert_unchanged(before, _state(settings), ("backup.restore", "failed"))
    _no_evil_anywhere(data_dir)
    assert not list(settings.data_path.glob(".restore-*"))


def test_an_archive_larger_than_the_free_disk_is_refused(
    client: TestClient, settings: Settings, data_dir: Path
) -> None:
    _fill_workspaces(settings)
    assert client.post("/api/backups", json={"name": "big"}).status_code == 201
    target = data_dir / ".restore-test"
    target.mkdir()
    with (settings.backups_dir / "big.noxbak").open("rb") as f:
        plain = ChunkReader(f, key_material(settings))
        with pytest.raises(BackupFormatError, match="unpacks to more than the 2 MiB"):
            extract_archive(plain, target, 2 * MIB)
    unpacked = [p for p in target.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in unpacked) <= 2 * MIB
    assert not any(p.name == "blob.bin" for p in unpacked)  # the 3 MiB file never started


def test_an_archive_without_a_database_is_refused(client: TestClient, settings: Settings) -> None:
    _forge(settings.backups_dir / "empty.noxbak", settings, list(_WORKSPACE_START))
    before = _state(settings)
    message = _error(client.post("/api/backups/empty/restore"), 400, "invalid_request")
    assert message == "the backup holds no database"
    _assert_unchanged(before, _state(settings), ("backup.restore", "failed"))


def _future_database(folder: Path) -> bytes:
    path = folder / "future.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('ffff_from_a_newer_nox')")
        conn.commit()
    return path.read_bytes()


@pytest.mark.parametrize(
    ("database", "fragment"),
    [
        ("future", "cannot be brought to this Nox's schema"),
        ("garbage", "the backup's database is not readable"),
    ],
)
def test_a_database_from_a_newer_nox_or_no_database_is_refused(
    client: TestClient, settings: Settings, tmp_path: Path, database: str, fragment: str
) -> None:
    data = _future_database(tmp_path) if database == "future" else os.urandom(8192)
    members = [*_WORKSPACE_START, _tar_member("nox.db", data=data)]
    _forge(settings.backups_dir / "odd.noxbak", settings, members)
    before = _state(settings)
    message = _error(client.post("/api/backups/odd/restore"), 400, "invalid_request")
    assert fragment in message
    _assert_unchanged(before, _state(settings), ("backup.restore", "failed"))


def test_a_failure_in_the_middle_of_the_swap_keeps_the_old_state(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    nox = nox_of(client)
    _fill_workspaces(settings)
    assert client.post("/api/backups", json={"name": "b"}).status_code == 201
    (settings.workspaces_dir / "default" / "notes.txt").write_text("newer than the backup")
    nox.tokens.create("made-after", Role.VIEWER)
    before = _state(settings, skip=("backups",))
    calls: list[Path] = []

    def fail(staged: Path, live: Path) -> None:
        calls.append(live)
        # the folders are swapped by now: the new ones are in place
        assert (settings.workspaces_dir / "default" / "notes.txt").read_text() == (
            "remember the milk\n"
        )
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(backups_mod, "restore_database", fail)
    message = _error(client.post("/api/backups/b/restore"), 500, "internal")
    assert message == "the restore failed and the previous state was kept: the disk is on fire"
    assert calls == [settings.data_path / "nox.db"]
    _assert_unchanged(
        before, _state(settings, skip=("backups",)), ("backup.create", "ok"),
        ("backup.restore", "failed"),
    )  # fmt: skip
    assert client.get("/api/audit/verify").json()["ok"]
    # The audit log still works where it was: the next entries chain on.
    assert client.post("/api/tokens", json={"name": "later", "role": "viewer"}).status_code == 201
    assert client.get("/api/audit/verify").json()["ok"]


def test_a_restore_killed_during_the_swap_stops_the_next_start(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between the first rename and the database copy leaves the SWAPPING marker: the
    next server start and the next restore refuse, naming the folder; a completed or undone
    swap leaves no marker."""
    _fill_workspaces(settings)
    assert client.post("/api/backups", json={"name": "b"}).status_code == 201
    seen: list[list[Path]] = []

    def crash(staged: Path, live: Path) -> None:
        seen.append(sorted(settings.data_path.glob(".restore-*/SWAPPING")))
        raise KeyboardInterrupt  # stands for the process dying: not turned into an answer

    monkeypatch.setattr(backups_mod, "restore_database", crash)
    with pytest.raises(KeyboardInterrupt):
        nox_of(client).backups.restore("b", None)
    assert len(seen) == 1
    assert len(seen[0]) == 1  # the marker was there while the parts were swapped
    assert backups_mod.interrupted_restores(settings.data_path) == []  # undone: marker gone
    monkeypatch.undo()

    stage = settings.data_path / ".restore-crashed"
    stage.mkdir()
    (stage / backups_mod.SWAP_MARKER).write_text("x")  # what a real crash leaves
    assert backups_mod.interrupted_restores(settings.data_path) == [stage]
    message = _error(client.post("/api/backups/b/restore"), 409, "conflict")
    assert ".restore-crashed" in message
    app = create_app(settings, sandbox=FakeSandbox())
    with pytest.raises(ConfigError, match="stopped while it swapped"), TestClient(app):
        pass
    monkeypatch.setenv("NOX_DATA_DIR", str(settings.data_path))
    monkeypatch.setenv("NOX_BACKUP_KEY", KEY)
    served = CliRunner().invoke(cli_app, ["serve", "--port", "1"])
    assert served.exit_code == 2, served.output
    assert "stopped while it swapped" in served.output
    (stage / backups_mod.SWAP_MARKER).unlink()
    resp = client.post("/api/backups/b/restore")
    assert resp.status_code == 200, resp.text


# -- 3. the offline command line ------------------------------------------------------------------


@pytest.fixture
def offline(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("NOX_DATA_DIR", str(data_dir))
    monkeypatch.setenv("NOX_BACKUP_KEY", KEY)
    return load_settings()


def test_offline_create_list_and_restore(offline: Settings) -> None:
    runner = CliRunner()
    made = runner.invoke(cli_app, ["token", "create", "--name", "ops", "--role", "admin"])
    assert made.exit_code == 0, made.output
    _fill_workspaces(offline)

    created = runner.invoke(cli_app, ["backup", "create", "nightly-1"])
    assert created.exit_code == 0, created.output
    path = offline.backups_dir / "nightly-1.noxbak"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert created.stdout.strip() == (
        f"created {path} ({path.stat().st_size} bytes, sha256 {digest})"
    )
    listed = runner.invoke(cli_app, ["backup", "list"])
    assert listed.exit_code == 0, listed.output
    assert "nightly-1" in listed.stdout
    assert digest in listed.stdout

    files = _tree(offline.workspaces_dir)
    (offline.workspaces_dir / "default" / "notes.txt").unlink()
    restored = runner.invoke(cli_app, ["backup", "restore", "nightly-1"])
    assert restored.exit_code == 0, restored.output
    assert restored.stdout.startswith("restored nightly-1: workspaces 2, files 5, ")
    assert "the state before it is in the backup pre-restore-" in restored.stdout
    assert _tree(offline.workspaces_dir) == files
    verified = runner.invoke(cli_app, ["audit", "verify"])
    assert verified.exit_code == 0, verified.output
    actions = [(e["action"], e["actor_name"]) for e in _audit(offline)]
    assert actions[-1][0] == "backup.restore"
    assert actions[-1][1].startswith("cli:")


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["backup", "restore", "missing"], 4, "no backup named 'missing'"),
        (["backup", "create", ".hidden"], 2, "must be 1-64 characters"),
        (["backup", "restore", "--", "-x"], 2, "must be 1-64 characters"),
    ],
)
def test_offline_errors_exit_with_their_codes(
    offline: Settings, args: list[str], code: int, fragment: str
) -> None:
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == code, result.output
    assert fragment in result.stderr


def test_offline_create_twice_and_without_a_key(
    offline: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    assert runner.invoke(cli_app, ["backup", "create", "once"]).exit_code == 0
    again = runner.invoke(cli_app, ["backup", "create", "once"])
    assert again.exit_code == 1
    assert "exists already" in again.stderr
    monkeypatch.delenv("NOX_BACKUP_KEY")
    keyless = runner.invoke(cli_app, ["backup", "create", "twice"])
    assert keyless.exit_code == 2
    assert "NOX_BACKUP_KEY" in keyless.stderr
    assert "NOX_BACKUP_PASSPHRASE" in keyless.stderr


def test_offline_restore_refuses_while_a_server_runs(
    offline: Settings, client: TestClient, data_dir: Path
) -> None:
    runner = CliRunner()
    _fill_workspaces(offline)
    assert runner.invoke(cli_app, ["backup", "create", "b"]).exit_code == 0
    (offline.workspaces_dir / "default" / "notes.txt").unlink()
    before = _state(offline)
    result = runner.invoke(cli_app, ["backup", "restore", "b"])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == (
        "nox-api: a server is running on this data folder; use POST /api/backups/b/restore"
    )
    _assert_unchanged(before, _state(offline))
    assert not (offline.workspaces_dir / "default" / "notes.txt").exists()
    # The server's own route does it.
    assert client.post("/api/backups/b/restore").status_code == 200
    assert (offline.workspaces_dir / "default" / "notes.txt").exists()


def test_a_server_does_not_start_during_an_offline_restore(settings: Settings) -> None:
    app = create_app(settings, sandbox=FakeSandbox())
    with (
        ServerLock.exclusive(settings.data_path, "b"),
        pytest.raises(ConfigError, match="an offline restore is running"),
        TestClient(app),
    ):
        pass
    # afterwards it starts, and then an offline restore cannot
    with TestClient(create_app(settings, sandbox=FakeSandbox())), pytest.raises(Conflict):
        ServerLock.exclusive(settings.data_path, "b")


# -- 4. the cron script --------------------------------------------------------------------------


def _script(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=False, capture_output=True, text=True, **kwargs)


def test_the_cron_script_backs_up_and_keeps_the_newest(offline: Settings, data_dir: Path) -> None:
    runner = CliRunner()
    _fill_workspaces(offline)
    old = ["nightly-20200101T000000Z", "nightly-20200102T000000Z", "nightly-20200103T000000Z"]
    for name in [*old, "keep-me"]:
        assert runner.invoke(cli_app, ["backup", "create", name]).exit_code == 0
    env = {
        "PATH": os.environ["PATH"],
        "NOX_DATA_DIR": str(data_dir),
        "NOX_BACKUP_KEY": KEY,
        "NOX_API_BIN": str(NOX_API),
    }
    proc = _script(["bash", str(SCRIPT), "2"], env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    left = sorted(p.name for p in offline.backups_dir.glob("*.noxbak"))
    assert len(left) == 3
    assert left[0] == "keep-me.noxbak"
    assert left[1] == "nightly-20200103T000000Z.noxbak"
    assert left[2].startswith("nightly-2")
    assert left[2] > left[1]
    assert not (offline.backups_dir / f"{old[0]}.noxbak.sha256").exists()
    assert "removed" in proc.stdout

    failing = _script(
        ["bash", str(SCRIPT), "2"], env={**env, "NOX_BACKUP_KEY": "not-hex"},
        timeout=120,
    )  # fmt: skip
    assert failing.returncode == 2
    assert "NOX_BACKUP_KEY must be 64 hex characters" in failing.stderr
    assert sorted(p.name for p in offline.backups_dir.glob("*.noxbak")) == left
    bad_keep = _script(["bash", str(SCRIPT), "zero"], env=env, timeout=60)
    assert bad_keep.returncode == 2
    assert "KEEP must be a whole number" in bad_keep.stderr

    # the key from an env file (kept off the crontab line), which must not be readable by others
    env_file = data_dir.parent / f"{data_dir.name}.env"
    env_file.write_text(f"NOX_DATA_DIR={data_dir}\nNOX_BACKUP_KEY={KEY}\n")
    env_file.chmod(0o644)
    bare = {"PATH": os.environ["PATH"], "NOX_API_BIN": str(NOX_API), "NOX_ENV_FILE": str(env_file)}
    loose = _script(["bash", str(SCRIPT), "2"], env=bare, timeout=60)
    assert loose.returncode == 2
    assert "readable by others" in loose.stderr
    env_file.chmod(0o600)
    time.sleep(1.1)  # names hold the second: not the same as the first run's
    from_file = _script(["bash", str(SCRIPT), "5"], env=bare, timeout=120)
    assert from_file.returncode == 0, from_file.stderr
    assert len(list(offline.backups_dir.glob("nightly-*.noxbak"))) == 3
    env_file.unlink()


# -- 5. a real sandbox sees the restored workspace ------------------------------------------------


def _wait_for(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.sandbox
def test_a_restore_reaches_warm_sandboxes(data_dir: Path) -> None:
    with own_server(data_dir, pool_size=1, backup_key=KEY) as c:
        sandbox = nox_of(c).sandbox
        assert run_py(c, "open('note.txt', 'w').write('before')")["status"] == "ok"
        assert c.post("/api/backups", json={"name": "b"}).status_code == 201
        assert run_py(c, "open('note.txt', 'w').write('after')")["status"] == "ok"
        _wait_for(lambda: sandbox.pool_stats().ready >= 1)  # type: ignore[attr-defined]
        assert c.post("/api/backups/b/restore").status_code == 200
        got = run_py(c, "print(open('note.txt').read())")
        assert got["stdout"] == "before\n", got
        # restored files belong to the sandbox user again: code may change them
        wrote = run_py(c, "open('note.txt', 'a').write('+more'); print(open('note.txt').read())")
        assert wrote["stdout"] == "before+more\n", wrote


def test_too_deep_or_too_long_paths_are_skipped_so_every_backup_restores(
    client: TestClient, settings: Settings
) -> None:
    """Sandboxed code can nest folders deeper, and paths longer, than a restore could create:
    the backup leaves them out (counted) instead of writing a backup no restore accepts."""
    from nox_api.services.backup_archive import MAX_ARCHIVE_PATH, MAX_TREE_DEPTH

    default = settings.workspaces_dir / "default"
    default.mkdir(parents=True, exist_ok=True)
    (default / "kept.txt").write_bytes(b"kept")
    fd = os.open(default, os.O_RDONLY | os.O_DIRECTORY)
    try:  # deeper than the cap, by descriptors (the absolute path would be too long)
        for _ in range(MAX_TREE_DEPTH + 5):
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with open(os.open("deep.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(b"deep")
    finally:
        os.close(fd)
    long_dir = default / ("n" * 200)
    path = long_dir
    while len(str(path.relative_to(settings.data_path))) < MAX_ARCHIVE_PATH + 300:
        path = path / ("n" * 200)
    os.makedirs(path)
    (path / "long.txt").write_bytes(b"long")

    assert client.post("/api/backups", json={"name": "deep"}).status_code == 201
    entry = client.get("/api/audit", params={"action": "backup.create"}).json()["items"][0]
    assert entry["details"]["skipped"] >= 2
    resp = client.post("/api/backups/deep/restore")
    assert resp.status_code == 200, resp.text
    assert (default / "kept.txt").read_bytes() == b"kept"


def test_a_data_folder_with_uri_characters_backs_up_its_real_database(data_dir: Path) -> None:
    """SQLite reads ``file:`` URIs: a "#" or "?" in the data folder's path must not make the
    backup copy some other (empty) database."""
    odd = data_dir / "a#b?c%d"
    odd.mkdir()
    odd.chmod(0o711)
    settings = load_settings(data_dir=odd, pool_size=0, backup_key=KEY)
    token = _token(settings, Role.ADMIN)
    app = create_app(settings, sandbox=FakeSandbox())
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as c:
        assert c.post("/api/backups", json={"name": "odd"}).status_code == 201
        resp = c.post("/api/backups/odd/restore")
        assert resp.status_code == 200, resp.text
        assert resp.json()["restored"]["tokens"] >= 1  # the real database, with its token
        assert c.get("/api/me").status_code == 200
