"""The restore's pipeline: the pre-restore backup written beside the unpack, the unpacked tree
placed away from recent deletions, the replaced state removed on threads. Every failure on
either side of the pipeline must leave the data folder as it was (real files, SQLite, AES)."""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tests.conftest import error_message as _error
from tests.conftest import nox_of
from tests.test_backups import KEY, _assert_unchanged, _chunks, _fill_workspaces, _flip, _state

from nox_api.config import Settings, load_settings
from nox_api.services import backup_archive, backup_unpack, restore_files
from nox_api.services import backups as backups_mod
from nox_api.services.backup_format import ChunkReader, ChunkWriter, key_material
from nox_api.services.backups import BackupService
from nox_api.services.tree_removal import remove_tree_fast

MIB = 1 << 20
_FS_IOC_GETFLAGS = 0x80086601
_FS_TOPDIR_FL = 0x00020000


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return load_settings(data_dir=data_dir, pool_size=0, backup_key=KEY)


def _leftovers(settings: Settings) -> list[Path]:
    """What a restore may leave behind when it fails: its staging folder, a pre-restore backup
    (whole or partial)."""
    return [
        *settings.data_path.glob(".restore-*"),
        *settings.backups_dir.glob("pre-restore-*"),
        *settings.backups_dir.glob(".pre-restore-*"),
    ]


def test_a_pre_restore_backup_failing_midway_while_the_unpack_runs_replaces_nothing(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill_workspaces(settings)
    assert client.post("/api/backups", json={"name": "b"}).status_code == 201
    (settings.workspaces_dir / "default" / "notes.txt").write_text("newer than the backup")
    before = _state(settings)
    unpacking = threading.Event()
    failed = threading.Event()
    seen: dict[str, Any] = {}
    real_unpack = BackupService._unpack
    real_write = BackupService._write
    real_add = backup_archive.ArchiveWriter.add_workspaces

    def unpack(self: BackupService, *args: Any) -> dict[str, int]:
        unpacking.set()
        assert failed.wait(10)  # the unpack is under way when the pre-restore backup fails
        seen["partial"] = sorted(p.name for p in settings.backups_dir.glob(".pre-restore-*"))
        return real_unpack(self, *args)

    def write(self: BackupService, *args: Any) -> Any:
        try:
            return real_write(self, *args)
        finally:
            failed.set()

    def add_workspaces(self: backup_archive.ArchiveWriter, root: Path) -> None:
        assert unpacking.wait(10)
        real_add(self, root)  # midway: the database, the audit log and the files are in
        seen["written"] = sorted(p.name for p in settings.backups_dir.glob(".pre-restore-*"))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(BackupService, "_unpack", unpack)
    monkeypatch.setattr(BackupService, "_write", write)
    monkeypatch.setattr(backup_archive.ArchiveWriter, "add_workspaces", add_workspaces)
    message = _error(client.post("/api/backups/b/restore"), 500, "internal")
    assert message.startswith("the backup 'pre-restore-")
    assert "could not be written: [Errno 28] No space left on device" in message
    assert len(seen["written"]) == 1  # the partial pre-restore backup's folder ...
    assert seen["partial"] == []  # ... removed as it failed, while the unpack still ran
    _assert_unchanged(before, _state(settings), ("backup.restore", "failed"))
    assert _leftovers(settings) == []
    assert client.get("/api/audit/verify").json()["ok"]


def test_an_unpack_failing_after_the_pre_restore_backup_ended_removes_that_backup(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill_workspaces(settings)
    assert client.post("/api/backups", json={"name": "good"}).status_code == 201
    good = (settings.backups_dir / "good.noxbak").read_bytes()
    last_at, last_len = _chunks(settings.backups_dir / "good.noxbak")[-1]
    (settings.backups_dir / "bad.noxbak").write_bytes(_flip(good, last_at + last_len - 3))
    before = _state(settings)
    kept = threading.Event()
    made: list[str] = []
    real_write = BackupService._write
    real_unpack = BackupService._unpack

    def write(self: BackupService, name: str, *args: Any) -> Any:
        try:
            return real_write(self, name, *args)
        finally:
            made.extend(p.name for p in settings.backups_dir.glob(f"{name}.noxbak*"))
            kept.set()

    def unpack(self: BackupService, *args: Any) -> dict[str, int]:
        assert kept.wait(10)  # the pre-restore backup is whole before the unpack fails
        return real_unpack(self, *args)

    monkeypatch.setattr(BackupService, "_write", write)
    monkeypatch.setattr(BackupService, "_unpack", unpack)
    message = _error(client.post("/api/backups/bad/restore"), 400, "invalid_request")
    assert "does not authenticate" in message
    assert len(made) == 2  # the backup and its checksum file existed ...
    _assert_unchanged(before, _state(settings), ("backup.restore", "failed"))
    assert _leftovers(settings) == []  # ... and are gone
    assert client.get("/api/audit/verify").json()["ok"]


def test_a_restore_unpacks_below_a_spread_folder_under_a_random_name(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The staging folder is marked for the inode allocator (ext2/3/4), and the unpacked tree
    goes in a randomly named folder below it, so it lands apart from recent deletions."""
    _fill_workspaces(settings)
    assert client.post("/api/backups", json={"name": "b"}).status_code == 201
    spread: list[Path] = []
    unpacked_into: list[Path] = []
    real_spread = backups_mod.spread_below
    real_unpack = BackupService._unpack

    def spy_spread(folder: Path) -> None:
        spread.append(folder)
        real_spread(folder)
        flags = _flags(folder)
        assert flags is None or flags & _FS_TOPDIR_FL  # set wherever the file system has flags

    def spy_unpack(self: BackupService, path: Path, keys: Any, new: Path, *rest: Any) -> Any:
        unpacked_into.append(new)
        return real_unpack(self, path, keys, new, *rest)

    monkeypatch.setattr(backups_mod, "spread_below", spy_spread)
    monkeypatch.setattr(BackupService, "_unpack", spy_unpack)
    assert client.post("/api/backups/b/restore").status_code == 200
    assert client.post("/api/backups/b/restore").status_code == 200
    assert [p.parent for p in spread] == [settings.data_path] * 2
    assert [p.parent for p in unpacked_into] == spread
    first, second = (p.name for p in unpacked_into)
    assert first.startswith("new-")
    assert second.startswith("new-")
    assert first != second


def _flags(folder: Path) -> int | None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        raw = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(8))
    except OSError:
        return None  # tmpfs and others: no inode flags
    finally:
        os.close(fd)
    return int.from_bytes(raw[:4], sys.byteorder)


def test_spreading_a_folder_without_inode_flags_is_a_no_op(tmp_path: Path) -> None:
    restore_files.spread_below(tmp_path / "missing")  # nothing to open: nothing happens
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    restore_files.spread_below(link)  # never through a link
    flags = _flags(tmp_path)
    assert flags is None or not flags & _FS_TOPDIR_FL


def test_the_replaced_state_is_removed_on_threads_and_nothing_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    tree = tmp_path / "tree"
    for i in range(300):
        folder = tree / f"d{i % 7}" / f"e{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i}").write_bytes(b"x" * (i % 5))
    for i in range(400):  # wide: its folders are entered one at a time, not held open together
        (tree / "wide" / f"w{i}").mkdir(parents=True)
        (tree / "wide" / f"w{i}" / "f").write_bytes(b"w")
    (tree / "d0" / "to-outside").symlink_to(outside)
    (tree / "d1" / "to-file").symlink_to(outside / "keep.txt")
    os.mkfifo(tree / "d2" / "pipe")
    deep = tree / "deep"
    path = deep
    for _ in range(20):
        path = path / "x"
    path.mkdir(parents=True)
    (path / "bottom").write_text("b")
    threads_seen: set[str] = set()
    most_fds = [0]
    real_unlink = os.unlink

    def unlink(name: Any, *args: Any, **kwargs: Any) -> None:
        threads_seen.add(threading.current_thread().name)
        most_fds[0] = max(most_fds[0], len(os.listdir("/proc/self/fd")))
        real_unlink(name, *args, **kwargs)

    before = len(os.listdir("/proc/self/fd"))
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "unlink", unlink)
            remove_tree_fast(fd, "tree", threads=4)
        remove_tree_fast(fd, "tree")  # gone already: not an error
        (tmp_path / "file").write_text("f")
        remove_tree_fast(fd, "file")  # a file is removed as remove_tree removes it
    finally:
        os.close(fd)
    assert not tree.exists()
    assert not (tmp_path / "file").exists()
    assert (outside / "keep.txt").read_text() == "keep"
    assert len({t for t in threads_seen if t.startswith("nox-remove")}) > 1
    # tmp_path, a level or two open, 4 * 4 batches waiting with a descriptor each, 4 listings
    assert most_fds[0] - before <= 1 + 2 + 16 + 4 + 4
    assert len(os.listdir("/proc/self/fd")) == before


# -- the chunks and the tar stream ---------------------------------------------------------------


@pytest.mark.parametrize("total", [0, 1, 15, 16, 17, 32, 33, 100])
def test_chunks_round_trip_whatever_the_piece_sizes(
    tmp_path: Path, settings: Settings, total: int
) -> None:
    """A last chunk, sealed as final, may be full: ``16 * k`` bytes make ``k`` chunks (one
    empty final chunk when there are none)."""
    data = os.urandom(total)
    path = tmp_path / "c.bin"
    keys = key_material(settings)
    with path.open("wb") as f:
        writer = ChunkWriter(f, keys, chunk_bytes=16)
        for start in range(0, total, 7):
            writer.write(memoryview(data)[start : start + 7])
        writer.finish()
    assert len(_chunks(path)) == max(1, -(-total // 16))
    with path.open("rb") as f:
        reader = ChunkReader(f, keys)
        assert reader.read(-1) == data


def test_file_modes_are_limited_as_tarfiles_data_filter_limits_them(tmp_path: Path) -> None:
    for mode in range(0o10000):
        info = tarfile.TarInfo("f")
        info.mode = mode
        filtered = tarfile.data_filter(info, str(tmp_path))
        assert backup_unpack._file_mode(mode) == filtered.mode, oct(mode)


def _takes_direct_io(folder: Path) -> bool:
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False  # tmpfs: the restore writes through the page cache there
    os.close(fd)
    os.unlink(folder / "probe")
    return True


def test_a_large_file_is_unpacked_past_the_page_cache_and_exactly(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files over DIRECT_MIN_BYTES go through the aligned buffers: sizes around the buffer
    and block edges come back byte for byte, with their mode and time."""
    default = settings.workspaces_dir / "default"
    default.mkdir(parents=True, exist_ok=True)
    sizes = [restore_files.DIRECT_MIN_BYTES + 1, 4 * MIB, 4 * MIB + 4095, 9 * MIB + 1]
    blobs = {f"b{n}.bin": os.urandom(n) for n in sizes}
    for name, blob in blobs.items():
        (default / name).write_bytes(blob)
        os.utime(default / name, (1_600_000_000, 1_600_000_000))
    (default / f"b{sizes[0]}.bin").chmod(0o755)
    assert client.post("/api/backups", json={"name": "big"}).status_code == 201
    for name in blobs:
        (default / name).write_bytes(b"changed")
    directs: list[bool] = []
    real_open_new = restore_files.open_new

    def open_new(path: str, mode: int = 0o600, *, direct: bool = True) -> tuple[int, bool]:
        fd, used = real_open_new(path, mode, direct=direct)
        directs.append(used)
        return fd, used

    monkeypatch.setattr(restore_files, "open_new", open_new)
    assert client.post("/api/backups/big/restore").status_code == 200
    assert directs == [_takes_direct_io(settings.data_path)] * len(sizes)
    for name, blob in blobs.items():
        assert (default / name).read_bytes() == blob
        assert (default / name).stat().st_mtime == 1_600_000_000
    assert (default / f"b{sizes[0]}.bin").stat().st_mode & 0o777 == 0o755
    assert (default / f"b{sizes[1]}.bin").stat().st_mode & 0o777 == 0o644
    nox_of(client).executions.settle()
