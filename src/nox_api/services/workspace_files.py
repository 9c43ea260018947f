"""The files of a workspace as the HTTP API sees them: list, read, write, delete, search.

Every operation resolves its path with :func:`~nox_api.services.files.split_path` and walks it
with :meth:`Workspaces.descend <nox_api.services.files.Workspaces.descend>` from a descriptor of
the workspace, ``O_NOFOLLOW`` on every step; the last name is then opened, stat'ed, renamed or
removed relative to its folder's descriptor. No symbolic link is ever followed, so neither a link
made by sandboxed code nor a folder swapped for a link meanwhile leads out of the workspace.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from nox_api.errors import Conflict, InvalidPath, InvalidRequest, NotFound, NoxError
from nox_api.services.file_search import SearchBudget, search_tree
from nox_api.services.files import (
    CappedWriter,
    Grow,
    Workspaces,
    modified_at,
    race_error,
    race_errors,
    remove_tree,
    split_path,
    uploaded_info,
)
from nox_api.services.tree_walk import TreeWalk, WalkGate
from noxsdk.models import FileInfo, FileList, FileSearch, FileSearchResult

__all__ = ["FileUpload", "LIST_MAX_ENTRIES", "OpenFile", "UPLOAD_PREFIX", "WorkspaceFiles"]

LIST_MAX_ENTRIES = 100_000  # entries of one listing at most (then "truncated": true)
UPLOAD_PREFIX = ".nox-upload-"
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class OpenFile:
    """A regular file opened for reading; whoever holds it closes ``fd``."""

    fd: int
    path: str
    name: str
    size: int
    modified: datetime


class WorkspaceFiles:
    """The Files API's operations. ``walks`` bounds the recursive listings and searches that
    run at once."""

    def __init__(self, workspaces: Workspaces, budget: SearchBudget, walks: WalkGate) -> None:
        self._ws = workspaces
        self.budget = budget
        self.walks = walks

    # -- list ---------------------------------------------------------------------------------
    def listing(self, workspace: str, rel: str, recursive: bool) -> FileList:
        """The entries of folder ``rel`` ("" or "." for the workspace), or of its whole tree:
        at most :data:`LIST_MAX_ENTRIES`, the first in name order (then ``truncated``)."""
        parts = split_path(rel, root=True)
        path = "/".join(parts)
        if not recursive:
            return self._list(workspace, parts, path, recursive=False)
        with self.walks.turn():
            return self._list(workspace, parts, path, recursive=True)

    def _list(self, workspace: str, parts: list[str], path: str, *, recursive: bool) -> FileList:
        try:
            fd = self._folder(workspace, parts)
        except NotFound:
            if parts:
                raise
            return FileList(path="", entries=[], truncated=False)  # a workspace never used
        entries: list[dict[str, object]] = []  # validated at once below: 3x faster
        cap = LIST_MAX_ENTRIES
        capped = False
        try:
            # one more than the cap: its presence says the listing was cut
            walk = TreeWalk(fd, parts, recursive=recursive, limit=cap + 1)
            with race_errors(path or "the workspace"):
                for item in walk:
                    if len(entries) >= cap:
                        capped = True
                        break
                    try:
                        st = os.stat(item.raw, dir_fd=item.dir_fd, follow_symlinks=False)
                    except OSError:  # removed meanwhile
                        continue
                    entries.append(
                        {
                            "path": item.path,
                            "name": item.name,
                            "type": item.kind,
                            "size": 0 if item.kind == "dir" else st.st_size,
                            "modified": modified_at(st),
                        }
                    )
        finally:
            os.close(fd)
        truncated = capped or walk.cut
        return FileList.model_validate({"path": path, "entries": entries, "truncated": truncated})

    # -- read ---------------------------------------------------------------------------------
    def open(self, workspace: str, rel: str) -> OpenFile:
        """Open the regular file ``rel`` for reading (a link, folder, FIFO... is refused)."""
        parts = split_path(rel)
        path = "/".join(parts)
        dir_fd = self._parent(workspace, parts)
        try:
            fd = os.open(parts[-1], _READ_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            raise NotFound(f"{path} does not exist") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidPath(_link(path)) from None
            if exc.errno == errno.ENXIO:  # a socket
                raise InvalidRequest(f"{path} is not a regular file") from None
            answer = race_error(exc, path)
            if answer is not None:
                raise answer from None
            raise
        finally:
            os.close(dir_fd)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise InvalidRequest(f"{path} is a folder; list it with GET /api/files?path={path}")
            if not stat.S_ISREG(st.st_mode):
                raise InvalidRequest(f"{path} is not a regular file")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return OpenFile(fd, path, parts[-1], st.st_size, modified_at(st))

    # -- write --------------------------------------------------------------------------------
    def replaced_bytes(self, workspace: str, rel: str) -> int:
        """Bytes of the regular file an upload to ``rel`` would replace (0: none there, or
        anything else, which the upload itself then refuses or replaces): the storage quota
        counts them as freed."""
        try:
            parts = split_path(rel)
            dir_fd = self._parent(workspace, parts)
        except (NoxError, OSError):
            return 0
        try:
            st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return 0
        finally:
            os.close(dir_fd)
        return st.st_size if stat.S_ISREG(st.st_mode) else 0

    def upload(
        self, workspace: str, rel: str, max_bytes: int, grow: Grow | None = None
    ) -> FileUpload:
        """Start writing ``rel``: checked now (bad path, a folder in the way), made visible by
        :meth:`FileUpload.commit` only. Use it as a context manager: leaving it uncommitted
        removes the temporary file. ``grow`` is told the size each write would bring the file
        to, before the write (it may refuse: a quota reservation)."""
        parts = split_path(rel)
        with race_errors("/".join(parts), writing=True):
            root = self._ws.open_root(workspace)
            try:
                dir_fd, depth = self._deepest(root, parts[:-1])
            finally:
                os.close(root)
            try:
                if depth == len(parts) - 1:
                    _refuse_folder(dir_fd, parts)
                return FileUpload(self._ws, dir_fd, parts, depth, max_bytes, grow=grow)
            except BaseException:
                os.close(dir_fd)
                raise

    def _deepest(self, root: int, folders: list[str]) -> tuple[int, int]:
        """A descriptor of the deepest of ``folders`` that exists, and how many exist."""
        fd = os.dup(root)
        for depth, name in enumerate(folders):
            try:
                nxt = self._ws.descend(fd, [name], above=folders[:depth])
            except FileNotFoundError:
                return fd, depth
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            fd = nxt
        return fd, len(folders)

    # -- delete -------------------------------------------------------------------------------
    def delete(self, workspace: str, rel: str, recursive: bool) -> tuple[str, str]:
        """Remove ``rel``: a file, a link (the link itself), an empty folder, or with
        ``recursive`` a folder and all below it. Returns its path and what it was ("file",
        "symlink" or "dir")."""
        parts = split_path(rel)
        path, name = "/".join(parts), parts[-1]
        dir_fd = self._parent(workspace, parts)
        try:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise NotFound(f"{path} does not exist") from None
            with race_errors(path):
                return self._delete(dir_fd, name, path, st, recursive)
        finally:
            os.close(dir_fd)

    def _delete(
        self, dir_fd: int, name: str, path: str, st: os.stat_result, recursive: bool
    ) -> tuple[str, str]:
        """Remove what ``st`` described (a run may have changed it since)."""
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dir_fd)
            return path, "symlink" if stat.S_ISLNK(st.st_mode) else "file"
        if not recursive:
            try:
                os.rmdir(name, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise Conflict(
                        f"{path} is a folder that is not empty; delete it with recursive=true"
                    ) from None
                raise
            return path, "dir"
        _remove_tree(dir_fd, name, path)
        return path, "dir"

    # -- search -------------------------------------------------------------------------------
    def search(self, workspace: str, request: FileSearch) -> FileSearchResult:
        try:
            root = self._ws.open_root(workspace, create=False)
        except FileNotFoundError:  # never used: nothing to find (the request is still checked)
            return search_tree(None, request, self.budget)
        try:
            with self.walks.turn():
                return search_tree(root, request, self.budget)
        finally:
            os.close(root)

    # -- resolving ----------------------------------------------------------------------------
    def _folder(self, workspace: str, parts: list[str], missing: str | None = None) -> int:
        """The folder ``parts``, to read in; NotFound names ``missing`` (default: the folder).
        A workspace never used is not made here (reads leave no trace)."""
        name = missing or "/".join(parts) or "the workspace"
        try:
            root = self._ws.open_root(workspace, create=False)
        except FileNotFoundError:
            raise NotFound(f"{name} does not exist") from None
        try:
            return self._ws.descend(root, parts)
        except FileNotFoundError:
            raise NotFound(f"{name} does not exist") from None
        finally:
            os.close(root)

    def _parent(self, workspace: str, parts: list[str]) -> int:
        return self._folder(workspace, parts[:-1], "/".join(parts))


class FileUpload:
    """A file being written: a temporary ``.nox-upload-*`` file in the target's folder (or, when
    the folders of the path do not exist yet, in the deepest one that does), renamed over the
    target by :meth:`commit`. Until then nothing else in the workspace changes."""

    def __init__(
        self,
        workspaces: Workspaces,
        dir_fd: int,
        parts: list[str],
        depth: int,
        max_bytes: int,
        *,
        grow: Grow | None = None,
    ) -> None:
        self._ws = workspaces
        self._dir_fd = dir_fd  # owned: closed by commit or abort
        self._parts = parts
        self._depth = depth  # parts[:depth] exist; parts[depth:-1] are made by commit
        self._temp = f"{UPLOAD_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(self._temp, _TEMP_FLAGS, 0o600, dir_fd=dir_fd)
        self.writer = CappedWriter(os.fdopen(fd, "wb"), Path(self._temp), max_bytes, grow)
        self._done = False

    def __enter__(self) -> FileUpload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def commit(self) -> FileInfo:
        """fsync, give the file to the sandbox user, make the missing folders, rename it over
        the target (a file or a link there is replaced; a folder is 409)."""
        parts, fh = self._parts, self.writer.fh
        digest = self.writer.sync()
        owner = self._ws.owner
        if owner is not None:
            os.fchown(fh.fileno(), *owner)
        os.fchmod(fh.fileno(), 0o644)
        st = os.fstat(fh.fileno())
        fh.close()
        with race_errors("/".join(parts), writing=True):
            target_fd = self._ws.descend(
                self._dir_fd, parts[self._depth : -1], create=True, above=parts[: self._depth]
            )
            try:
                _refuse_folder(target_fd, parts)
                try:
                    os.rename(self._temp, parts[-1], src_dir_fd=self._dir_fd, dst_dir_fd=target_fd)
                except FileNotFoundError:
                    raise Conflict(
                        f"{'/'.join(parts)} changed while it was written (its temporary file "
                        "went away); send it again"
                    ) from None
                self._done = True
            finally:
                os.close(target_fd)
        return uploaded_info(parts, st, digest)

    def abort(self) -> None:
        """Remove the temporary file unless committed; idempotent."""
        self.writer.fh.close()
        if self._dir_fd < 0:
            return
        if not self._done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temp, dir_fd=self._dir_fd)
        os.close(self._dir_fd)
        self._dir_fd = -1


def _refuse_folder(dir_fd: int, parts: list[str]) -> None:
    try:
        st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise Conflict(f"{'/'.join(parts)} is a folder; delete it first or choose another path")


def _remove_tree(dir_fd: int, name: str, path: str) -> None:
    """Remove a folder tree relative to ``dir_fd`` with :func:`files.remove_tree` (a link is
    removed, never followed; a FIFO swapped in for a folder cannot block it)."""
    try:
        remove_tree(dir_fd, name)
    except OSError as exc:
        raise Conflict(f"{path} changed while it was deleted: {exc.strerror or exc}") from None


def _link(path: str) -> str:
    return f"{path} is a symbolic link; links are never followed in file paths"
