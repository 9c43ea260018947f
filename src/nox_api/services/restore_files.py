"""Creating a restore's folders and files, in order, in a thread of its own
(:func:`~nox_api.services.backup_unpack.extract_archive` feeds it), and where the unpacked tree
goes on the disk (:func:`spread_below`).

Small files are written through the page cache in one ``write`` each; files over
:data:`DIRECT_MIN_BYTES` past it, from the aligned buffers the unpacking thread decompressed
them into (:mod:`.direct_io`). Every file is created anew (``O_EXCL | O_NOFOLLOW``); folders are
made once each (a set remembers them: no ``makedirs`` per file). Nothing is synced here: the
restore syncs the file system once, before its swap.
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import sys
import threading
from pathlib import Path
from typing import Any

from nox_api.services.backup_format import BackupFormatError
from nox_api.services.direct_io import AlignedPool, DirectFile, open_new

__all__ = ["DIRECT_MIN_BYTES", "FileMaker", "spread_below"]

DIRECT_MIN_BYTES = 1 << 20  # larger files are written past the page cache
_QUEUE_ITEMS = 32  # each at most DIRECT_MIN_BYTES of a small file, or one aligned buffer
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# linux/fs.h, on x86-64 and arm64 (elsewhere the calls fail and nothing is hinted)
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000

Owner = tuple[int, int] | None


def spread_below(folder: Path) -> None:
    """Mark ``folder`` as the top of unrelated folder trees for the ext2/3/4 inode allocator
    (``chattr +T``): a folder made in it goes to a block group with room chosen from a hash of
    its name (give it a random one), not next to its parent, and what is made below that
    folder follows it. Without a journal ext4 skips the inodes deleted in the last minutes,
    one check each, when it makes a file: after a mass deletion (the previous restore's old
    state, a cleaned workspace, a test run) every new file near it cost 0.25-0.9 ms of kernel
    time here instead of 30 us (16,000 files: 0.45 s in a fresh place, 3.5-12 s in one
    emptied just before). Other file systems refuse the call: nothing to do then."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        raw = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(8))
        flags = int.from_bytes(raw[:4], sys.byteorder) | _FS_TOPDIR_FL
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags.to_bytes(4, sys.byteorder) + bytes(4))
    except OSError:
        pass
    finally:
        os.close(fd)


class FileMaker:
    """Creates folders and files, in order, in a thread of its own. An error there stops it;
    :meth:`put` and :meth:`finish` raise it in the caller's thread. :meth:`stop` always ends the
    thread (after whatever it was writing), so nothing is written once the caller moves on.
    Every aligned buffer it is handed goes back to ``pool``, written or not."""

    def __init__(self, pool: AlignedPool) -> None:
        self.pool = pool
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=_QUEUE_ITEMS)
        self._error: BaseException | None = None
        self._file: DirectFile | None = None
        self._folders: set[str] = set()  # made (or met) already: no makedirs per file
        self._thread = threading.Thread(target=self._run, name="nox-restore-files", daemon=True)
        self._thread.start()

    def put(self, item: tuple[Any, ...]) -> None:
        if self._error is not None:
            self._give_back(item)
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

    def _give_back(self, item: tuple[Any, ...]) -> None:
        if item[0] == "data":
            self.pool.give(item[1])

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self._error is None:  # else drain: the caller finds it at its next put
                    self._do_or_keep_error(item)
            finally:
                self._give_back(item)
        self._close()

    def _do_or_keep_error(self, item: tuple[Any, ...]) -> None:
        try:
            self._do(item)
        except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
            # entries that contradict each other (a file, then a folder of that name)
            self._error = BackupFormatError(f"the archive's entries collide: {exc}")
        except (ValueError, OverflowError) as exc:  # a time or mode no file can have
            self._error = BackupFormatError(f"the archive holds an impossible entry: {exc}")
        except OSError as exc:
            self._error = (
                BackupFormatError(f"the archive holds a path too long here: {exc}")
                if exc.errno == errno.ENAMETOOLONG
                else exc
            )
        except BaseException as exc:
            self._error = exc
        if self._error is not None:
            self._close()

    def _close(self) -> None:
        if self._file is not None:
            os.close(self._file.fd)
            self._file = None

    def _folder(self, path: str) -> None:
        if path not in self._folders:
            os.makedirs(path, mode=0o755, exist_ok=True)
            self._folders.add(path)

    def _do(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "data":
            assert self._file is not None  # noqa: S101 - "open" came first
            self._file.write(item[1], item[2])
        elif kind == "file":
            _, path, name, data, mode, mtime, owner = item
            self._folder(os.path.dirname(path))
            self._file = DirectFile(_create(path, name), direct=False)
            _write_all(self._file.fd, data)
            self._finish_file(mode, mtime, owner)
        elif kind == "dir":
            _, path, owner = item
            self._folder(path)
            if owner is not None:
                os.chown(path, *owner, follow_symlinks=False)
        elif kind == "open":
            _, path, name = item
            self._folder(os.path.dirname(path))
            try:
                fd, direct = open_new(path, 0o600)
            except FileExistsError:
                raise BackupFormatError(f"the archive holds {name[:100]!r} twice") from None
            self._file = DirectFile(fd, direct)
        else:
            _, mode, mtime, owner = item
            assert self._file is not None  # noqa: S101
            self._file.finish()
            self._finish_file(mode, mtime, owner)

    def _finish_file(self, mode: int, mtime: float, owner: Owner) -> None:
        assert self._file is not None  # noqa: S101
        fd = self._file.fd
        os.fchmod(fd, mode)
        os.utime(fd, (mtime, mtime))
        if owner is not None:
            os.fchown(fd, *owner)
        self._close()


def _create(path: str, name: str) -> int:
    """A new file (never through a link, never over an existing entry)."""
    try:
        return os.open(path, _CREATE, 0o600)
    except FileExistsError:
        raise BackupFormatError(f"the archive holds {name[:100]!r} twice") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
