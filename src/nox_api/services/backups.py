"""Encrypted backups of the data folder, and restoring one.

A backup is one file, ``<backups>/<name>.noxbak`` (mode 0600, written under a temporary name,
fsync'ed, then linked into place), with its SHA-256 beside it in ``<name>.noxbak.sha256``
(``sha256sum -c`` format; only the listing uses it). It holds a snapshot of the SQLite database,
the audit log with its key file, and the workspaces (:mod:`.backup_archive`), compressed and
encrypted (:mod:`.backup_format`). Not in it: the backups, the staging and probe folders, the
server logs, the policy file and the settings.

A restore unpacks and checks the whole backup into a folder inside the data folder while a
thread of its own takes the automatic ``pre-restore-<time>`` backup of the present state; once
both are done (the pre-restore backup fsync'ed, the unpacked files synced) it swaps the parts
in: the workspaces and audit folders (and ``audit.key``) by rename, the database through
SQLite's backup API into the live database. A failing step puts the old folders back; a failed
unpack stops the pre-restore backup and removes it. A running server then throws its warm
sandboxes and cached counters away and goes on with the restored audit chain. The replaced
state is removed last, its files' unlinks on several threads (:mod:`.tree_removal`).

One backup or restore runs at a time per data folder (``backups/.lock``). The server holds
``server.lock`` shared; an offline restore takes it exclusively, so it never runs under a server.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, TypeVar, cast

from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from nox_api.config import Settings
from nox_api.errors import (
    ConfigError,
    Conflict,
    InsufficientStorage,
    InvalidRequest,
    NotFound,
    NoxError,
)
from nox_api.services.audit import KEY_FILE, fsync_dir
from nox_api.services.auditing import Auditor, Caller, audit_key
from nox_api.services.backup_archive import (
    AUDIT_DIR,
    AUDIT_KEY,
    DATABASE,
    WORKSPACES_DIR,
    ArchiveStats,
    ArchiveWriter,
    copy_sqlite,
    count_lines,
    database_revision,
    manifest_bytes,
)
from nox_api.services.backup_format import (
    BackupFormatError,
    ChunkReader,
    ChunkWriter,
    KeyMaterial,
    key_material,
    read_header,
)
from nox_api.services.backup_unpack import extract_archive, prepare_database
from nox_api.services.direct_io import DirectWriter, open_new
from nox_api.services.restore_files import spread_below
from nox_api.services.server_lock import ServerLock
from nox_api.services.tree_removal import remove_tree_fast
from nox_api.storage.db import Database
from nox_api.storage.models import WorkspaceStorageRow

__all__ = [
    "BACKUP_SUFFIX",
    "BackupService",
    "RestoreResult",
    "SWAP_MARKER",
    "StoredBackup",
    "interrupted_restores",
    "refuse_interrupted_restore",
    "sqlite_path",
    "validate_backup_name",
    "workspace_owner",
]

_STORED_BYTES = select(func.coalesce(func.sum(WorkspaceStorageRow.bytes), 0))
log = logging.getLogger("nox.backups")

BACKUP_SUFFIX = ".noxbak"
SUM_SUFFIX = ".sha256"
OPERATION_LOCK_FILE = ".lock"
MIB = 1 << 20
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW

Progress = Callable[[int], None]
_T = TypeVar("_T")


def validate_backup_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise InvalidRequest(
            f"backup name {name[:80]!r} must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' and "
            "'-', not starting with '.' or '-'"
        )
    return name


def sqlite_path(settings: Settings) -> Path:
    """The database file; InvalidRequest when the database is not a SQLite file."""
    url = make_url(settings.sqlalchemy_url)
    database = url.database or ""
    if url.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        raise InvalidRequest(
            "backups support only a SQLite database file for now; NOX_DATABASE_URL names "
            f"a {url.get_backend_name()} database (back it up with its own tools)"
        )
    return Path(database).absolute()


def workspace_owner(settings: Settings) -> tuple[int, int] | None:
    """Who workspace files must belong to: the sandbox user when root runs bubblewrap."""
    if os.geteuid() == 0 and settings.sandbox_backend == "bwrap":
        return settings.sandbox_uid, settings.sandbox_gid
    return None


def _sync_filesystem(folder: Path) -> None:
    """Write everything cached for the file system of ``folder`` to disk (``syncfs``): one call
    for the thousands of files a restore unpacked, instead of an fsync each."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), f"syncfs {folder}")
    except (AttributeError, OSError):
        os.sync()  # no syncfs here: every file system
    finally:
        os.close(fd)


SWAP_MARKER = "SWAPPING"


def interrupted_restores(data: Path) -> list[Path]:
    """Staging folders of restores that stopped (a crash, a kill) while they swapped the data
    folder's parts: the data folder may then mix the previous and the restored state."""
    return sorted(p.parent for p in data.glob(f".restore-*/{SWAP_MARKER}"))


def refuse_interrupted_restore(data: Path) -> None:
    """ConfigError (start-up stops, exit 2) when a restore stopped half-way through its swap."""
    stopped = interrupted_restores(data)
    if stopped:
        raise ConfigError(
            f"a restore stopped while it swapped the data folder's parts ({stopped[0]}): the "
            "folder may mix the previous and the restored state; see docs/backups.md, "
            "'An interrupted restore', before starting the server"
        )


def _remove_stage(stage: Path) -> None:
    """Remove a restore's staging folder. Its ``old`` part holds the replaced workspaces, which
    sandboxes still running may change: removed without following links or blocking on a FIFO
    (:func:`~nox_api.services.tree_removal.remove_tree_fast`)."""
    fd = os.open(stage.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        remove_tree_fast(fd, stage.name)
    except OSError as exc:
        log.error("restore: could not remove %s (%s); remove it by hand", stage, exc)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class StoredBackup:
    name: str
    size: int
    created_at: datetime
    sha256: str


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """What a restore brought back (counts), and the name of the backup taken before it."""

    counts: dict[str, int]
    pre_restore: str


@dataclass
class _Swap:
    """Renames done so far, to undo in reverse order when a later step fails."""

    done: list[tuple[Path, Path]] = field(default_factory=list)

    def move(self, source: Path, target: Path) -> None:
        os.rename(source, target)
        self.done.append((source, target))

    def undo(self) -> None:
        for source, target in reversed(self.done):
            try:
                os.rename(target, source)
            except OSError:
                log.exception("restore: could not move %s back to %s", target, source)
        self.done.clear()


class BackupService:
    """Backups of one data folder. ``auditor`` records each operation. A running server also
    passes ``prepare`` (makes a restored workspace folder usable by its sandboxes), ``settle``
    (waits for history rows still being written), ``after_restore`` (throws away what caches
    the old state: warm sandboxes, quota counters), ``changed`` (told of every workspace a
    restore replaced) and its ``server_lock``, released by :meth:`close`."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        auditor: Auditor,
        *,
        owner: tuple[int, int] | None = None,
        prepare: Callable[[Path], None] | None = None,
        settle: Callable[[], None] | None = None,
        after_restore: Sequence[Callable[[], None]] = (),
        changed: Callable[[str], None] | None = None,
        server_lock: ServerLock | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.auditor = auditor
        self.folder = settings.backups_dir
        self._owner = owner
        self._prepare = prepare
        self._settle = settle
        self._after_restore = tuple(after_restore)
        self._changed = changed
        self._server_lock = server_lock
        # Made once here, not by the first operation: a refused restore changes no file.
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(self.folder / OPERATION_LOCK_FILE, _LOCK_FLAGS, 0o600))

    def close(self) -> None:
        """Release the server's hold on ``server.lock`` (when it gave one)."""
        if self._server_lock is not None:
            self._server_lock.release()

    # -- public ------------------------------------------------------------------------------
    def path_of(self, name: str) -> Path:
        return self.folder / f"{validate_backup_name(name)}{BACKUP_SUFFIX}"

    def list_all(self) -> list[StoredBackup]:
        """The backups in the folder, newest first (files that are not backups are left out)."""
        found = []
        if not self.folder.is_dir():
            return []
        for path in self.folder.glob(f"*{BACKUP_SUFFIX}"):
            name = path.name[: -len(BACKUP_SUFFIX)]
            if not _NAME_RE.fullmatch(name) or not path.is_file() or path.is_symlink():
                continue
            try:
                found.append(self._describe(path, name))
            except (OSError, BackupFormatError) as exc:
                log.warning("backups: %s is not a readable backup: %s", path.name, exc)
        return sorted(found, key=lambda info: (info.created_at, info.name), reverse=True)

    def create(
        self, name: str, caller: Caller | None, progress: Progress | None = None
    ) -> StoredBackup:
        """Write the backup ``name``; 409 when it exists, 400 without a key or on a database
        that is not SQLite."""
        try:
            validate_backup_name(name)
            keys = key_material(self.settings)
            database = self._sqlite_path()
            self._check_room(database)
            with self._operation():
                info, stats = _as_nox_error(self._write, name, keys, database, progress)
        except NoxError as exc:
            self.auditor.record("backup.create", caller, outcome="failed", target=name[:64],
                                reason=exc.message[:300])  # fmt: skip
            raise
        self.auditor.record(
            "backup.create", caller, target=name, size=info.size, sha256=info.sha256,
            files=stats.files, bytes=stats.bytes, skipped=stats.skipped,
        )  # fmt: skip
        return info

    def restore(
        self, name: str, caller: Caller | None, progress: Progress | None = None
    ) -> RestoreResult:
        """Replace the data folder's state with the backup ``name``; nothing changes unless the
        whole backup verified and every step succeeded."""
        try:
            path = self.path_of(name)
            if not path.is_file():
                raise NotFound(f"no backup named {name!r}")
            keys = key_material(self.settings)
            database = self._sqlite_path()
            stopped = interrupted_restores(self.settings.data_path)
            if stopped:
                raise Conflict(
                    f"an earlier restore stopped half-way ({stopped[0].name}); see "
                    "docs/backups.md, 'An interrupted restore'"
                )
            with self._operation():
                result = _as_nox_error(self._restore, path, keys, database, progress, caller)
        except NoxError as exc:
            self.auditor.record("backup.restore", caller, outcome="failed", target=name[:64],
                                reason=exc.message[:300])  # fmt: skip
            raise
        # (no details key may name tokens: the audit log refuses such keys as secrets)
        counts = {("identities" if k == "tokens" else k): v for k, v in result.counts.items()}
        self.auditor.record("backup.restore", caller, target=name,
                            pre_restore=result.pre_restore, restored=counts)  # fmt: skip
        return result

    # -- creating ----------------------------------------------------------------------------
    def _sqlite_path(self) -> Path:
        return sqlite_path(self.settings)

    @contextlib.contextmanager
    def _operation(self) -> Iterator[None]:
        """One backup or restore at a time on this data folder (threads and processes)."""
        fd = os.open(self.folder / OPERATION_LOCK_FILE, _LOCK_FLAGS, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Conflict(
                    "another backup or restore is running on this data folder; try again when "
                    "it has finished"
                ) from None
            yield
        finally:
            os.close(fd)

    def _check_room(self, database: Path) -> None:
        """Refuse a backup that could take the backups' disk below ``NOX_DISK_FREE_MIN_MIB``.
        Its size is taken as what it holds, uncompressed (the database, the workspaces as the
        storage scanner last counted them, the audit log): an upper bound, near enough."""
        with self.db.connection() as conn:
            stored = int(conn.execute(_STORED_BYTES).scalar_one())
        audit = sum(p.stat().st_size for p in self.settings.audit_dir.glob("*") if p.is_file())
        estimate = database.stat().st_size + stored + audit
        free = shutil.disk_usage(self.folder).free
        floor = self.settings.disk_free_min_mib * MIB
        if free - estimate < floor:
            raise InsufficientStorage(
                f"a backup of up to {estimate / MIB:.0f} MiB would leave "
                f"{max(0, free - estimate) / MIB:.0f} MiB free in {self.folder}, below "
                f"NOX_DISK_FREE_MIN_MIB ({self.settings.disk_free_min_mib} MiB): free space "
                "or remove old backups first"
            )

    def _write(
        self, name: str, keys: KeyMaterial, database: Path, progress: Progress | None
    ) -> tuple[StoredBackup, ArchiveStats]:
        target = self.path_of(name)
        if target.exists() or target.is_symlink():
            raise Conflict(f"a backup named {name!r} exists already")
        if self._settle is not None:
            self._settle()
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=self.folder))
        partial = work / target.name
        audit_files: list[tuple[str, int, int]] = []
        try:
            snapshot = work / DATABASE
            self.auditor.flush_checkpoint()  # the copy's checkpoint as new as can be
            copy_sqlite(database, snapshot, journal="DELETE")
            revision = database_revision(snapshot)
            # After the database: the log then holds at least the lines its checkpoint counts.
            audit_files = self.auditor.log.snapshot_files()
            fd, direct = open_new(str(partial), 0o600)
            try:
                out = DirectWriter(fd, direct)
                try:
                    sealed = ChunkWriter(cast(BinaryIO, out), keys)
                    archive = ArchiveWriter(sealed, progress)
                    self._fill(archive, sealed, snapshot, revision, audit_files)
                    archive.close()
                    sealed.finish()
                finally:
                    out.close()
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(partial, target)
            except FileExistsError:
                raise Conflict(f"a backup named {name!r} exists already") from None
            try:
                _write_sum(target, sealed.sha256)
            except OSError:
                target.unlink(missing_ok=True)  # a failed backup must not hold its name
                raise
            fsync_dir(self.folder)
        except (OSError, sqlite3.Error) as exc:
            raise NoxError(f"the backup {name!r} could not be written: {exc}") from None
        finally:
            for _, fd, _ in audit_files:
                os.close(fd)
            shutil.rmtree(work, ignore_errors=True)
        info = StoredBackup(name, sealed.size, sealed.created_at, sealed.sha256)
        return info, archive.stats

    def _fill(
        self,
        archive: ArchiveWriter,
        sealed: ChunkWriter,
        snapshot: Path,
        revision: str | None,
        audit_files: list[tuple[str, int, int]],
    ) -> None:
        data = self.settings.data_path
        key_file = data / KEY_FILE
        has_key = key_file.is_file() and not key_file.is_symlink()
        parts = [DATABASE, *([AUDIT_KEY] if has_key else []), AUDIT_DIR, WORKSPACES_DIR]
        created = sealed.created_at.isoformat().replace("+00:00", "Z")
        archive.add_bytes("MANIFEST.json", manifest_bytes(created, revision, parts))
        archive.add_path(DATABASE, snapshot)
        if has_key:
            archive.add_path(AUDIT_KEY, key_file)
        archive.add_dir(AUDIT_DIR, 0o700)
        for file_name, fd, size in audit_files:
            archive.add_fd(f"{AUDIT_DIR}/{file_name}", fd, size, 0o600, os.fstat(fd).st_mtime)
        archive.add_workspaces(self.settings.workspaces_dir)

    def _describe(self, path: Path, name: str) -> StoredBackup:
        st = path.stat()
        with path.open("rb") as f:
            _, fields = read_header(f)
        created = fields.get("created_at")
        try:
            created_at = datetime.fromisoformat(str(created).replace("Z", "+00:00"))
        except ValueError:
            created_at = datetime.fromtimestamp(st.st_mtime, UTC)
        return StoredBackup(name, st.st_size, created_at.astimezone(UTC), _sha256_of(path, st))

    # -- restoring ---------------------------------------------------------------------------
    def _restore(
        self,
        path: Path,
        keys: KeyMaterial,
        database: Path,
        progress: Progress | None,
        caller: Caller | None,
    ) -> RestoreResult:
        data = self.settings.data_path
        stage = Path(tempfile.mkdtemp(prefix=".restore-", dir=data))
        try:
            spread_below(stage)  # the unpacked tree goes where no file was deleted just now
            new = Path(tempfile.mkdtemp(prefix="new-", dir=stage))
            pre = self._pre_restore_name()
            counts, (info, stats) = self._unpack_and_keep(
                path, keys, new, progress, pre=pre, database=database
            )
            # Everything verified and the present state kept: swap.
            before = _folders(self.settings.workspaces_dir)
            # On disk before it replaces the live state (after the swap the old folders are
            # deleted), and before audit writes are held: a syncfs can take seconds.
            _sync_filesystem(new)
            try:
                with self.auditor.suspended(lambda: audit_key(self.settings)):
                    self._swap(stage, new, database)
            finally:
                # Recorded in the chain that is live now: the restored one after the swap (a
                # line in the replaced log would go with it), the kept one after a failure.
                self.auditor.record("backup.create", caller, target=pre, size=info.size,
                                    sha256=info.sha256, files=stats.files, bytes=stats.bytes,
                                    skipped=stats.skipped, reason="before a restore")  # fmt: skip
            self._keep_replaced_audit(stage, pre)
            self._restored(before | _folders(self.settings.workspaces_dir))
        finally:
            _remove_stage(stage)
        return RestoreResult(counts, pre)

    def _unpack_and_keep(
        self,
        path: Path,
        keys: KeyMaterial,
        new: Path,
        progress: Progress | None,
        *,
        pre: str,
        database: Path,
    ) -> tuple[dict[str, int], tuple[StoredBackup, ArchiveStats]]:
        """Unpack and check the backup into ``new`` while a thread of its own writes the
        pre-restore backup ``pre`` of the present state (they read and write different data;
        together they take about the time of the longer one). Returns when both are done, the
        pre-restore backup fsync'ed and in place. When the unpack fails, the pre-restore backup
        is stopped and whatever it wrote removed; when it fails, that error is raised: either
        way nothing was replaced."""
        stop = threading.Event()

        def stopped(_done: int) -> None:  # the pre-restore backup's progress: a way out
            if stop.is_set():
                raise _Stopped

        with ThreadPoolExecutor(1, thread_name_prefix="nox-pre-restore") as pool:
            kept = pool.submit(self._write, pre, keys, database, stopped)
            try:
                counts = self._unpack(path, keys, new, progress)
            except BaseException:
                stop.set()
                wait([kept])
                if not kept.cancelled() and kept.exception() is None:
                    self._remove_backup(pre)  # it ended first: no trace of a failed restore
                raise
            return counts, kept.result()

    def _remove_backup(self, name: str) -> None:
        target = self.path_of(name)
        for path in (target.with_name(target.name + SUM_SUFFIX), target):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.error("restore: could not remove the backup %s: %s", path, exc)
        with contextlib.suppress(OSError):
            fsync_dir(self.folder)

    def _unpack(
        self, path: Path, keys: KeyMaterial, new: Path, progress: Progress | None
    ) -> dict[str, int]:
        """Decrypt, check and unpack the backup into ``new``; prepare its parts to go live."""
        data = self.settings.data_path
        disk = os.statvfs(data)
        room = disk.f_bavail * disk.f_frsize - self.settings.disk_free_min_mib * MIB
        try:
            with path.open("rb") as source:
                plain = ChunkReader(source, keys)
                got = extract_archive(plain, new, max(0, room), progress, self._owner)
        except OSError as exc:
            raise NoxError(f"the backup could not be unpacked: {exc}") from None
        for folder in (new / WORKSPACES_DIR, new / AUDIT_DIR):
            folder.mkdir(exist_ok=True)
        staged_db = new / DATABASE
        tokens, executions = prepare_database(staged_db)
        self._prepare_workspaces(new / WORKSPACES_DIR)
        (new / AUDIT_DIR).chmod(0o700)
        for item in (new / AUDIT_DIR).iterdir():
            item.chmod(0o600)
        if got.has_audit_key:
            (new / AUDIT_KEY).chmod(0o600)
        return {
            "workspaces": len(got.workspaces),
            "files": got.files,
            "bytes": got.bytes,
            "executions": executions,
            "tokens": tokens,
            "audit_entries": count_lines(new / AUDIT_DIR),
        }

    def _prepare_workspaces(self, root: Path) -> None:
        """Modes as :class:`~nox_api.services.files.Workspaces` keeps them (what is inside a
        workspace was given to the sandbox user while unpacking)."""
        root.chmod(0o711)
        if self._prepare is not None:
            for workspace in root.iterdir():
                self._prepare(workspace)

    def _swap(self, stage: Path, new: Path, database: Path) -> None:
        data = self.settings.data_path
        old = stage / "old"
        old.mkdir(mode=0o700)
        swap = _Swap()
        # Until the marker is gone, the data folder may hold part old and part restored state:
        # a server does not start on it (see interrupted_restores).
        marker = stage / SWAP_MARKER
        marker.write_text(
            "A restore was swapping the data folder's parts here; the parts it replaced are in "
            "old/. See docs/backups.md, 'An interrupted restore'.\n"
        )
        fsync_dir(stage)
        try:
            for part in (WORKSPACES_DIR, AUDIT_DIR, AUDIT_KEY):
                if not (new / part).exists():
                    continue  # a backup without audit.key keeps the present one
                live = data / part
                if live.exists() or live.is_symlink():
                    swap.move(live, old / part)
                swap.move(new / part, live)
            fsync_dir(data)
            restore_database(new / DATABASE, database)
            marker.unlink()
            fsync_dir(stage)
        except BaseException as exc:
            swap.undo()
            with contextlib.suppress(OSError):
                fsync_dir(data)
                marker.unlink()  # undone: the previous state is whole again
            if isinstance(exc, NoxError) or not isinstance(exc, Exception):
                raise
            raise NoxError(f"the restore failed and the previous state was kept: {exc}") from exc

    def _restored(self, workspaces: set[str]) -> None:
        """Tell the server's parts that the state changed under them."""
        try:
            for hook in self._after_restore:
                hook()
            if self._changed is not None:
                for workspace in sorted(workspaces):
                    self._changed(workspace)
        except Exception:  # the restore is done; a stale cache must not turn it into an error
            log.exception("restore: a clean-up step after the restore failed")

    def _keep_replaced_audit(self, stage: Path, pre: str) -> None:
        """Keep the audit log the restore replaced as ``backups/<pre>.audit/``: lines written
        while the pre-restore backup was made are in neither that backup nor the restored log.
        ``nox-api audit verify FILE`` checks its files."""
        replaced = stage / "old" / AUDIT_DIR
        if not replaced.is_dir():
            return
        try:
            os.rename(replaced, self.folder / f"{pre}.audit")
            fsync_dir(self.folder)
        except OSError as exc:
            log.error("restore: could not keep the replaced audit log %s: %s", replaced, exc)

    def _pre_restore_name(self) -> str:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        name = f"pre-restore-{stamp}"
        number = 1
        while self.path_of(name).exists():
            number += 1
            name = f"pre-restore-{stamp}-{number}"
        return name


class _Stopped(Exception):
    """The pre-restore backup was stopped: the restore failed beside it."""


def _as_nox_error(work: Callable[..., _T], *args: object) -> _T:
    """``work(*args)``; an unexpected error is logged with its traceback and becomes a
    NoxError (500), so that the attempt is audited and the caller gets the envelope."""
    try:
        return work(*args)
    except NoxError:
        raise
    except Exception as exc:
        log.exception("backups: %s failed", getattr(work, "__name__", "an operation"))
        raise NoxError(f"the operation failed: {exc}") from exc


def _folders(root: Path) -> set[str]:
    try:
        return {e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False)}
    except FileNotFoundError:
        return set()


def restore_database(staged: Path, live: Path) -> None:
    """Copy the checked, migrated database ``staged`` into the live one, in one transaction."""
    copy_sqlite(staged, live)


def _write_sum(target: Path, digest: str) -> None:
    path = target.with_name(target.name + SUM_SUFFIX)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{digest}  {target.name}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256_of(path: Path, st: os.stat_result) -> str:
    """The checksum file's value when it is newer than the backup, else the file's hash."""
    sums = path.with_name(path.name + SUM_SUFFIX)
    with contextlib.suppress(OSError, ValueError):
        if sums.stat().st_mtime_ns >= st.st_mtime_ns:
            digest, _, named = sums.read_text().strip().partition("  ")
            if named == path.name and re.fullmatch(r"[0-9a-f]{64}", digest):
                return digest
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MIB):
            h.update(block)
    return h.hexdigest()
