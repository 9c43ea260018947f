"""Reading a text file from its end: the newest lines of a log without reading the whole file.
Used by the server log's tail and the audit log's queries."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import BinaryIO

__all__ = ["reverse_lines"]

READ_BLOCK = 64 * 1024
MAX_LINE_BYTES = 16 * 1024 * 1024


def reverse_lines(
    f: BinaryIO, block: int = READ_BLOCK, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[bytes]:
    """Complete lines of ``f``, last first; an unterminated last line (being written) is
    skipped, empty lines too. Reads ``block`` bytes at a time from the end: the cost follows the
    lines wanted, not the file. A line longer than ``max_line_bytes`` ends the reading."""
    pos = f.seek(0, os.SEEK_END)
    buf = b""
    complete = False
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf
        if len(buf) > max_line_bytes and buf.find(b"\n", 0, len(buf) - 1) < 0:
            return
        if not complete:
            cut = buf.rfind(b"\n")
            if cut < 0:
                continue
            buf = buf[: cut + 1]
            complete = True
        lines = buf[:-1].split(b"\n")
        if pos > 0:
            head, lines = lines[0], lines[1:]  # may be the end of a line that starts earlier
            buf = head + b"\n"
        else:
            buf = b""
        for line in reversed(lines):
            if line:
                yield line
