"""Request bodies streamed from bytes, a file path or a binary file object.

A path or file object is read a chunk at a time while the request is sent, never whole into
memory. The body can be sent again (a retry) when it is bytes, a path, or a seekable file
object (rewound to where it stood); another file object is sent once, and its call is then
not retried.
"""

from __future__ import annotations

import io
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from noxsdk.errors import InvalidRequestError

__all__ = ["CHUNK_BYTES", "MultipartUpload", "Progress", "Source", "Upload"]

CHUNK_BYTES = 256 * 1024

Source = bytes | bytearray | memoryview | os.PathLike[str] | BinaryIO
"""What an upload reads: the bytes themselves, a path (``pathlib.Path``), or a file object
opened in binary mode. A plain ``str`` is refused: content or path would be a guess."""

Progress = Callable[[int, int | None], None]
"""Called with (bytes done, bytes in all or None when unknown) as a transfer goes on."""


class Upload:
    """A body of ``size`` bytes (None: unknown, sent chunked)."""

    content_type = "application/octet-stream"

    def __init__(self, source: Source, progress: Progress | None = None) -> None:
        self._progress = progress
        self._data: memoryview | None = None
        self._path: Path | None = None
        self._file: BinaryIO | None = None
        self._start = 0
        self._consumed = False
        self.name: str | None = None
        self.size: int | None
        self.replayable = True
        probe: object = source  # guards for callers without a type checker
        if isinstance(probe, str):
            raise TypeError(
                "an upload takes bytes, a pathlib.Path or a binary file object, not a str: "
                "use text.encode() for content or Path(name) for a file"
            )
        if isinstance(probe, io.TextIOBase):
            raise TypeError("open the file in binary mode ('rb') to upload it")
        if isinstance(source, bytes | bytearray | memoryview):
            self._data = memoryview(source).cast("B")
            self.size = len(self._data)
        elif isinstance(source, os.PathLike):
            self._path = Path(source)
            self.name = self._path.name
            self.size = self._path.stat().st_size
        elif callable(getattr(source, "read", None)):
            self._file = source
            name = getattr(source, "name", None)
            self.name = os.path.basename(name) if isinstance(name, str) else None
            self.size, self.replayable = self._measure(source)
        else:
            raise TypeError(f"cannot upload a {type(source).__name__}")

    def _measure(self, file: BinaryIO) -> tuple[int | None, bool]:
        """The bytes left in ``file`` and whether it can be rewound, without reading it."""
        try:
            seekable = file.seekable()
        except (AttributeError, OSError, ValueError):
            seekable = False
        if not seekable:
            return None, False
        self._start = file.tell()
        end = file.seek(0, os.SEEK_END)
        file.seek(self._start)
        return end - self._start, True

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": self.content_type}
        if self.size is not None:
            headers["Content-Length"] = str(self.size)
        return headers

    def chunks(self) -> Iterator[bytes]:
        """The whole body, from its start, a chunk at a time."""
        return self._file_chunks()

    async def achunks(self) -> AsyncIterator[bytes]:
        """:meth:`chunks` for an async client (a local read of a chunk does not wait long)."""
        for chunk in self.chunks():
            yield chunk

    def _file_chunks(self) -> Iterator[bytes]:
        total = self.file_size
        done = 0
        self._report(done, total)
        for chunk in self._read():
            done += len(chunk)
            self._report(done, total)
            yield chunk
        if total is not None and done != total:
            raise InvalidRequestError(
                f"the upload's source changed size while it was sent: {done} bytes, not {total}"
            )

    @property
    def file_size(self) -> int | None:
        return self.size

    def _report(self, done: int, total: int | None) -> None:
        if self._progress is not None:
            self._progress(done, total)

    def _read(self) -> Iterator[bytes]:
        if self._data is not None:
            for offset in range(0, len(self._data), CHUNK_BYTES):
                yield bytes(self._data[offset : offset + CHUNK_BYTES])
            return
        if self._path is not None:
            with self._path.open("rb") as file:
                yield from _read_file(file, self.file_size)
            return
        assert self._file is not None  # noqa: S101 - one of the three is set
        if self.replayable:
            self._file.seek(self._start)
        elif self._consumed:
            raise RuntimeError("this file object was sent already and cannot be rewound")
        self._consumed = True
        yield from _read_file(self._file, self.file_size)


def _read_file(file: BinaryIO, size: int | None) -> Iterator[bytes]:
    """Up to ``size`` bytes (all when None) of ``file``, a chunk at a time."""
    left = size
    while left is None or left > 0:
        chunk = file.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
        if not chunk:
            return
        if left is not None:
            left -= len(chunk)
        yield chunk


def _quote(value: str) -> str:
    """A form-data parameter value, escaped as browsers do (WHATWG HTML)."""
    return value.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


class MultipartUpload(Upload):
    """The body of ``POST /put``: text ``fields`` then the file part, as multipart/form-data."""

    def __init__(
        self,
        source: Source,
        progress: Progress | None = None,
        *,
        filename: str | None = None,
        fields: dict[str, str] | None = None,
    ) -> None:
        super().__init__(source, progress)
        boundary = secrets.token_hex(16)
        self.content_type = f"multipart/form-data; boundary={boundary}"
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{_quote(name)}"\r\n\r\n'
            f"{value}\r\n"
            for name, value in (fields or {}).items()
        ]
        name = filename if filename is not None else self.name
        disposition = 'form-data; name="file"' + (f'; filename="{_quote(name)}"' if name else "")
        parts.append(
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        self._head = "".join(parts).encode()
        self._tail = f"\r\n--{boundary}--\r\n".encode()
        self._file_bytes = self.size
        if self.size is not None:
            self.size += len(self._head) + len(self._tail)

    @property
    def file_size(self) -> int | None:
        return self._file_bytes

    def chunks(self) -> Iterator[bytes]:
        yield self._head
        yield from self._file_chunks()
        yield self._tail
