"""What each workspace stores, kept in the ``workspace_storage`` table by a background scanner,
so that statistics read the database instead of walking the disk per request.

Whatever may change a workspace (a run, an upload, a file written or deleted) calls
:meth:`StorageScanner.mark_dirty`. The scanner rescans a marked workspace ``debounce_s`` after
its first mark: the marks of a burst of runs coalesce into one walk, and a steady stream of
runs still gets its workspace rescanned about once per ``debounce_s``. At start every workspace
folder is scanned once. A walk never follows symbolic links and does its work in steps of
``entries_per_step`` folder entries with a short pause in between, so a huge workspace cannot
hold the interpreter or the disk for long at a time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from nox_api.services.files import DIR_FLAGS
from nox_api.storage.db import Database
from nox_api.storage.models import WorkspaceStorageRow

__all__ = ["StorageScanner", "UsageWalk", "WorkspaceUsage", "walk_usage"]

log = logging.getLogger("nox.scanner")


@dataclass(frozen=True, slots=True)
class WorkspaceUsage:
    files: int
    bytes: int


class _Listing(Protocol):
    def __next__(self) -> os.DirEntry[str]: ...

    def close(self) -> None: ...


MAX_SCAN_DEPTH = 256


class UsageWalk:
    """A walk of one folder tree that stops after a given number of entries and goes on later
    where it stopped (even inside a folder: a folder of a million files is many steps).

    Sandboxed code changes the tree while it is walked, so a queued folder is kept as its names
    below the root and reached again from the root's descriptor, one ``O_NOFOLLOW |
    O_DIRECTORY`` step at a time, when its turn comes: a folder swapped for a link in between is
    not entered (a path string would be resolved through the link, out of the workspace)."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._stack: list[tuple[str, ...]] = [()]
        self._listing: _Listing | None = None  # the folder being read
        self._here: tuple[str, ...] = ()
        self._fd: int | None = None
        self.files = 0
        self.bytes = 0

    @property
    def done(self) -> bool:
        return self._listing is None and not self._stack

    def step(self, budget: int) -> int:
        """Look at up to ``budget`` entries; returns how many it looked at."""
        seen = 0
        while seen < budget:
            if self._listing is None:
                if not self._stack:
                    break
                self._here = self._stack.pop()
                try:
                    self._listing = self._open(self._here)
                except OSError:  # gone meanwhile, swapped for a link, or not readable
                    continue
            try:
                entry = next(self._listing)
            except (StopIteration, OSError):
                self.close()
                continue
            seen += 1
            try:
                if entry.is_dir(follow_symlinks=False):
                    if len(self._here) < MAX_SCAN_DEPTH:
                        self._stack.append((*self._here, entry.name))
                elif entry.is_file(follow_symlinks=False):
                    self.files += 1
                    self.bytes += entry.stat(follow_symlinks=False).st_size
            except OSError:  # gone meanwhile
                continue
        return seen

    def _open(self, names: tuple[str, ...]) -> _Listing:
        fd = os.open(self._root, DIR_FLAGS)
        try:
            for name in names:
                nxt = os.open(name, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
            listing = os.scandir(fd)
        except BaseException:
            os.close(fd)
            raise
        # The entries stat relative to ``fd`` itself (the iterator reads a duplicate): it stays
        # open until the listing is closed.
        self._fd = fd
        return listing

    def close(self) -> None:
        """Release the folder being read (a walk given up half-way)."""
        if self._listing is not None:
            self._listing.close()
            self._listing = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def walk_usage(root: Path) -> WorkspaceUsage:
    """Regular files and their bytes below ``root`` (symbolic links are neither followed nor
    counted), in one go."""
    walk = UsageWalk(root)
    while not walk.done:
        walk.step(1 << 20)
    return WorkspaceUsage(walk.files, walk.bytes)


class StorageScanner:
    def __init__(
        self,
        db: Database,
        root: Path,
        *,
        debounce_s: float = 1.0,
        entries_per_step: int = 5000,
        pause_s: float = 0.002,
    ) -> None:
        self._db = db
        self._root = root
        self.debounce_s = debounce_s
        self._entries_per_step = entries_per_step
        self._pause_s = pause_s
        self._changed = threading.Condition()
        self._due: dict[str, float] = {}  # workspace -> monotonic time of its rescan
        self._scanning: str | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what the others call ------------------------------------------------------------------
    def mark_dirty(self, workspace: str) -> None:
        """``workspace`` may have changed on disk: rescan it soon. Cheap; never blocks on I/O."""
        with self._changed:
            if workspace not in self._due:
                self._due[workspace] = time.monotonic() + self.debounce_s
                self._changed.notify_all()

    def mark_all(self) -> None:
        """Every workspace may have changed (a restore, say): rescan each folder, and drop the
        rows of workspaces whose folder is gone."""
        with self._db.connection() as conn:
            known = set(conn.execute(select(WorkspaceStorageRow.workspace)).scalars())
        for workspace in known | set(self._folders()):
            self.mark_dirty(workspace)

    def settle(self, timeout_s: float = 10.0) -> bool:
        """Rescan every marked workspace now and wait until done; False if time ran out."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            now = time.monotonic()
            for workspace in self._due:
                self._due[workspace] = now
            self._changed.notify_all()
            return self._changed.wait_for(
                lambda: not self._due and self._scanning is None,
                max(0.0, deadline - time.monotonic()),
            )

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Forget workspaces whose folder is gone, mark every folder for a scan, start."""
        if self._thread is not None:
            return
        present = self._folders()
        with self._db.session() as session:
            session.execute(
                delete(WorkspaceStorageRow).where(WorkspaceStorageRow.workspace.not_in(present))
            )
        now = time.monotonic()
        with self._changed:
            for workspace in present:
                self._due.setdefault(workspace, now)
        self._thread = threading.Thread(target=self._loop, name="nox-scanner", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        self._closed.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _folders(self) -> list[str]:
        try:
            entries = list(os.scandir(self._root))
        except FileNotFoundError:
            return []
        return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))

    # -- the scanning thread -------------------------------------------------------------------
    def _next(self) -> str | None:
        """Wait for the next workspace whose time has come; None when closed."""
        with self._changed:
            while not self._closed.is_set():
                if self._due:
                    workspace = min(self._due, key=self._due.__getitem__)
                    wait = self._due[workspace] - time.monotonic()
                    if wait <= 0:
                        del self._due[workspace]
                        self._scanning = workspace
                        return workspace
                    self._changed.wait(wait)
                else:
                    self._changed.wait()
        return None

    def _loop(self) -> None:
        while (workspace := self._next()) is not None:
            try:
                self.scan(workspace)
            except Exception:  # one unreadable workspace must not stop the scanner
                log.exception("scanning workspace %r failed", workspace)
            finally:
                with self._changed:
                    self._scanning = None
                    self._changed.notify_all()

    def scan(self, workspace: str) -> WorkspaceUsage | None:
        """Walk ``workspace`` and store what it holds; None (and its row deleted) when its
        folder does not exist. Marks that arrive during the walk cause another scan later."""
        folder = self._root / workspace
        if workspace in ("", ".", "..") or "/" in workspace or not folder.is_dir():
            with self._db.session() as session:
                session.execute(
                    delete(WorkspaceStorageRow).where(WorkspaceStorageRow.workspace == workspace)
                )
            return None
        started = time.monotonic()
        walk = UsageWalk(folder)
        try:
            while True:
                walk.step(self._entries_per_step)
                if walk.done:
                    break
                if self._closed.wait(self._pause_s):
                    return None  # shutting down: no half-walk stored
        finally:
            walk.close()
        usage = WorkspaceUsage(walk.files, walk.bytes)
        self._store(workspace, usage)
        log.debug(
            "workspace %r: %d files, %d bytes (%.1f ms)",
            workspace, usage.files, usage.bytes, (time.monotonic() - started) * 1000,
        )  # fmt: skip
        return usage

    def _store(self, workspace: str, usage: WorkspaceUsage) -> None:
        now = datetime.now(UTC)
        values = {
            "workspace": workspace,
            "files": usage.files,
            "bytes": usage.bytes,
            "scanned_at": now,
        }
        with self._db.session() as session:
            dialect = session.get_bind().dialect.name
            if dialect in {"sqlite", "postgresql"}:
                insert = sqlite_insert if dialect == "sqlite" else pg_insert
                stmt = insert(WorkspaceStorageRow).values(**values)
                session.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["workspace"],
                        set_={k: stmt.excluded[k] for k in ("files", "bytes", "scanned_at")},
                    )
                )
                return
            row = session.scalar(
                select(WorkspaceStorageRow)
                .where(WorkspaceStorageRow.workspace == workspace)
                .with_for_update()
            )
            if row is None:
                session.add(
                    WorkspaceStorageRow(
                        workspace=workspace, files=usage.files, bytes=usage.bytes, scanned_at=now
                    )
                )
            else:
                row.files, row.bytes, row.scanned_at = usage.files, usage.bytes, now
