"""``POST /api/sandbox/clean``: remove what interrupted work left behind, and old files.

Only three folders are walked: the workspaces, the staging folder and the probe folder - never
the database, the audit folder, the logs or the backups. What goes:

- leftovers, once untouched for :data:`LEFTOVER_GRACE_S` (a younger one may belong to a write or a
  probe under way): temporary files of interrupted writes in workspaces (names starting with
  :data:`UPLOAD_PREFIX`), anything in the staging folder, anything in the probe folder;
- with ``older_than_days``: every other file or link of the workspace(s) whose own modification
  time is older than that many days (0: all of them);
- folders this emptied (never a workspace's own folder, nor the roots walked).

Naming a workspace narrows the walk to it: staging and probe folders are then left alone.
Symbolic links are never followed: entries are ``lstat``-ed, folders opened with ``O_NOFOLLOW``
relative to their parent's descriptor, and a link is removed as a link, its target untouched.
A dry run walks the same way and reports the same, changing nothing. Folders deeper than
:data:`MAX_DEPTH` below a root are left alone.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nox_api.config import Settings
from nox_api.errors import InvalidRequest, NotFound
from nox_api.services.auditing import Auditor, Caller
from nox_api.services.files import DIR_FLAGS
from nox_api.services.tokens import validate_workspace_name
from nox_api.services.workspace_files import UPLOAD_PREFIX  # what a write names its temp file

__all__ = [
    "CleanReport",
    "Cleaner",
    "LEFTOVER_GRACE_S",
    "MAX_DEPTH",
    "MAX_LISTED_PATHS",
    "UPLOAD_PREFIX",
]

log = logging.getLogger("nox.clean")

LEFTOVER_GRACE_S = 3600.0
MAX_DEPTH = 128
MAX_LISTED_PATHS = 1000
_DAY_S = 86400

# Given an entry's name and lstat, whether to remove it (folders: whether to remove all of it).
_Rule = Callable[[str, os.stat_result], bool]


@dataclass
class CleanReport:
    """What a clean removed (or, in a dry run, would remove)."""

    dry_run: bool
    removed: int = 0
    freed_bytes: int = 0
    paths: list[str] = field(default_factory=list)
    paths_truncated: bool = False
    workspaces: set[str] = field(default_factory=set)

    def count(self, rel: str, st: os.stat_result) -> None:
        self.removed += 1
        if stat.S_ISREG(st.st_mode):
            self.freed_bytes += st.st_size
        if len(self.paths) < MAX_LISTED_PATHS:
            # Names are bytes to the kernel: show undecodable ones escaped, never fail on them.
            self.paths.append(rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
        else:
            self.paths_truncated = True


def _open_dir(name: str, dir_fd: int | None = None) -> int | None:
    """A descriptor of the folder ``name`` (never through a link), or None when it is gone or
    is not a folder (any more)."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return None
        raise


def _entries(dir_fd: int) -> list[tuple[str, os.stat_result]]:
    """The names in the folder ``dir_fd`` with their ``lstat``; entries gone meanwhile are left
    out (sandboxed code may be changing the folder)."""
    found = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            try:
                found.append((entry.name, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
    return found


class _Walk:
    """One clean: removes (or counts) entries below descriptors, never following a link."""

    def __init__(self, report: CleanReport) -> None:
        self.report = report

    def _remove(self, dir_fd: int, name: str, rel: str, st: os.stat_result) -> bool:
        if not self.report.dry_run:
            try:
                if stat.S_ISDIR(st.st_mode):
                    os.rmdir(name, dir_fd=dir_fd)
                else:
                    os.unlink(name, dir_fd=dir_fd)  # a link goes as a link
            except OSError:  # gone meanwhile, or a folder that got an entry meanwhile
                return False
        self.report.count(rel, st)
        return True

    def sweep(self, dir_fd: int, rel: str, rule: _Rule, depth: int = 0) -> tuple[int, int]:
        """Remove the files and links below ``dir_fd`` that ``rule`` selects, and the folders
        that leaves empty. Returns (entries kept, entries removed) directly in it."""
        kept = removed = 0
        for name, st in _entries(dir_fd):
            path = f"{rel}/{name}"
            if not stat.S_ISDIR(st.st_mode):
                if rule(name, st) and self._remove(dir_fd, name, path, st):
                    removed += 1
                else:
                    kept += 1
                continue
            sub = _open_dir(name, dir_fd) if depth < MAX_DEPTH else None
            if sub is None:
                kept += 1
                continue
            try:
                sub_kept, sub_removed = self.sweep(sub, path, rule, depth + 1)
            finally:
                os.close(sub)
            if sub_kept == 0 and sub_removed > 0 and self._remove(dir_fd, name, path, st):
                removed += 1
            else:
                kept += 1
        return kept, removed

    def purge(self, dir_fd: int, name: str, rel: str, st: os.stat_result, depth: int = 0) -> bool:
        """Remove the entry ``name`` whole: a file, a link, or a folder and all below it."""
        if stat.S_ISDIR(st.st_mode):
            sub = _open_dir(name, dir_fd) if depth < MAX_DEPTH else None
            if sub is None:
                return False
            try:
                listed = _entries(sub)
                # Every entry is tried (a list, not a generator that all() would cut short).
                results = [self.purge(sub, n, f"{rel}/{n}", s, depth + 1) for n, s in listed]
                emptied = all(results)
            finally:
                os.close(sub)
            if not emptied:
                return False
        return self._remove(dir_fd, name, rel, st)

    def purge_children(self, root: Path, rel: str, rule: _Rule) -> None:
        """Remove whole every entry of the folder ``root`` that ``rule`` selects."""
        fd = _open_dir(str(root))
        if fd is None:
            return
        try:
            for name, st in _entries(fd):
                if rule(name, st):
                    self.purge(fd, name, f"{rel}/{name}", st)
        finally:
            os.close(fd)


class Cleaner:
    def __init__(
        self,
        settings: Settings,
        auditor: Auditor,
        changed: Callable[[str], None] | None = None,
        grace_s: float = LEFTOVER_GRACE_S,
    ) -> None:
        self._settings = settings
        self._auditor = auditor
        self._changed = changed  # told which workspaces lost files (storage statistics)
        self.grace_s = grace_s

    def clean(
        self,
        caller: Caller | None,
        *,
        older_than_days: int | None = None,
        workspace: str | None = None,
        dry_run: bool = False,
    ) -> CleanReport:
        """Clean, audit and log it. Raises NotFound for a workspace that does not exist."""
        if workspace is not None:
            validate_workspace_name(workspace)
        if older_than_days is not None and older_than_days < 0:
            raise InvalidRequest("older_than_days must be 0 or more")
        now = time.time()
        leftover_before = now - self.grace_s
        files_before = None if older_than_days is None else now - older_than_days * _DAY_S

        def in_workspace(name: str, st: os.stat_result) -> bool:
            if name.startswith(UPLOAD_PREFIX):
                return st.st_mtime < leftover_before  # never a write under way
            return files_before is not None and st.st_mtime < files_before

        def leftover(_name: str, st: os.stat_result) -> bool:
            return st.st_mtime < leftover_before

        report = CleanReport(dry_run=dry_run)
        walk = _Walk(report)
        settings = self._settings
        self._workspaces(walk, workspace, in_workspace)
        if workspace is None:
            data = settings.data_path
            for folder in (settings.staging_dir, settings.probe_dir):
                walk.purge_children(folder, folder.relative_to(data).as_posix(), leftover)
        self._auditor.record(
            "sandbox.clean", caller, target=workspace or "*", dry_run=dry_run,
            older_than_days=older_than_days, removed=report.removed,
            freed_bytes=report.freed_bytes,
        )  # fmt: skip
        log.info(
            "sandbox clean%s: %s %d entries, %d bytes (%s; %s)",
            " (dry run)" if dry_run else "",
            "would remove" if dry_run else "removed",
            report.removed,
            report.freed_bytes,
            f"workspace {workspace}" if workspace else "all workspaces, staging, probes",
            "leftovers only"
            if older_than_days is None
            else f"and files older than {older_than_days} days",
        )
        if not dry_run and self._changed is not None:
            for name in sorted(report.workspaces):
                self._changed(name)
        return report

    def _workspaces(self, walk: _Walk, only: str | None, rule: _Rule) -> None:
        root = self._settings.workspaces_dir
        rel = root.relative_to(self._settings.data_path).as_posix()
        root_fd = _open_dir(str(root))
        if root_fd is None:
            if only is not None:
                raise NotFound(f"no workspace named {only!r}")
            return
        try:
            if only is not None:
                names = [only]
            else:
                with os.scandir(root_fd) as entries:
                    names = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
            for name in names:
                fd = _open_dir(name, root_fd)
                if fd is None:
                    if only is not None:
                        raise NotFound(f"no workspace named {only!r}")
                    continue
                before = walk.report.removed
                try:
                    walk.sweep(fd, f"{rel}/{name}", rule)
                finally:
                    os.close(fd)
                if walk.report.removed > before:
                    walk.report.workspaces.add(name)
        finally:
            os.close(root_fd)
