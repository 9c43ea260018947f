"""Per-workspace quotas of the policy: runs and CPU seconds per UTC day, stored bytes, uploaded
bytes per UTC day. Counted in the database (the ``usage`` table, one row per workspace and day),
checked before a run starts and before an upload is accepted."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import bindparam, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from nox_api.errors import QuotaExceeded, StorageQuotaExceeded
from nox_api.services.policy import PolicyStore, WorkspaceQuota
from nox_api.services.scanner import walk_usage
from nox_api.storage.db import Database
from nox_api.storage.models import UsageRow

__all__ = ["QuotaService", "UploadRoom", "Usage", "directory_bytes", "utc_day"]

MIB = 1024 * 1024


_USAGE = select(UsageRow.runs, UsageRow.cpu_ms, UsageRow.upload_bytes).where(
    UsageRow.workspace == bindparam("ws"), UsageRow.day == bindparam("day")
)


@dataclass(frozen=True, slots=True)
class UploadRoom:
    storage_left: int
    upload_left: int

    @property
    def bytes(self) -> int:
        return max(0, min(self.storage_left, self.upload_left))


@dataclass(frozen=True, slots=True)
class Usage:
    runs: int = 0
    cpu_ms: float = 0.0
    upload_bytes: int = 0


def utc_day(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%d")


def seconds_until_midnight(now: datetime | None = None) -> int:
    """Seconds until 00:00 UTC, when the daily quotas have room again."""
    now = now or datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((midnight - now).total_seconds()))


def _retry() -> dict[str, str]:
    return {"Retry-After": str(seconds_until_midnight())}


def _until_midnight() -> str:
    minutes = max(1, seconds_until_midnight() // 60)
    return f"the count starts again at 00:00 UTC, in {minutes // 60} h {minutes % 60} min"


def directory_bytes(root: Path) -> int:
    """Bytes of the regular files below ``root``, without following symbolic links, also not
    a folder swapped for one mid-walk (see :class:`~nox_api.services.scanner.UsageWalk`)."""
    return walk_usage(root).bytes


class QuotaService:
    def __init__(self, db: Database, policy: PolicyStore, fresh_s: float = 1.0) -> None:
        self._db = db
        self._policy = policy
        # The run check reads today's counters at most once per ``fresh_s`` per workspace and
        # adds this server's own runs in between: a database read per run cost 0.5 ms under
        # load. Other servers' runs show within ``fresh_s``.
        self._fresh_s = fresh_s
        self._cache: dict[tuple[str, str], tuple[Usage, float]] = {}
        self._cache_lock = threading.Lock()
        # Runs admitted and not answered yet, per workspace: parallel runs of one workspace
        # each see the others, so together they cannot pass runs_per_day.
        self._running: dict[str, int] = {}
        self._admit_lock = threading.Lock()

    def _recent_usage(self, workspace: str) -> Usage:
        key = (workspace, utc_day())
        now = time.monotonic()
        with self._cache_lock:
            cached = self._cache.get(key)
        if cached is not None and now - cached[1] < self._fresh_s:
            return cached[0]
        used = self.usage(workspace, key[1])
        with self._cache_lock:
            if len(self._cache) > 4096:  # old days and idle workspaces
                self._cache.clear()
            self._cache[key] = (used, now)
        return used

    def _count_locally(self, workspace: str, runs: int, cpu_ms: float, upload_bytes: int) -> None:
        key = (workspace, utc_day())
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None:
                u, at = cached
                self._cache[key] = (
                    Usage(u.runs + runs, u.cpu_ms + cpu_ms, u.upload_bytes + upload_bytes),
                    at,
                )

    def forget_cached(self) -> None:
        """Drop the cached counters: the next check reads the database (after a restore)."""
        with self._cache_lock:
            self._cache.clear()

    def quota(self, workspace: str) -> WorkspaceQuota:
        return self._policy.current.quota_for(workspace)

    def usage(self, workspace: str, day: str | None = None) -> Usage:
        with self._db.connection() as conn:
            row = conn.execute(_USAGE, {"ws": workspace, "day": day or utc_day()}).first()
        return Usage() if row is None else Usage(int(row[0]), float(row[1]), int(row[2]))

    def reserve_run(self, workspace: str) -> None:
        """Admit one run of ``workspace`` or raise :class:`QuotaExceeded` when it has no run or
        CPU time left today. An admitted run counts against runs_per_day at once; end it with
        :meth:`count_run` (answered) or :meth:`release_run` (it never ran)."""
        quota = self.quota(workspace)
        with self._admit_lock:
            used = self._recent_usage(workspace)
            running = self._running.get(workspace, 0)
            if used.runs + running >= quota.runs_per_day:
                more = f" ({running} of them still running)" if running else ""
                raise QuotaExceeded(
                    f"workspace {workspace!r} has used {used.runs + running} of its "
                    f"{quota.runs_per_day} runs today{more}; 0 left, {_until_midnight()}",
                    headers=_retry(),
                )
            cpu_quota_ms = quota.cpu_seconds_per_day * 1000.0
            if used.cpu_ms >= cpu_quota_ms:
                raise QuotaExceeded(
                    f"workspace {workspace!r} has used {used.cpu_ms / 1000:.1f} of its "
                    f"{quota.cpu_seconds_per_day} CPU seconds today; 0 left, {_until_midnight()}",
                    headers=_retry(),
                )
            self._running[workspace] = running + 1

    def release_run(self, workspace: str) -> None:
        """An admitted run that did not run (the sandbox failed): it does not count."""
        with self._admit_lock:
            self._end_running(workspace)

    def _end_running(self, workspace: str) -> None:
        left = self._running.get(workspace, 0) - 1
        if left > 0:
            self._running[workspace] = left
        else:
            self._running.pop(workspace, None)

    def upload_refused(
        self, workspace: str, room: UploadRoom, size: int | None
    ) -> StorageQuotaExceeded | QuotaExceeded:
        """The error for an upload of ``size`` bytes (None: unknown) that does not fit."""
        quota = self.quota(workspace)
        wanted = "" if size is None else f" for more than {size / MIB:.1f} MiB"
        if room.storage_left <= room.upload_left:
            left = max(0, room.storage_left)
            stored = quota.storage_mib * MIB - room.storage_left
            return StorageQuotaExceeded(
                f"workspace {workspace!r} stores {stored / MIB:.1f} of its {quota.storage_mib} "
                f"MiB; {left / MIB:.1f} MiB left{wanted}: delete files first"
            )
        left = max(0, room.upload_left)
        uploaded = quota.upload_mib_per_day * MIB - room.upload_left
        return QuotaExceeded(
            f"workspace {workspace!r} has uploaded {uploaded / MIB:.1f} of its "
            f"{quota.upload_mib_per_day} MiB today; {left / MIB:.1f} MiB left{wanted}, "
            f"{_until_midnight()}",
            headers=_retry(),
        )

    def count_run(self, workspace: str, cpu_ms: float | None) -> None:
        """Count an admitted run, now finished, in this server's cached counters at once; its
        row in the database follows with :meth:`record_run`."""
        with self._admit_lock:
            self._count_locally(workspace, 1, cpu_ms or 0.0, 0)
            self._end_running(workspace)

    def record_run(self, session: Session, workspace: str, cpu_ms: float | None) -> None:
        self._add(session, workspace, runs=1, cpu_ms=cpu_ms or 0.0, upload_bytes=0)

    def record_upload(self, workspace: str, size: int) -> None:
        with self._db.session() as session:
            self._add(session, workspace, runs=0, cpu_ms=0.0, upload_bytes=size)

    def _add(
        self, session: Session, workspace: str, *, runs: int, cpu_ms: float, upload_bytes: int
    ) -> None:
        """Add to today's counters in one statement (no lost update between servers)."""
        values = {
            "workspace": workspace,
            "day": utc_day(),
            "runs": runs,
            "cpu_ms": cpu_ms,
            "upload_bytes": upload_bytes,
        }
        dialect = session.get_bind().dialect.name
        if dialect in {"sqlite", "postgresql"}:
            insert = sqlite_insert if dialect == "sqlite" else pg_insert
            stmt = insert(UsageRow).values(**values)
            stmt = stmt.on_conflict_do_update(
                index_elements=["workspace", "day"],
                set_={
                    "runs": UsageRow.runs + runs,
                    "cpu_ms": UsageRow.cpu_ms + cpu_ms,
                    "upload_bytes": UsageRow.upload_bytes + upload_bytes,
                },
            )
            session.execute(stmt)
            return
        row = session.scalar(
            select(UsageRow)
            .where(UsageRow.workspace == workspace, UsageRow.day == values["day"])
            .with_for_update()
        )
        if row is None:
            session.add(UsageRow(**values))
        else:
            row.runs += runs
            row.cpu_ms += cpu_ms
            row.upload_bytes += upload_bytes
