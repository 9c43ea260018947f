"""A cache of authenticated tokens that never outlives a revocation.

Looking a token up costs an indexed query per request (about 0.3-0.5 ms of a paced request on a
small machine: the statement is cheap, the database round trip through the pool is not). The
cache keeps the principal of a recently seen token, keyed by the SHA-256 of its secret, and is
thrown away whenever *any* process revokes a token or restores a backup on this database:

- the :class:`RevocationMark` is a file beside the SQLite database that grows by one byte at every
  revocation (``DELETE /api/tokens/{id}``, ``nox-api token revoke``, a restore). A request stats it
  (a few microseconds) and compares its size with the size read when the cached entry was made. A
  size never repeats, so no sequence of revocations can look like "nothing changed";
- an entry is read *before* the database is queried, so a revocation that commits while a request
  is being checked makes that entry stale at once;
- an entry also expires with its token and after :data:`MAX_AGE_S`, and the cache holds at most
  :data:`MAX_ENTRIES` tokens.

With any other database (PostgreSQL, shared by several servers) there is no shared file to mark,
so there is no cache: every request is checked against the database, and a revocation on one
server is seen by the others at once.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nox_api.services.tokens import Principal
    from nox_api.storage.db import Database

__all__ = ["MAX_AGE_S", "MAX_ENTRIES", "PrincipalCache", "RevocationMark"]

MAX_AGE_S = 60.0
MAX_ENTRIES = 4096
MARK_SUFFIX = ".revocations"


class RevocationMark:
    """A file whose size counts the revocations made on one SQLite database, by any process."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def of(cls, db: Database) -> RevocationMark | None:
        """The mark of ``db``'s file, or None for a database that is not a local SQLite file."""
        url = db.engine.url
        database = url.database or ""
        if url.get_backend_name() != "sqlite" or database in ("", ":memory:"):
            return None
        path = Path(database)
        return cls(path.with_name(path.name + MARK_SUFFIX))

    def read(self) -> int | None:
        """The current count (0 before the first revocation); None when it cannot be read, in
        which case nothing may be cached."""
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0
        except OSError:
            return None

    def bump(self) -> None:
        """Count one change of the tokens. Called after the change is committed."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(self.path, flags, 0o600)
        try:
            os.write(fd, b".")
        finally:
            os.close(fd)


@dataclass(frozen=True, slots=True)
class _Entry:
    principal: Principal
    expires_at: datetime | None
    mark: int
    stored: float  # time.monotonic() when it was cached


class PrincipalCache:
    """Principals of recently authenticated tokens, valid while the mark has not moved."""

    def __init__(self, mark: RevocationMark) -> None:
        self._mark = mark
        self._entries: dict[str, _Entry] = {}
        self._seen = -1  # the mark's value when the entries were made

    def mark(self) -> int | None:
        """Read the mark; call it before querying the database for a miss (see the module)."""
        value = self._mark.read()
        if value != self._seen:
            self._entries = {}  # a revocation (or an unreadable mark): forget everything
            self._seen = -1 if value is None else value
        return value

    def get(self, digest: str, mark: int | None, now: datetime) -> Principal | None:
        """The cached principal of ``digest`` if still valid, else None (ask the database)."""
        if mark is None:
            return None
        entry = self._entries.get(digest)
        if entry is None or entry.mark != mark:
            return None
        if time.monotonic() - entry.stored > MAX_AGE_S or (
            entry.expires_at is not None and entry.expires_at <= now
        ):
            self._entries.pop(digest, None)
            return None
        return entry.principal

    def put(
        self, digest: str, principal: Principal, expires_at: datetime | None, mark: int | None
    ) -> None:
        if mark is None or mark != self._seen:
            return  # the mark moved while the database was asked: do not keep the answer
        if len(self._entries) >= MAX_ENTRIES:
            self._entries = {}
        self._entries[digest] = _Entry(principal, expires_at, mark, time.monotonic())

    def forget(self) -> None:
        self._entries = {}
