"""Workspaces on disk and the one path resolver every file operation goes through.

A workspace is a folder ``<data>/workspaces/<name>`` bound at ``/workspace`` in its sandboxes.
Sandboxed code can create anything in it, symbolic links included, so the server never resolves a
user path with ``realpath`` and then opens it (a race lets code swap a folder for a link in
between). Instead it walks the path one component at a time from a descriptor of the workspace,
with ``O_NOFOLLOW`` on every step: a link anywhere in the path is refused, whatever it points at.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from nox_api.errors import Conflict, InvalidPath, PayloadTooLarge
from nox_api.services.tokens import validate_workspace_name
from noxsdk.models import FileInfo

__all__ = ["StagedFile", "Workspaces", "split_path"]

MAX_PATH_CHARS = 4096
MAX_NAME_BYTES = 255
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def split_path(rel: str) -> list[str]:
    """Check a workspace-relative path and return its components.

    Refused with ``invalid_path``: empty paths, absolute paths, NUL bytes, names over 255 bytes,
    paths over 4096 characters, and ``..`` that would climb above the workspace. ``a/../b`` is
    ``b``; ``.`` and empty components are dropped.
    """
    if not rel or not rel.strip():
        raise InvalidPath("the path is empty")
    if len(rel) > MAX_PATH_CHARS:
        raise InvalidPath(f"the path is longer than {MAX_PATH_CHARS} characters")
    if "\x00" in rel:
        raise InvalidPath("the path contains a NUL byte")
    if rel.startswith("/"):
        raise InvalidPath(
            f"absolute paths are not allowed: {rel[:200]!r}; give a path relative to the workspace"
        )
    parts: list[str] = []
    for part in rel.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise InvalidPath(f"the path {rel[:200]!r} leaves the workspace")
            parts.pop()
            continue
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise InvalidPath(f"a name in the path is longer than {MAX_NAME_BYTES} bytes")
        parts.append(part)
    if not parts:
        raise InvalidPath(f"the path {rel[:200]!r} names the workspace itself")
    return parts


@dataclass
class StagedFile:
    """An upload written to the staging folder, not yet visible in any workspace."""

    path: Path
    size: int
    sha256: str


class Workspaces:
    def __init__(
        self,
        root: Path,
        staging: Path,
        prepare: Callable[[Path], None],
        owner: tuple[int, int] | None,
    ) -> None:
        self.root = root
        self.staging = staging
        self._prepare = prepare
        self._owner = owner  # (uid, gid) files must belong to, so sandboxes can change them

    def setup(self) -> None:
        """Create the folders. Other users may cross them (sandboxes must reach their
        workspace) but not list them."""
        for folder in (self.root, self.staging):
            folder.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)
        self.staging.chmod(0o700)
        self.root.parent.chmod(self.root.parent.stat().st_mode | 0o111)
        for leftover in self.staging.iterdir():  # uploads cut off by a crash
            with contextlib.suppress(OSError):
                leftover.unlink()

    def path(self, name: str) -> Path:
        """The folder of workspace ``name``, created on first use. Its owner and mode are set
        again on every use (two system calls), so no run can leave it unusable for the next."""
        validate_workspace_name(name)
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        self._prepare(folder)
        return folder

    # -- uploads -----------------------------------------------------------------------------
    @contextmanager
    def staged_upload(self, max_bytes: int) -> Iterator[_StagingWriter]:
        """A writer into a new staging file; the file is deleted unless committed."""
        fd, name = tempfile.mkstemp(prefix="upload-", dir=self.staging)
        writer = _StagingWriter(os.fdopen(fd, "wb"), Path(name), max_bytes)
        try:
            yield writer
        finally:
            writer.fh.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

    def commit(self, workspace: str, rel: str, staged: StagedFile) -> FileInfo:
        """Move a staged upload to ``rel`` in the workspace, creating parent folders; atomic."""
        parts = split_path(rel)
        base = self.path(workspace)
        dir_fd = self._open_dir(base, parts[:-1], create=True)
        try:
            if self._owner is not None:
                os.chown(staged.path, *self._owner)
            os.chmod(staged.path, 0o644)
            try:
                existing = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                existing = None
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                raise Conflict(
                    f"{'/'.join(parts)} is a folder; delete it first or choose another path"
                )
            os.rename(staged.path, parts[-1], dst_dir_fd=dir_fd)
            st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.close(dir_fd)
        return FileInfo(
            path="/".join(parts),
            name=parts[-1],
            type="file",
            size=st.st_size,
            modified=datetime.fromtimestamp(st.st_mtime, UTC),
            sha256=staged.sha256,
        )

    def _open_dir(self, base: Path, parts: list[str], create: bool) -> int:
        """A descriptor of ``base/parts...``, never following a link on the way."""
        fd = os.open(base, _DIR_FLAGS)
        try:
            for i, part in enumerate(parts):
                nxt = self._step(fd, part, create, "/".join(parts[: i + 1]))
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _step(self, fd: int, part: str, create: bool, where: str) -> int:
        for _attempt in range(2):
            try:
                return os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):  # made meanwhile: open it next turn
                    os.mkdir(part, 0o755, dir_fd=fd)
                    if self._owner is not None:
                        os.chown(part, *self._owner, dir_fd=fd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise InvalidPath(
                        f"{where} is a file or a symbolic link, not a folder"
                    ) from None
                raise
        raise InvalidPath(f"{where} could not be created")


class _StagingWriter:
    def __init__(self, fh: BinaryIO, path: Path, max_bytes: int) -> None:
        self.fh = fh
        self.path = path
        self.max_bytes = max_bytes
        self.size = 0
        self._hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise PayloadTooLarge(f"the file is larger than the limit of {self.max_bytes} bytes")
        self._hash.update(data)
        self.fh.write(data)

    def finish(self) -> StagedFile:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        return StagedFile(self.path, self.size, self._hash.hexdigest())
