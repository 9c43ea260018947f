"""Search a workspace: file contents line by line (plain text or a regular expression), or file
names by glob, within a budget of time, bytes read and results.

Regular expressions run on RE2 (``google-re2``), whose matching time grows linearly with the
text, never exponentially: ``(a+)+$`` cannot hang it. Linear can still be slow for a huge
pattern on a huge line (RE2 falls back to a simulation costing about pattern size x line length),
so a pattern's compiled program is capped at :data:`MAX_PROGRAM_SIZE` instructions and a regular
expression sees the first :data:`REGEX_LINE_BYTES` of each line: no single call into RE2 (which
cannot be interrupted) lasts long, and the time budget is checked between them.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import re2

from nox_api.config import Settings
from nox_api.errors import InvalidRequest
from nox_api.services.tree_walk import TreeEntry, TreeWalk
from noxsdk.models import FileMatch, FileSearch, FileSearchResult

__all__ = [
    "MAX_PROGRAM_SIZE",
    "REGEX_LINE_BYTES",
    "SNIFF_BYTES",
    "SearchBudget",
    "TEXT_MAX_CHARS",
    "search_tree",
]

TEXT_MAX_CHARS = 500  # characters of a matching line in the answer
REGEX_LINE_BYTES = 64 * 1024  # bytes of each line a regular expression sees
MAX_PROGRAM_SIZE = 3000  # RE2 program instructions of a pattern at most
SNIFF_BYTES = 8192  # a NUL byte in these first bytes: a binary file, not searched
_TEXT_BEFORE = 100  # characters kept before the match when a long line is cut
_CHECK_BYTES = 4096  # bytes of lines (each counted at least _LINE_COST) between clock looks
_LINE_COST = 64
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

# (content) -> (line number from 1, the line, byte offset of the match in it)
Finder = Callable[[bytes, float], Iterator[tuple[int, bytes, int]]]


@dataclass(frozen=True, slots=True)
class SearchBudget:
    """What one search may spend: seconds, bytes read over all files, bytes of one file."""

    timeout_s: float
    max_bytes: int
    file_max_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> SearchBudget:
        return cls(
            settings.search_timeout_s, settings.search_max_bytes, settings.search_file_max_bytes
        )


class _Stop(Exception):
    """The time or byte budget is spent."""


def search_tree(root_fd: int | None, request: FileSearch, budget: SearchBudget) -> FileSearchResult:
    """Search the workspace below ``root_fd`` (None: a workspace never used, nothing to find),
    sorted by path; ``truncated`` when it stopped before the end (``max_results`` reached,
    time or bytes spent, a folder too deep)."""
    finder = _finder(request)
    wanted = _name_filter(request.glob)
    if root_fd is None:
        return FileSearchResult(matches=[], truncated=False)
    deadline = time.monotonic() + budget.timeout_s
    limit = request.max_results
    matches: list[FileMatch] = []
    bytes_left = budget.max_bytes
    walk = TreeWalk(root_fd, [], recursive=True)
    stopped = False
    try:
        for item in walk:
            if time.monotonic() > deadline:
                raise _Stop
            if item.kind != "file" or (wanted is not None and not wanted(item)):
                continue
            if finder is None:
                matches.append(FileMatch(path=item.path))
            else:
                content, spent = _read(item, budget.file_max_bytes, bytes_left)
                bytes_left -= spent
                if not content:  # skipped, or empty: no line to match
                    continue
                for number, line, offset in finder(content, deadline):
                    matches.append(FileMatch(path=item.path, line=number, text=_text(line, offset)))
                    if len(matches) > limit:
                        break
            if len(matches) > limit:
                break
    except _Stop:
        stopped = True
    truncated = stopped or walk.cut or len(matches) > limit
    return FileSearchResult(matches=matches[:limit], truncated=truncated)


# -- what matches --------------------------------------------------------------------------------
def _finder(request: FileSearch) -> Finder | None:
    if not request.query:
        if request.glob is None:
            raise InvalidRequest("give a query, a glob, or both")
        return None  # names only
    if request.regex:
        return _regex(_compile(request.query))
    if "\n" in request.query or "\r" in request.query:
        raise InvalidRequest("the query cannot hold a line break: files are searched line by line")
    return _plain(_utf8(request.query, "query"))


def _utf8(text: str, field: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"the {field} is not valid Unicode text") from None


def _compile(pattern: str) -> re2._Regexp:
    options = re2.Options()
    options.log_errors = False
    try:
        compiled = re2.compile(_utf8(pattern, "regular expression"), options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise InvalidRequest(f"invalid regular expression: {reason}") from None
    size = max(compiled.programsize, compiled.reverseprogramsize)
    if size > MAX_PROGRAM_SIZE:
        raise InvalidRequest(
            f"the regular expression is too complex ({size} RE2 instructions, at most "
            f"{MAX_PROGRAM_SIZE}); use smaller repetition counts"
        )
    return compiled


def _plain(needle: bytes) -> Finder:
    def find(content: bytes, deadline: float) -> Iterator[tuple[int, bytes, int]]:
        end_all = len(content)
        number, counted = 1, 0
        pos = content.find(needle)
        while pos != -1:
            number += content.count(b"\n", counted, pos)
            counted = pos
            start = content.rfind(b"\n", 0, pos) + 1
            end = content.find(b"\n", pos)
            if end == -1:
                end = end_all
            yield number, content[start:end], pos - start  # one match per line
            pos = content.find(needle, end + 1) if end < end_all else -1

    return find


def _lines(content: bytes) -> Iterator[bytes]:
    """The lines of ``content`` one at a time (no line after a last line break): a list of
    them all would cost several times the file in memory for short lines."""
    start, end_all = 0, len(content)
    while start < end_all:
        end = content.find(b"\n", start)
        if end == -1:
            end = end_all
        yield content[start:end]
        start = end + 1


def _regex(compiled: re2._Regexp) -> Finder:
    def find(content: bytes, deadline: float) -> Iterator[tuple[int, bytes, int]]:
        unchecked = 0  # bytes matched since the last look at the clock
        for index, line in enumerate(_lines(content)):
            if line.endswith(b"\r"):  # a CRLF file: "$" still ends the line
                line = line[:-1]  # noqa: PLW2901
            found = compiled.search(line[:REGEX_LINE_BYTES])
            if found is not None:
                yield index + 1, line, found.start()
            unchecked += len(line) + _LINE_COST
            if unchecked >= _CHECK_BYTES:
                unchecked = 0
                if time.monotonic() > deadline:
                    raise _Stop

    return find


def _name_filter(pattern: str | None) -> Callable[[TreeEntry], bool] | None:
    """A glob without ``/`` is matched against the name, one with ``/`` against the path from
    the workspace; fnmatch rules, case-sensitive, so ``*`` and ``?`` may cross folders there."""
    if pattern is None:
        return None
    compiled = re.compile(fnmatch.translate(pattern))
    if "/" in pattern:
        return lambda item: compiled.match(item.path) is not None
    return lambda item: compiled.match(item.name) is not None


# -- reading -------------------------------------------------------------------------------------
def _read(item: TreeEntry, file_max: int, bytes_left: int) -> tuple[bytes | None, int]:
    """The content of a regular file met by the walk (never through a link) and the bytes read;
    None for a file to skip: gone, not regular, over ``file_max``, or binary (a NUL byte in its
    first :data:`SNIFF_BYTES`, the only part then read). Raises :class:`_Stop` when the file
    does not fit in what the byte budget has left."""
    try:
        fd = os.open(item.raw, _READ_FLAGS, dir_fd=item.dir_fd)
    except OSError:
        return None, 0
    chunks: list[bytes] = []
    spent = 0
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > file_max:
            return None, 0
        if st.st_size > bytes_left:
            raise _Stop
        os.set_blocking(fd, True)
        want = st.st_size  # not past the size stat'ed: a growing file does not break the budget
        while want > 0:
            chunk = os.read(fd, min(want, SNIFF_BYTES) if not chunks else want)
            if not chunk:
                break
            spent += len(chunk)
            if not chunks and b"\0" in chunk:
                return None, spent  # binary
            chunks.append(chunk)
            want -= len(chunk)
        return b"".join(chunks), spent
    except OSError:
        return None, spent
    finally:
        os.close(fd)


def _text(line: bytes, offset: int) -> str:
    """The line for the answer: whole when short, else a window starting a little before the
    match, at most :data:`TEXT_MAX_CHARS` characters."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if len(line) <= TEXT_MAX_CHARS:
        return line.decode("utf-8", "replace")
    start = max(0, offset - _TEXT_BEFORE)
    while start > 0 and line[start] & 0xC0 == 0x80:  # not inside a UTF-8 sequence
        start -= 1
    window = line[start : start + TEXT_MAX_CHARS * 4].decode("utf-8", "replace")
    return window[:TEXT_MAX_CHARS]
