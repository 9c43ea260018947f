"""``server.lock`` in the data folder: every running server holds it shared, an offline restore
(``nox-api backup restore``) exclusively, so that the two never meet. ``fcntl.flock`` locks
belong to the open file, so threads and processes alike see them; the lock goes away with the
process that held it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from nox_api.errors import ConfigError, Conflict

__all__ = ["SERVER_LOCK_FILE", "ServerLock"]

SERVER_LOCK_FILE = "server.lock"
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW


class ServerLock:
    """``server.lock`` in the data folder: every server holds it shared while it runs; an
    offline restore holds it exclusively, so the two never meet."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def _take(cls, data: Path, how: int) -> ServerLock | None:
        data.mkdir(parents=True, exist_ok=True)
        fd = os.open(data / SERVER_LOCK_FILE, _LOCK_FLAGS, 0o600)
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(fd)

    @classmethod
    def shared(cls, data: Path) -> ServerLock:
        """The server's hold; ConfigError while an offline restore runs on ``data``."""
        lock = cls._take(data, fcntl.LOCK_SH)
        if lock is None:
            raise ConfigError(
                f"an offline restore is running on the data folder {data}; start the server "
                "when it has finished"
            )
        return lock

    @classmethod
    def exclusive(cls, data: Path, name: str) -> ServerLock:
        """An offline restore's hold; Conflict while a server runs on ``data``."""
        lock = cls._take(data, fcntl.LOCK_EX)
        if lock is None:
            raise Conflict(
                f"a server is running on this data folder; use POST /api/backups/{name}/restore"
            )
        return lock

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __del__(self) -> None:  # a server whose start failed half-way
        self.release()

    def __enter__(self) -> ServerLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
