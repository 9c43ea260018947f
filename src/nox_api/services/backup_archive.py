"""What a backup holds, and how it goes into its tar stream (reading it back:
:mod:`nox_api.services.backup_unpack`).

Members, in this order::

    MANIFEST.json          {"format", "nox_version", "created_at", "database", "parts"}
    nox.db                 a consistent snapshot of the SQLite database (its backup API)
    audit.key              the audit log's key file, when the data folder has one
    audit/ audit/audit-NNNNNN.jsonl ... audit/audit.jsonl     the audit log, rotated files first
    workspaces/ workspaces/NAME/...                            every workspace's files and folders

Only regular files and folders go in: links, sockets and fifos that sandboxed code made in a
workspace are left out (and counted), and so are entries of the workspaces folder that are not
workspace folders. The SQLite helpers copy the database in and out with SQLite's backup API.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import stat
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, cast

import zstandard

from nox_api._version import __version__
from nox_api.services.tokens import is_workspace_name

__all__ = [
    "ARCHIVE_FORMAT",
    "AUDIT_DIR",
    "AUDIT_KEY",
    "ArchiveStats",
    "ArchiveWriter",
    "DATABASE",
    "IO_BYTES",
    "MANIFEST",
    "WORKSPACES_DIR",
    "Writable",
    "copy_sqlite",
    "count_lines",
    "database_revision",
    "manifest_bytes",
]

ARCHIVE_FORMAT = 1
MANIFEST = "MANIFEST.json"
DATABASE = "nox.db"
AUDIT_KEY = "audit.key"
AUDIT_DIR = "audit"
WORKSPACES_DIR = "workspaces"
ZSTD_LEVEL = 3
ZSTD_THREADS = 2  # zstd's own worker threads: compression runs beside tar and AES
IO_BYTES = 1 << 20
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_DIR = _OPEN_FILE | os.O_DIRECTORY
# What a restore can create under its staging folder (its own path comes on top of these).
MAX_TREE_DEPTH = 128
MAX_ARCHIVE_PATH = 3072

Progress = Callable[[int], None]


class Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


@dataclass
class ArchiveStats:
    """What went into an archive: workspace files and bytes, and entries left out."""

    workspaces: int = 0
    files: int = 0
    bytes: int = 0
    skipped: int = 0


class _FixedSize:
    """Exactly ``size`` bytes of the file ``fd`` from offset 0, as tar needs them: a file that
    grew meanwhile is cut at ``size``, one that shrank is padded with zeros. Each read is a
    view of ``buffer`` (reused: valid until the next read), as tarfile's copy loop only
    hands it on to the compressor, which copies it."""

    def __init__(self, fd: int, size: int, buffer: bytearray, progress: Progress | None) -> None:
        self._fd = fd
        self._left = size
        self._offset = 0
        self._buffer = buffer
        self._progress = progress

    def read(self, n: int = -1, /) -> memoryview:
        n = self._left if n < 0 else min(n, self._left)
        if n > len(self._buffer):
            self._buffer.extend(bytes(n - len(self._buffer)))
        view = memoryview(self._buffer)[:n]
        got = 0
        while got < n:
            step = os.preadv(self._fd, [view[got:]], self._offset + got)
            if not step:
                view[got:] = bytes(n - got)
                break
            got += step
        self._offset += n
        self._left -= n
        if self._progress is not None:
            self._progress(n)
        return view


class ArchiveWriter:
    """A tar stream, zstd-compressed, written into ``out`` (a
    :class:`~nox_api.services.backup_format.ChunkWriter`). ``tar`` is open for callers that add
    members of their own; :meth:`close` ends the tar and the zstd frame (not ``out``). The tar
    goes straight into the compressor (tarfile's stream mode would re-copy a megabyte buffer
    on every write), and file data through one reused buffer."""

    def __init__(self, out: Writable, progress: Progress | None = None) -> None:
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=ZSTD_THREADS)
        # zstd calls nothing but write() (and flush() when there is one) on ``out``
        self._zstd = compressor.stream_writer(
            cast(IO[bytes], out), write_size=IO_BYTES, closefd=False
        )
        # The seekable mode writes and asks tell() once; it never seeks when writing.
        self.tar = tarfile.TarFile(fileobj=self._zstd, mode="w", format=tarfile.PAX_FORMAT)
        self.tar.copybufsize = IO_BYTES  # type: ignore[attr-defined]  # 1 MiB reads, not 16 KiB
        self._buffer = bytearray(IO_BYTES)
        self._progress = progress
        self.stats = ArchiveStats()

    def close(self) -> None:
        self.tar.close()
        self._zstd.flush(zstandard.FLUSH_FRAME)

    # -- members -----------------------------------------------------------------------------
    def add_bytes(self, name: str, data: bytes, mode: int = 0o600) -> None:
        info = _info(name, tarfile.REGTYPE, mode, time.time(), len(data))
        self.tar.addfile(info, io.BytesIO(data))

    def add_dir(self, name: str, mode: int = 0o700, mtime: float | None = None) -> None:
        self.tar.addfile(_info(name, tarfile.DIRTYPE, mode, mtime or time.time()))

    def add_fd(self, name: str, fd: int, size: int, mode: int, mtime: float) -> None:
        """``size`` bytes of the open file ``fd`` as the regular file ``name``."""
        info = _info(name, tarfile.REGTYPE, mode, mtime, size)
        data = _FixedSize(fd, size, self._buffer, self._progress)
        self.tar.addfile(info, cast(IO[bytes], data))  # views: only handed on to write()

    def add_path(self, name: str, path: Path) -> None:
        """The regular file ``path`` (never through a link)."""
        fd = os.open(path, _OPEN_FILE)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"{path} is not a regular file")
            self.add_fd(name, fd, st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime)
        finally:
            os.close(fd)

    def add_workspaces(self, root: Path) -> None:
        """Every workspace below ``root``: folders and regular files, never following a link
        (a folder swapped for a link while the walk goes on is skipped, see ``os.fwalk``)."""
        self.add_dir(WORKSPACES_DIR, 0o711)
        if not root.is_dir():
            return
        for name in sorted(os.listdir(root)):
            top = root / name
            if not is_workspace_name(name) or top.is_symlink() or not top.is_dir():
                self.stats.skipped += 1
                continue
            self.stats.workspaces += 1
            self._add_tree(f"{WORKSPACES_DIR}/{name}", top)

    def _add_tree(self, prefix: str, top: Path) -> None:
        """A workspace, walked without recursion from folder descriptors: each folder is
        entered with ``O_DIRECTORY | O_NOFOLLOW | O_NONBLOCK`` from its parent's descriptor, so
        a folder that sandboxed code swaps for a link or a FIFO fails to open instead of being
        followed or blocking (``os.fwalk`` opens without those flags). Folders deeper than
        :data:`MAX_TREE_DEPTH` and names longer than :data:`MAX_ARCHIVE_PATH` (which a restore
        could not create) are skipped and counted."""
        root = os.open(top, _OPEN_DIR)
        stack: list[tuple[int, str, list[str]]] = []
        try:
            self._enter(root, prefix, stack)
            while stack:
                dir_fd, base, names = stack[-1]
                if not names:
                    os.close(dir_fd)
                    stack.pop()
                    continue
                name = names.pop()
                if not self._add_entry(dir_fd, name, f"{base}/{name}", stack):
                    self.stats.skipped += 1
        finally:
            for dir_fd, _base, _names in stack:
                os.close(dir_fd)

    def _add_entry(  # noqa: PLR0911 - one return per kind of entry reads best
        self, dir_fd: int, name: str, path: str, stack: list[tuple[int, str, list[str]]]
    ) -> bool:
        """Archive a regular file, or queue a folder; False for what is skipped."""
        if len(path) > MAX_ARCHIVE_PATH:
            return False
        try:
            fd = os.open(name, _OPEN_FILE, dir_fd=dir_fd)
        except OSError:  # a link (ELOOP), a socket (ENXIO), gone meanwhile, ...
            return False
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                self.add_fd(path, fd, st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime)
                self.stats.files += 1
                self.stats.bytes += st.st_size
                return True
            if not stat.S_ISDIR(st.st_mode) or len(stack) >= MAX_TREE_DEPTH:
                return False
            child = os.open(name, _OPEN_DIR, dir_fd=dir_fd)
            if not os.path.samestat(st, os.fstat(child)):  # swapped meanwhile
                os.close(child)
                return False
            self._enter(child, path, stack)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def _enter(self, dir_fd: int, base: str, stack: list[tuple[int, str, list[str]]]) -> None:
        """Archive the folder ``dir_fd`` as ``base`` and queue its entries (in name order)."""
        try:
            st = os.fstat(dir_fd)
            names = sorted(os.listdir(dir_fd), reverse=True)  # popped from the end
        except BaseException:
            os.close(dir_fd)
            raise
        self.add_dir(base, stat.S_IMODE(st.st_mode), st.st_mtime)
        stack.append((dir_fd, base, names))


def _info(name: str, kind: bytes, mode: int, mtime: float, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = int(mtime)
    info.size = size
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def manifest_bytes(created_at: str, revision: str | None, parts: list[str]) -> bytes:
    data = {
        "format": ARCHIVE_FORMAT,
        "nox_version": __version__,
        "created_at": created_at,
        "database": {"kind": "sqlite", "revision": revision},
        "parts": parts,
    }
    return json.dumps(data, sort_keys=True, indent=1).encode()


# -- the database --------------------------------------------------------------------------


def copy_sqlite(
    source: Path, target: Path, *, timeout_s: float = 60.0, journal: str | None = None
) -> None:
    """Copy the SQLite database ``source`` into ``target`` with SQLite's backup API, from
    connections of its own: consistent while others write (a live WAL database is never copied
    by hand), and all at once into ``target`` (one transaction there, rolled back on an error,
    so readers of a live ``target`` see the old or the new database, nothing between).
    ``journal`` sets the copy's journal mode afterwards (``DELETE``: one self-contained file).
    Waits at most ``timeout_s`` for other connections' locks."""
    deadline = time.monotonic() + timeout_s

    def give_up_in_time(_status: int, _remaining: int, _total: int) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the database stayed locked for {timeout_s:g} s")

    # as_uri() escapes what a URI would read otherwise ("#", "?", "%" in the data folder's path)
    src = sqlite3.connect(source.absolute().as_uri() + "?mode=ro", uri=True, timeout=timeout_s)
    try:
        dst = sqlite3.connect(target, timeout=timeout_s)
        try:
            src.backup(dst, pages=-1, progress=give_up_in_time, sleep=0.05)
            if journal is not None:
                dst.execute(f"PRAGMA journal_mode={journal}")
        finally:
            dst.close()
    finally:
        src.close()


def count_lines(folder: Path) -> int:
    """Lines of the ``*.jsonl`` files in ``folder`` (entries of an audit log)."""
    total = 0
    for path in sorted(folder.glob("*.jsonl")):
        with path.open("rb") as f:
            while block := f.read(IO_BYTES):
                total += block.count(b"\n")
    return total


def database_revision(snapshot: Path) -> str | None:
    """The schema revision (Alembic's) of a database snapshot, or None."""
    with contextlib.closing(sqlite3.connect(snapshot)) as conn:
        try:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.DatabaseError:
            return None
    return str(row[0]) if row else None
