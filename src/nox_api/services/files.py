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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Literal

from nox_api.errors import Conflict, InvalidPath, NotFound, NoxError, PayloadTooLarge
from nox_api.services.tokens import validate_workspace_name
from noxsdk.models import FileInfo

__all__ = [
    "CappedWriter",
    "DIR_FLAGS",
    "EntryKind",
    "Grow",
    "MAX_DEPTH",
    "MAX_NAME_BYTES",
    "MAX_PATH_CHARS",
    "StagedFile",
    "Workspaces",
    "modified_at",
    "race_error",
    "race_errors",
    "remove_tree",
    "split_path",
    "uploaded_info",
]

MAX_PATH_CHARS = 4096
MAX_NAME_BYTES = 255
MAX_DEPTH = 256  # folders below a listed, searched or removed one that walks enter at most
EntryKind = Literal["file", "dir", "symlink"]
Grow = Callable[[int], None]  # told an upload's size before each write; raises to refuse
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def split_path(rel: str, *, root: bool = False) -> list[str]:
    """Check a workspace-relative path and return its components.

    Refused with ``invalid_path``: empty paths, absolute paths, NUL bytes, names over 255 bytes,
    paths over 4096 characters, and ``..`` that would climb above the workspace. ``a/../b`` is
    ``b``; ``.`` and empty components are dropped. With ``root`` (listings only) a path naming
    the workspace itself (``""``, ``"."``, ``"a/.."``) is allowed and gives ``[]``.
    """
    if root and rel in ("", "."):
        return []
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
    if not parts and not root:
        raise InvalidPath(f"the path {rel[:200]!r} names the workspace itself")
    return parts


def remove_tree(dir_fd: int, name: str) -> None:
    """Remove ``name`` (relative to ``dir_fd``) and, if it is a folder, all below it, never
    following a link and never blocking: folders are entered with ``O_DIRECTORY |
    O_NOFOLLOW`` from their parent's descriptor, so a folder that sandboxed code swaps for a
    link or a FIFO mid-walk fails to open (``shutil.rmtree`` opens it without ``O_DIRECTORY``:
    a FIFO swapped in blocks it for ever). Everything that is not a folder is unlinked, which
    removes a link itself. No recursion; one descriptor per level, at most ``MAX_DEPTH``
    levels (deeper raises ``OSError``). A missing ``name`` is not an error."""
    try:
        os.unlink(name, dir_fd=dir_fd)
        return
    except FileNotFoundError:
        return
    except IsADirectoryError:
        pass
    top = os.open(name, DIR_FLAGS | os.O_NONBLOCK, dir_fd=dir_fd)
    stack: list[tuple[int, str, list[str]]] = [(top, name, os.listdir(top))]
    try:
        while stack:
            fd, here, left = stack[-1]
            if not left:
                stack.pop()
                os.close(fd)
                os.rmdir(here, dir_fd=stack[-1][0] if stack else dir_fd)
                continue
            entry = left.pop()
            try:
                os.unlink(entry, dir_fd=fd)
                continue
            except FileNotFoundError:
                continue
            except IsADirectoryError:
                pass
            if len(stack) >= MAX_DEPTH:
                raise OSError(errno.ELOOP, f"more than {MAX_DEPTH} folders deep")
            try:
                child = os.open(entry, DIR_FLAGS | os.O_NONBLOCK, dir_fd=fd)
            except FileNotFoundError:
                continue
            try:
                names = os.listdir(child)
            except BaseException:
                os.close(child)
                raise
            stack.append((child, entry, names))
    finally:
        for fd, _here, _left in stack:
            os.close(fd)


_RACES = (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR)


def race_error(exc: OSError, path: str, *, writing: bool = False) -> NoxError | None:
    """The answer to ``exc`` when a run or another request changed ``path`` between a check
    and the act: a file or folder gone is 404 (409 for a write, whose target need not exist:
    a folder of its path went away); one that appeared, became a folder or a file, or got
    content is 409. None for other errors."""
    if isinstance(exc, FileNotFoundError):
        if writing:
            return Conflict(f"a folder of {path} was removed while it was written; send it again")
        return NotFound(f"{path} was removed while this request ran")
    if exc.errno in _RACES:
        return Conflict(f"{path} changed while this request ran ({exc.strerror or exc}); try again")
    return None


@contextmanager
def race_errors(path: str, *, writing: bool = False) -> Iterator[None]:
    """:func:`race_error`'s answer for an error of the block; other errors pass through."""
    try:
        yield
    except OSError as exc:
        answer = race_error(exc, path, writing=writing)
        if answer is None:
            raise
        raise answer from None


def modified_at(st: os.stat_result) -> datetime:
    """A file's modification time; one set out of datetime's range by sandboxed code (``os.utime``
    to the year 40000, which tmpfs keeps) is clamped instead of failing the request."""
    try:
        return datetime.fromtimestamp(st.st_mtime, UTC)
    except (ValueError, OverflowError, OSError):
        return (
            datetime.max.replace(tzinfo=UTC)
            if st.st_mtime > 0
            else datetime.min.replace(tzinfo=UTC)
        )


def uploaded_info(parts: list[str], st: os.stat_result, sha256: str) -> FileInfo:
    """The answer of an upload: the file at ``parts`` as it landed."""
    return FileInfo(
        path="/".join(parts),
        name=parts[-1],
        type="file",
        size=st.st_size,
        modified=modified_at(st),
        sha256=sha256,
    )


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
    def staged_upload(self, max_bytes: int, grow: Grow | None = None) -> Iterator[CappedWriter]:
        """A writer into a new staging file; the file is deleted unless committed."""
        fd, name = tempfile.mkstemp(prefix="upload-", dir=self.staging)
        writer = CappedWriter(os.fdopen(fd, "wb"), Path(name), max_bytes, grow)
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
        if self._owner is not None:
            os.chown(staged.path, *self._owner)
        os.chmod(staged.path, 0o644)
        # Stat'ed in the root-only staging folder, before the rename: once in the workspace
        # a run may rename or delete it at once (a stat after would fail the upload).
        st = os.stat(staged.path, follow_symlinks=False)
        with race_errors("/".join(parts), writing=True):
            dir_fd = self._open_dir(base, parts[:-1], create=True)
            try:
                try:
                    existing = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    existing = None
                if existing is not None and stat.S_ISDIR(existing.st_mode):
                    raise Conflict(
                        f"{'/'.join(parts)} is a folder; delete it first or choose another path"
                    )
                os.rename(staged.path, parts[-1], dst_dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        return uploaded_info(parts, st, staged.sha256)

    # -- the resolver ------------------------------------------------------------------------
    @property
    def owner(self) -> tuple[int, int] | None:
        """(uid, gid) new files and folders must be given, or None to leave them as made."""
        return self._owner

    def open_root(self, workspace: str, *, create: bool = True) -> int:
        """A descriptor of the workspace's folder; the caller closes it. Without ``create`` a
        workspace never used raises :class:`FileNotFoundError` instead of being made (reads
        leave no trace)."""
        if create:
            return os.open(self.path(workspace), DIR_FLAGS)
        return os.open(self.root / validate_workspace_name(workspace), DIR_FLAGS)

    def descend(
        self, fd: int, parts: Sequence[str], *, create: bool = False, above: Sequence[str] = ()
    ) -> int:
        """A new descriptor of the folder ``parts`` below the folder ``fd`` (left open), one
        component at a time with ``O_NOFOLLOW``: a link or a file on the way is ``invalid_path``,
        a missing folder is created with ``create`` or raises :class:`FileNotFoundError`.
        ``above`` is the path of ``fd`` in the workspace (for messages)."""
        cur = os.dup(fd)
        try:
            for i, part in enumerate(parts):
                nxt = self._step(cur, part, create, "/".join([*above, *parts[: i + 1]]))
                os.close(cur)
                cur = nxt
        except BaseException:
            os.close(cur)
            raise
        return cur

    def _open_dir(self, base: Path, parts: list[str], create: bool) -> int:
        """A descriptor of ``base/parts...``, never following a link on the way."""
        fd = os.open(base, DIR_FLAGS)
        try:
            return self.descend(fd, parts, create=create)
        finally:
            os.close(fd)

    def _step(self, fd: int, part: str, create: bool, where: str) -> int:
        for _attempt in range(3):
            try:
                return os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):  # made meanwhile: open it next turn
                    os.mkdir(part, 0o755, dir_fd=fd)
                    if self._owner is not None:
                        os.chown(part, *self._owner, dir_fd=fd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise InvalidPath(_not_a_folder(fd, part, where)) from None
                raise
        # made, then removed again before it could be opened, every time: a run or another
        # request is deleting this tree right now (the same answer as the other races: 409)
        raise Conflict(f"{where} was removed while it was being created; try again")


def _not_a_folder(fd: int, part: str, where: str) -> str:
    """Why ``where`` could not be entered: a link (never followed) or a file."""
    try:
        link = stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode)
    except OSError:
        link = False
    if link:
        return f"{where} is a symbolic link; links are never followed in file paths"
    return f"{where} is a file, not a folder"


class CappedWriter:
    """Writes a file of at most ``max_bytes`` (:class:`PayloadTooLarge` past it), hashing it.
    ``grow``, when given, is told the size each write would bring the file to, before the
    write; it may refuse by raising (a quota reservation, see :mod:`.upload_quota`)."""

    def __init__(self, fh: BinaryIO, path: Path, max_bytes: int, grow: Grow | None = None) -> None:
        self.fh = fh
        self.path = path
        self.max_bytes = max_bytes
        self.size = 0
        self._grow = grow
        self._hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        size = self.size + len(data)
        if size > self.max_bytes:
            raise PayloadTooLarge(f"the file is larger than the limit of {self.max_bytes} bytes")
        if self._grow is not None:
            self._grow(size)
        self.size = size
        self._hash.update(data)
        self.fh.write(data)

    def sync(self) -> str:
        """Flush and fsync what was written; returns its SHA-256 (hex)."""
        self.fh.flush()
        os.fsync(self.fh.fileno())
        return self._hash.hexdigest()

    def finish(self) -> StagedFile:
        digest = self.sync()
        self.fh.close()
        return StagedFile(self.path, self.size, digest)
