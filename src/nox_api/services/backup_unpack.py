"""Reading a backup's tar stream back (its layout: :mod:`nox_api.services.backup_archive`), and
getting its database ready to go live (:func:`prepare_database`).

:func:`extract_archive` accepts only the layout's names, only regular files and folders, every
path plain, relative and inside the destination (its own check, then tarfile's ``data``
filter), each file created anew (``O_EXCL | O_NOFOLLOW``), and at most ``max_bytes`` in total;
anything else raises :class:`~nox_api.services.backup_format.BackupFormatError`.

Creating files is most of a restore's time on a slow file system, so a thread of its own does
it (:class:`_FileMaker`), fed through a bounded queue (at most ``_QUEUE_ITEMS`` MiB in flight)
while this thread decrypts, decompresses and parses.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import re
import sqlite3
import tarfile
import threading
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
from nox_api.services.tokens import is_workspace_name
from nox_api.storage.db import Database

__all__ = ["Extracted", "Readable", "extract_archive", "prepare_database"]

MAX_MANIFEST_BYTES = 64 * 1024
MAX_NAME_BYTES = 255
MAX_PATH_CHARS = 4096
_QUEUE_ITEMS = 32  # each at most IO_BYTES of file data
_AUDIT_FILE_RE = re.compile(r"audit(?:-\d{6,})?\.jsonl")
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

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
    (uid, gid) when set."""
    out = Extracted()
    root = os.path.realpath(dest)
    zreader = zstandard.ZstdDecompressor().stream_reader(
        cast(IO[bytes], plain), read_size=IO_BYTES, read_across_frames=False, closefd=False
    )
    maker = _FileMaker()
    try:
        with tarfile.open(fileobj=zreader, mode="r|", bufsize=IO_BYTES) as tar:
            for member in tar:
                parts = _check_member(member, root, first=not out.manifest)
                out.total_bytes += member.size
                if out.total_bytes > max_bytes:
                    raise BackupFormatError(
                        f"the backup unpacks to more than the {max_bytes >> 20} MiB this data "
                        "folder's disk can take (keeping NOX_DISK_FREE_MIN_MIB free)"
                    )
                if member.name == MANIFEST:
                    out.manifest = _read_manifest(tar, member)
                    continue
                safe = tarfile.data_filter(member, root)  # tarfile's own rules on top of ours
                inside = owner if parts[0] == WORKSPACES_DIR and len(parts) > 2 else None
                _unpack_member(tar, safe, os.path.join(root, *parts), inside, maker)
                out.count(parts, member)
                if progress is not None and member.size:
                    progress(member.size)
            while zreader.read(IO_BYTES):  # whatever follows the tar's end marker
                pass
        while plain.read(IO_BYTES):  # up to the final chunk: a cut tail shows here
            pass
        maker.finish()
    except (tarfile.TarError, zstandard.ZstdError, EOFError, UnicodeError) as exc:
        raise BackupFormatError(f"the archive inside the backup is damaged: {exc}") from None
    finally:
        maker.stop()
    if not out.manifest:
        raise BackupFormatError("the backup holds no archive")
    if not out.has_database:
        raise BackupFormatError("the backup holds no database")
    return out


def _unpack_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    path: str,
    owner: Owner,
    maker: _FileMaker,
) -> None:
    if member.isdir():
        maker.put(("dir", path, owner))
        return
    source = tar.extractfile(member)
    mode = member.mode if member.mode is not None else 0o600
    if member.size <= IO_BYTES:
        data = source.read(member.size) if source is not None else b""
        _check_length(len(data), member.size, member.name)
        maker.put(("file", path, member.name, data, mode, member.mtime, owner))
        return
    maker.put(("open", path, member.name))
    left = member.size
    while left > 0 and source is not None:
        block = source.read(min(left, IO_BYTES))
        _check_length(len(block), min(left, IO_BYTES), member.name)
        maker.put(("data", block))
        left -= len(block)
    maker.put(("close", mode, member.mtime, owner))


def _check_length(got: int, wanted: int, name: str) -> None:
    if got != wanted:
        raise BackupFormatError(f"the archive ends inside {name[:100]!r}")


class _FileMaker:
    """Creates folders and files, in order, in a thread of its own. An error there stops it;
    :meth:`put` and :meth:`finish` raise it in the caller's thread. :meth:`stop` always ends the
    thread (after whatever it was writing), so nothing is written once the caller moves on."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=_QUEUE_ITEMS)
        self._error: BaseException | None = None
        self._fd: int | None = None
        self._thread = threading.Thread(target=self._run, name="nox-restore-files", daemon=True)
        self._thread.start()

    def put(self, item: tuple[Any, ...]) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(item)

    def finish(self) -> None:
        self.stop()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain: the caller finds the error at its next put
            try:
                self._do(item)
            except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
                # entries that contradict each other (a file, then a folder of that name)
                self._error = BackupFormatError(f"the archive's entries collide: {exc}")
                self._close()
            except (ValueError, OverflowError) as exc:  # a time or mode no file can have
                self._error = BackupFormatError(f"the archive holds an impossible entry: {exc}")
                self._close()
            except OSError as exc:
                self._error = (
                    BackupFormatError(f"the archive holds a path too long here: {exc}")
                    if exc.errno == errno.ENAMETOOLONG
                    else exc
                )
                self._close()
            except BaseException as exc:
                self._error = exc
                self._close()
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _do(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "dir":
            _, path, owner = item
            os.makedirs(path, mode=0o755, exist_ok=True)
            if owner is not None:
                os.chown(path, *owner, follow_symlinks=False)
        elif kind == "file":
            _, path, name, data, mode, mtime, owner = item
            self._fd = _create(path, name)
            _write_all(self._fd, data)
            self._finish_file(mode, mtime, owner)
        elif kind == "open":
            _, path, name = item
            self._fd = _create(path, name)
        elif kind == "data":
            assert self._fd is not None  # noqa: S101 - "open" came first
            _write_all(self._fd, item[1])
        else:
            _, mode, mtime, owner = item
            self._finish_file(mode, mtime, owner)

    def _finish_file(self, mode: int, mtime: float, owner: Owner) -> None:
        fd = self._fd
        assert fd is not None  # noqa: S101
        os.fchmod(fd, mode)
        os.utime(fd, (mtime, mtime))
        if owner is not None:
            os.fchown(fd, *owner)
        self._close()


def _create(path: str, name: str) -> int:
    """A new file (never through a link, never over an existing entry)."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        return os.open(path, _CREATE, 0o600)
    except FileExistsError:
        raise BackupFormatError(f"the archive holds {name[:100]!r} twice") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_manifest(tar: tarfile.TarFile, member: tarfile.TarInfo) -> dict[str, Any]:
    if member.size > MAX_MANIFEST_BYTES:
        raise BackupFormatError("the backup's manifest is too large")
    source = tar.extractfile(member)
    data = source.read() if source is not None else b""
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
