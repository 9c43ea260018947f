"""Walking a workspace's folder tree (listings, searches): never through a link, with a bounded
number of descriptors per walk and a bounded number of walks per server.

:class:`TreeWalk` yields the entries below a folder descriptor in name order, a folder before
its content. Each folder is entered with ``O_NOFOLLOW | O_DIRECTORY`` from its parent's
descriptor. A walk keeps at most :data:`HELD_LEVELS` folders open: going deeper closes the
shallowest open one (the start stays open), and coming back to a closed folder opens it again
by name from its nearest open ancestor, ``O_NOFOLLOW`` on every step, and checks that it is
the same folder (device and inode); a folder moved or replaced meanwhile is left out and the
walk marked :attr:`~TreeWalk.cut`. 256 levels deep, a walk holds 32 descriptors, not 257.

With a ``limit``, a folder's first entries in name order are picked with
:func:`heapq.nsmallest` (the walk never yields more than ``limit`` entries, so no folder needs
more than what is left of it): a folder of a million names is not sorted whole to list ten.

:class:`WalkGate` lets at most ``NOX_FILE_WALKS_MAX`` walks run at once; one more waits
``NOX_FILE_WALKS_WAIT_S`` for a turn, then gets 429 ``rate_limited`` with ``Retry-After: 1``.
"""

from __future__ import annotations

import heapq
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from nox_api.config import Settings
from nox_api.errors import RateLimited
from nox_api.services import files
from nox_api.services.files import DIR_FLAGS, EntryKind

__all__ = ["HELD_LEVELS", "TreeEntry", "TreeWalk", "WalkGate"]

HELD_LEVELS = 32  # folder descriptors one walk keeps open at most


class TreeEntry(NamedTuple):  # a tuple: made once per entry of a walk, it must be cheap
    """One entry met by :class:`TreeWalk`. ``path`` and ``name`` are for showing (a name that
    is not UTF-8 gets U+FFFD in place of its bad bytes); open or stat ``raw`` (the name as the
    file system has it) relative to ``dir_fd``, which is valid while this is the current entry
    of the walk."""

    path: str
    name: str
    kind: EntryKind
    dir_fd: int
    raw: str


@dataclass
class _Level:
    """A folder of the walk's current path: its descriptor while held open (else None), its
    names from the start (raw, to open it again), its identity, what is left of its entries."""

    fd: int | None
    raws: list[str]
    shown: list[str]
    ident: tuple[int, int]
    entries: Iterator[tuple[str, EntryKind]]


class TreeWalk:
    """The entries below a folder descriptor, sorted by name, folders before their content,
    never following a link. Other kinds (FIFOs, sockets) are left out. Folders deeper than
    ``max_depth`` below the start are not entered and set :attr:`cut`, as does a folder that
    changed while the walk was inside it; at most ``limit`` entries are yielded."""

    def __init__(
        self,
        fd: int,
        above: Sequence[str],
        *,
        recursive: bool,
        max_depth: int | None = None,
        limit: int | None = None,
    ) -> None:
        self._fd = fd
        self._above = list(above)
        self._recursive = recursive
        self._max_depth = files.MAX_DEPTH if max_depth is None else max_depth
        self._limit = limit
        self.cut = False

    def __iter__(self) -> Iterator[TreeEntry]:
        left = self._limit
        first = os.dup(self._fd)
        try:
            entries = iter(_first_entries(first, left))
            stack = [_Level(first, [], self._above, _ident(first), entries)]
        except BaseException:
            os.close(first)
            raise
        try:
            while stack and left != 0:
                level = stack[-1]
                fd = level.fd if level.fd is not None else self._reopen(stack)
                if fd is None:
                    stack.pop()
                    continue
                nxt = next(level.entries, None)
                if nxt is None:
                    os.close(fd)
                    stack.pop()
                    continue
                raw, kind = nxt
                name = _printable(raw)
                shown = [*level.shown, name]
                yield TreeEntry("/".join(shown), name, kind, fd, raw)
                left = None if left is None else left - 1
                if kind != "dir" or not self._recursive or left == 0:
                    continue
                if len(stack) > self._max_depth:
                    self.cut = True
                    continue
                self._enter(stack, fd, raw, shown, left)
        finally:
            _close(stack)

    def _enter(
        self, stack: list[_Level], fd: int, raw: str, shown: list[str], left: int | None
    ) -> None:
        """Open the folder ``raw`` of the top level and put it on the stack (gone or no longer
        a folder: skipped)."""
        child = _open(fd, raw)
        if child is None:
            return
        try:
            entries = iter(_first_entries(child, left))
            level = _Level(child, [*stack[-1].raws, raw], shown, _ident(child), entries)
        except OSError:
            os.close(child)
            return
        stack.append(level)
        held = [lv for lv in stack[1:-1] if lv.fd is not None]
        if len(held) + 2 > HELD_LEVELS:  # the start and the new one stay open
            _close([held[0]])

    def _reopen(self, stack: list[_Level]) -> int | None:
        """Open the top level's folder again from its nearest open ancestor; None (and the walk
        marked cut) when it is gone, no longer a folder, or another folder now."""
        level = stack[-1]
        base, fd = _open_ancestor(stack)
        for raw in level.raws[len(base.raws) :]:
            nxt = _open(fd, raw)
            os.close(fd)
            if nxt is None:
                self.cut = True
                return None
            fd = nxt
        if _ident(fd) != level.ident:
            os.close(fd)
            self.cut = True
            return None
        level.fd = fd
        return fd


class WalkGate:
    """At most ``max_walks`` walks at once; :meth:`turn` waits ``wait_s`` for one, then
    raises :class:`~nox_api.errors.RateLimited` (429, ``Retry-After: 1``)."""

    def __init__(self, max_walks: int, wait_s: float) -> None:
        self.max_walks = max_walks
        self.wait_s = wait_s
        self._slots = threading.BoundedSemaphore(max_walks)

    @classmethod
    def from_settings(cls, settings: Settings) -> WalkGate:
        return cls(settings.file_walks_max, settings.file_walks_wait_s)

    @contextmanager
    def turn(self) -> Iterator[None]:
        if not self._slots.acquire(timeout=self.wait_s):
            raise RateLimited(
                f"{self.max_walks} recursive listings and file searches are running on this "
                f"server (NOX_FILE_WALKS_MAX); none ended within {self.wait_s:g} s: try again "
                "in a moment",
                headers={"Retry-After": "1"},
            )
        try:
            yield
        finally:
            self._slots.release()


def _open_ancestor(stack: list[_Level]) -> tuple[_Level, int]:
    """The deepest level still open (the start always is) and a new descriptor of it."""
    for level in reversed(stack):
        if level.fd is not None:
            return level, os.dup(level.fd)
    raise RuntimeError("a walk keeps its start open")


def _close(stack: list[_Level]) -> None:
    for level in stack:
        if level.fd is not None:
            os.close(level.fd)
            level.fd = None


def _ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _printable(name: str) -> str:
    """``name`` as valid UTF-8 text: bytes that were not UTF-8 (kept by the file system
    encoding as lone surrogates) become U+FFFD."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return name


def _first_entries(fd: int, limit: int | None) -> list[tuple[str, EntryKind]]:
    """The folder's entries (name, kind) in name order, only the first ``limit`` of them."""
    with os.scandir(fd) as it:
        named = _named(it)
        return sorted(named) if limit is None else heapq.nsmallest(limit, named)


def _named(entries: Iterable[os.DirEntry[str]]) -> Iterator[tuple[str, EntryKind]]:
    for entry in entries:
        kind = _kind(entry)
        if kind is not None:
            yield entry.name, kind


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


def _open(dir_fd: int, name: str) -> int | None:
    """The folder ``name`` below ``dir_fd``, or None when it went away or became a link."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
