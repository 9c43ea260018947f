"""Reading a backup's tar stream back (its layout: :mod:`nox_api.services.backup_archive`), and
getting its database ready to go live (:func:`prepare_database`).

:func:`extract_archive` accepts only the layout's names, only regular files and folders, every
path plain, relative and inside the destination, each file created anew (``O_EXCL |
O_NOFOLLOW``), and at most ``max_bytes`` in total; anything else raises
:class:`~nox_api.services.backup_format.BackupFormatError`. A file's mode is limited as
tarfile's ``data`` filter limits it (no set-id or sticky bits, no write for group and others).
The destination is a new private folder in which only regular files and folders are ever made,
so a path checked against it lexically (from its real path) cannot meet a link.

The tar stream is read with tarfile's seekable mode over a forward-only reader (its stream mode
re-copies a megabyte buffer on every read: seconds per GiB). Creating files is most of a
restore's time, so a thread of its own does it (:class:`~.restore_files.FileMaker`), fed
through a bounded queue while this thread decrypts, decompresses and parses. Files over
:data:`~.restore_files.DIRECT_MIN_BYTES` are decompressed straight into page-aligned buffers
and written past the page cache (:mod:`.direct_io`); the restore then syncs the file system
once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sqlite3
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

import zstandard

from nox_api.services.backup_archive import (
    ARCHIVE_FORMAT,
    AUDIT_DIR,
    AUDIT_KEY,
    DATABASE,
    IO_BYTES,
    MANIFEST,
    WORKSPACES_DIR,
)
from nox_api.services.backup_format import BackupFormatError
from nox_api.services.direct_io import AlignedPool
from nox_api.services.restore_files import DIRECT_MIN_BYTES, FileMaker
from nox_api.services.tokens import is_workspace_name
from nox_api.storage.db import Database

__all__ = ["Extracted", "Readable", "extract_archive", "prepare_database"]

MAX_MANIFEST_BYTES = 64 * 1024
MAX_NAME_BYTES = 255
MAX_PATH_CHARS = 4096
_BLOCK_BYTES = 4 << 20  # one aligned buffer of a large file's data
_POOL_BUFFERS = 6  # aligned buffers in flight at most
_AUDIT_FILE_RE = re.compile(r"audit(?:-\d{6,})?\.jsonl")

Owner = tuple[int, int] | None


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Progress(Protocol):
    def __call__(self, done: int, /) -> None: ...


@dataclass
class Extracted:
    """What :func:`extract_archive` wrote, and the manifest it read."""

    manifest: dict[str, Any] = field(default_factory=dict)
    workspaces: set[str] = field(default_factory=set)
    files: int = 0
    bytes: int = 0
    total_bytes: int = 0  # every member, database and audit log included
    has_database: bool = False
    has_audit_key: bool = False

    def count(self, parts: list[str], member: tarfile.TarInfo) -> None:
        if parts[0] == DATABASE:
            self.has_database = True
        elif parts[0] == AUDIT_KEY:
            self.has_audit_key = True
        elif parts[0] == WORKSPACES_DIR and len(parts) > 1:
            self.workspaces.add(parts[1])
            if member.isfile():
                self.files += 1
                self.bytes += member.size


class _Raw(io.RawIOBase):
    """The decompressed stream as a raw file, for :class:`io.BufferedReader`."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return int(self._source.readinto(buffer))


class _Forward:
    """A forward-only file over the decompressed tar stream: what tarfile's seekable mode
    needs (``tell``, ``seek`` to here or further on, ``read``), and ``readinto``, which fills
    a large buffer straight from the decompressor."""

    def __init__(self, source: Any) -> None:
        self._buffered = io.BufferedReader(_Raw(source), IO_BYTES)
        self._position = 0

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or offset < self._position:
            raise tarfile.ReadError("the archive would have to be read backwards")
        while self._position < offset:
            skipped = self.read(min(offset - self._position, IO_BYTES))
            if not skipped:
                break  # the end: the next read finds nothing
        return self._position

    def read(self, size: int = -1) -> bytes:
        data = self._buffered.read(size)
        self._position += len(data)
        return data

    def readinto(self, buffer: memoryview) -> int:
        """Fill ``buffer`` (less only at the end of the stream)."""
        done = 0
        while done < len(buffer):
            got = self._buffered.readinto(buffer[done:])
            if not got:
                break
            done += got
        self._position += done
        return done

    def drain(self) -> None:
        """Read to the end (whatever follows the tar's end marker)."""
        while self.read(IO_BYTES):
            pass


def _file_mode(mode: int | None) -> int:
    """A regular file's mode as tarfile's ``data`` filter makes it: no set-id or sticky bits,
    no write for group and others, read and write for the owner, execute only with the
    owner's."""
    mode = (0o600 if mode is None else mode) & 0o755
    if not mode & 0o100:
        mode &= ~0o111
    return mode | 0o600


def _components(name: str) -> list[str]:
    if not name or "\x00" in name or len(name) > MAX_PATH_CHARS:
        raise BackupFormatError(f"the archive holds an entry with a bad name {name[:100]!r}")
    if name.startswith("/"):
        raise BackupFormatError(f"the archive holds an absolute path {name[:100]!r}")
    parts = name.rstrip("/").split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise BackupFormatError(
                f"the archive holds a path that is not plain and relative: {name[:100]!r}"
            )
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise BackupFormatError(f"the archive holds a name over 255 bytes: {name[:100]!r}")
    return parts


def _check_member(member: tarfile.TarInfo, root: str, first: bool) -> list[str]:
    """Refuse anything but the layout's regular files and folders, inside ``root``."""
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE) or (
        member.issparse()
    ):
        raise BackupFormatError(
            f"the archive holds {member.name[:100]!r}, which is neither a regular file nor a "
            "folder (links, devices and fifos are refused)"
        )
    parts = _components(member.name)
    is_dir = member.isdir()
    top, depth = parts[0], len(parts)
    if first != (member.name == MANIFEST):
        raise BackupFormatError("the archive does not start with its manifest")
    in_workspace = top == WORKSPACES_DIR and depth >= 2 and is_workspace_name(parts[1])
    allowed = (
        (top in (MANIFEST, DATABASE, AUDIT_KEY) and depth == 1 and not is_dir)
        or (top in (AUDIT_DIR, WORKSPACES_DIR) and depth == 1 and is_dir)
        or (top == AUDIT_DIR and depth == 2 and not is_dir and _AUDIT_FILE_RE.fullmatch(parts[1]))
        or (in_workspace and (depth > 2 or is_dir))
    )
    if not allowed:
        raise BackupFormatError(f"the archive holds an unexpected entry {member.name[:100]!r}")
    if member.size < 0 or (is_dir and member.size):
        raise BackupFormatError(f"the archive entry {member.name[:100]!r} has a bad size")
    # Lexical: the names are plain (checked above) and no link is ever made below ``root``.
    target = os.path.normpath(os.path.join(root, *parts))
    if os.path.commonpath([root, target]) != root or target == root:
        raise BackupFormatError(f"the archive entry {member.name[:100]!r} leaves its folder")
    return parts


def extract_archive(
    plain: Readable,
    dest: Path,
    max_bytes: int,
    progress: Progress | None = None,
    owner: Owner = None,
) -> Extracted:
    """Unpack the authenticated plaintext ``plain`` into the empty folder ``dest``; raises
    BackupFormatError on anything unexpected (``dest`` is then left, complete or not, for the
    caller to remove: nothing is written to it any more). Reads ``plain`` to its end, so every
    chunk, the final one included, is checked. Files inside a workspace are given to ``owner``
    (uid, gid) when set. Nothing is synced: the caller syncs the file system."""
    out = Extracted()
    root = os.path.realpath(dest)
    zreader = zstandard.ZstdDecompressor().stream_reader(
        cast(IO[bytes], plain), read_size=IO_BYTES, read_across_frames=False, closefd=False
    )
    stream = _Forward(zreader)
    pool = AlignedPool(_POOL_BUFFERS, _BLOCK_BYTES)
    maker = FileMaker(pool)
    try:
        with tarfile.TarFile(fileobj=cast(IO[bytes], stream), mode="r") as tar:
            for member in tar:
                parts = _check_member(member, root, first=not out.manifest)
                out.total_bytes += member.size
                if out.total_bytes > max_bytes:
                    raise BackupFormatError(
                        f"the backup unpacks to more than the {max_bytes >> 20} MiB this data "
                        "folder's disk can take (keeping NOX_DISK_FREE_MIN_MIB free)"
                    )
                if member.name == MANIFEST:
                    out.manifest = _read_manifest(stream, member)
                    continue
                inside = owner if parts[0] == WORKSPACES_DIR and len(parts) > 2 else None
                _unpack_member(stream, member, os.path.join(root, *parts), inside, maker)
                out.count(parts, member)
                if progress is not None and member.size:
                    progress(member.size)
            stream.drain()
        while plain.read(IO_BYTES):  # up to the final chunk: a cut tail shows here
            pass
        maker.finish()
    except (tarfile.TarError, zstandard.ZstdError, EOFError, UnicodeError) as exc:
        raise BackupFormatError(f"the archive inside the backup is damaged: {exc}") from None
    finally:
        maker.stop()
        pool.close()
    if not out.manifest:
        raise BackupFormatError("the backup holds no archive")
    if not out.has_database:
        raise BackupFormatError("the backup holds no database")
    return out


def _unpack_member(
    stream: _Forward,
    member: tarfile.TarInfo,
    path: str,
    owner: Owner,
    maker: FileMaker,
) -> None:
    if member.isdir():
        maker.put(("dir", path, owner))
        return
    stream.seek(member.offset_data)
    mode = _file_mode(member.mode)
    if member.size <= DIRECT_MIN_BYTES:
        data = stream.read(member.size)
        _check_length(len(data), member.size, member.name)
        maker.put(("file", path, member.name, data, mode, member.mtime, owner))
        return
    maker.put(("open", path, member.name))
    pool = maker.pool
    left = member.size
    while left > 0:
        buffer = pool.take()
        try:
            want = min(left, pool.size)
            with memoryview(buffer) as view:
                got = stream.readinto(view[:want])
            _check_length(got, want, member.name)
        except BaseException:
            pool.give(buffer)
            raise
        maker.put(("data", buffer, got))  # the maker gives the buffer back
        left -= got
    maker.put(("close", mode, member.mtime, owner))


def _check_length(got: int, wanted: int, name: str) -> None:
    if got != wanted:
        raise BackupFormatError(f"the archive ends inside {name[:100]!r}")


def _read_manifest(stream: _Forward, member: tarfile.TarInfo) -> dict[str, Any]:
    if member.size > MAX_MANIFEST_BYTES:
        raise BackupFormatError("the backup's manifest is too large")
    stream.seek(member.offset_data)
    data = stream.read(member.size)
    try:
        manifest = json.loads(data)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise BackupFormatError(f"the backup's manifest is not of archive format {ARCHIVE_FORMAT}")
    return manifest


def prepare_database(staged: Path) -> tuple[int, int]:
    """Check the unpacked database, bring it to this Nox's schema; its token and run counts."""
    try:
        with contextlib.closing(sqlite3.connect(staged)) as conn:
            check = conn.execute("PRAGMA quick_check").fetchone()
        if not check or check[0] != "ok":
            raise BackupFormatError(f"the backup's database is damaged: {check}")
    except sqlite3.DatabaseError as exc:
        raise BackupFormatError(f"the backup's database is not readable: {exc}") from None
    db = Database(f"sqlite:///{staged}")
    try:
        db.migrate()
    except Exception as exc:
        raise BackupFormatError(
            f"the backup's database cannot be brought to this Nox's schema: {exc}"
        ) from None
    finally:
        db.close()
    try:
        with contextlib.closing(sqlite3.connect(staged)) as conn:
            conn.execute("PRAGMA journal_mode=DELETE")
            tokens = conn.execute("SELECT count(*) FROM tokens").fetchone()[0]
            executions = conn.execute("SELECT count(*) FROM executions").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise BackupFormatError(f"the backup's database is not a Nox database: {exc}") from None
    return int(tokens), int(executions)
