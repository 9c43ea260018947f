"""Reading streamed answers: a download's destination, and the events of the log stream."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import httpx2

from noxsdk._upload import Progress
from noxsdk.errors import NoxConnectionError

__all__ = ["Destination", "Sink", "content_length", "log_line"]

log = logging.getLogger("noxsdk")

Destination = os.PathLike[str] | BinaryIO
"""Where a download goes: a path (``pathlib.Path``) or a file object opened for binary
writing."""


def content_length(response: httpx2.Response) -> int | None:
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


class Sink:
    """Writes a download to ``dest``. A path is written to a temporary file beside it, renamed
    into place only once every byte came, and removed when the download fails: a failed
    download never leaves a partial file under the path's name."""

    def __init__(self, dest: Destination, total: int | None, progress: Progress | None) -> None:
        self.total = total
        self.done = 0
        self._progress = progress
        self._path: Path | None = None
        self._part: Path | None = None
        probe: object = dest  # a guard for callers without a type checker
        if isinstance(probe, str):
            raise TypeError("a download goes to a pathlib.Path or a binary file object, not a str")
        if isinstance(dest, os.PathLike):
            self._path = Path(dest)
            fd, part = tempfile.mkstemp(
                dir=self._path.parent, prefix=f".{self._path.name}.", suffix=".part"
            )
            self._part = Path(part)
            self._file: BinaryIO = os.fdopen(fd, "wb")
        else:
            self._file = dest
        self._report()

    def __enter__(self) -> Sink:
        return self

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self.done += len(chunk)
        self._report()

    def _report(self) -> None:
        if self._progress is not None:
            self._progress(self.done, self.total)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._part is None:  # the caller's file object: the caller closes it
            if exc is None:
                self._check()
            return
        try:
            self._file.close()
            if exc is None:
                self._check()
                assert self._path is not None  # noqa: S101 - set with _part
                os.replace(self._part, self._path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                self._part.unlink()

    def _check(self) -> None:
        if self.total is not None and self.done != self.total:
            raise NoxConnectionError(
                f"the download was cut short: {self.done} of {self.total} bytes arrived"
            )


def log_line(event: httpx2.ServerSentEvent) -> str | None:
    """The server log line an event of ``GET /api/logs/stream`` carries, if any. Lines the
    server dropped because this client read too slowly are logged as a warning."""
    if event.event == "message":
        return event.data
    if event.event == "dropped":
        try:
            dropped = json.loads(event.data).get("dropped")
        except (ValueError, AttributeError):
            dropped = "some"
        log.warning("the server dropped %s log lines: this client read them too slowly", dropped)
    return None
