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
from typing import BinaryIO, Literal, NamedTuple

from nox_api.errors import Conflict, InvalidPath, PayloadTooLarge
from nox_api.services.tokens import validate_workspace_name
from noxsdk.models import FileInfo

__all__ = [
    "CappedWriter",
    "DIR_FLAGS",
    "EntryKind",
    "MAX_DEPTH",
    "MAX_NAME_BYTES",
    "MAX_PATH_CHARS",
    "StagedFile",
    "TreeEntry",
    "TreeWalk",
    "Workspaces",
    "modified_at",
    "remove_tree",
    "split_path",
    "uploaded_info",
]

MAX_PATH_CHARS = 4096
MAX_NAME_BYTES = 255
MAX_DEPTH = 256  # folders below a listed or searched one that walks enter at most
EntryKind = Literal["file", "dir", "symlink"]
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
    def staged_upload(self, max_bytes: int) -> Iterator[CappedWriter]:
        """A writer into a new staging file; the file is deleted unless committed."""
        fd, name = tempfile.mkstemp(prefix="upload-", dir=self.staging)
        writer = CappedWriter(os.fdopen(fd, "wb"), Path(name), max_bytes)
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
            # Stat'ed in the root-only staging folder, before the rename: once in the workspace
            # a run may rename or delete it at once (a stat after would fail the upload).
            st = os.stat(staged.path, follow_symlinks=False)
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
        for _attempt in range(2):
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
        raise InvalidPath(f"{where} could not be created")


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
    """Writes a file of at most ``max_bytes`` (:class:`PayloadTooLarge` past it), hashing it."""

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

    def sync(self) -> str:
        """Flush and fsync what was written; returns its SHA-256 (hex)."""
        self.fh.flush()
        os.fsync(self.fh.fileno())
        return self._hash.hexdigest()

    def finish(self) -> StagedFile:
        digest = self.sync()
        self.fh.close()
        return StagedFile(self.path, self.size, digest)


class TreeEntry(NamedTuple):  # a tuple: made once per entry of a walk, it must be cheap
    """One entry met by :class:`TreeWalk`. ``path`` and ``name`` are for showing (a name that
    is not UTF-8 gets U+FFFD in place of its bad bytes); open or stat ``entry.name`` relative to
    ``dir_fd``, which is valid while this is the current entry of the walk."""

    path: str
    name: str
    kind: EntryKind
    dir_fd: int
    entry: os.DirEntry[str]


class TreeWalk:
    """The entries below a folder descriptor, sorted by name, folders before their content,
    never following a link: each folder is entered with ``O_NOFOLLOW`` from its parent's
    descriptor. Other kinds (FIFOs, sockets) are left out. Folders deeper than ``max_depth``
    below the start are not entered and set :attr:`cut`."""

    def __init__(
        self, fd: int, above: Sequence[str], *, recursive: bool, max_depth: int | None = None
    ) -> None:
        self._fd = fd
        self._above = list(above)
        self._recursive = recursive
        self._max_depth = MAX_DEPTH if max_depth is None else max_depth
        self.cut = False

    def __iter__(self) -> Iterator[TreeEntry]:
        first = os.dup(self._fd)
        stack: list[tuple[int, list[str], Iterator[os.DirEntry[str]]]] = []
        try:
            stack.append((first, self._above, iter(_sorted_entries(first))))
        except BaseException:
            os.close(first)
            raise
        try:
            while stack:
                dir_fd, above, entries = stack[-1]
                entry = next(entries, None)
                if entry is None:
                    os.close(dir_fd)
                    stack.pop()
                    continue
                kind = _kind(entry)
                if kind is None:
                    continue
                name = _printable(entry.name)
                parts = [*above, name]
                yield TreeEntry("/".join(parts), name, kind, dir_fd, entry)
                if kind != "dir" or not self._recursive:
                    continue
                if len(stack) > self._max_depth:
                    self.cut = True
                    continue
                child = _open_child(dir_fd, entry.name)
                if child is not None:
                    try:
                        stack.append((child, parts, iter(_sorted_entries(child))))
                    except OSError:
                        os.close(child)
        finally:
            for dir_fd, _above, _entries in stack:
                os.close(dir_fd)


def _printable(name: str) -> str:
    """``name`` as valid UTF-8 text: bytes that were not UTF-8 (kept by the file system
    encoding as lone surrogates) become U+FFFD."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return name


def _sorted_entries(fd: int) -> list[os.DirEntry[str]]:
    with os.scandir(fd) as it:
        return sorted(it, key=lambda e: e.name)


def _kind(entry: os.DirEntry[str]) -> EntryKind | None:
    try:
        if entry.is_symlink():
            return "symlink"
        if entry.is_dir(follow_symlinks=False):
            return "dir"
        if entry.is_file(follow_symlinks=False):
            return "file"
    except OSError:  # gone meanwhile
        pass
    return None


def _open_child(dir_fd: int, name: str) -> int | None:
    """The folder ``name`` below ``dir_fd``, or None when it went away or became a link."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
