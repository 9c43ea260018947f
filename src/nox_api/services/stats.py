"""Statistics of ``GET /api/system/stats``, computed from the database: runs by status and kind,
runs of the last 24 hours, mean and 95th percentile duration (in SQL: an ``ORDER BY ... OFFSET``,
never every row loaded), and what the workspaces store (the ``workspace_storage`` table that
:class:`~nox_api.services.scanner.StorageScanner` keeps, never a walk of the disk per request).

:meth:`StatsService.mark_dirty` is how the rest of the server says a workspace may have changed
on disk (after a run, an upload, a file written or deleted).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, Connection, func, select

from nox_api._version import __version__
from nox_api.engine.base import BackendInfo
from nox_api.services.scanner import StorageScanner
from nox_api.storage.db import Database
from nox_api.storage.models import ExecutionRow, WorkspaceStorageRow
from noxsdk.models import (
    ExecutionKind,
    ExecutionStats,
    ExecutionStatus,
    FileStats,
    SandboxBackend,
    SystemStats,
)

__all__ = ["StatsService", "nearest_rank"]

PERCENTILE = 95


def nearest_rank(count: int, percentile: float) -> int:
    """The 1-based rank of the ``percentile`` in ``count`` sorted values (nearest-rank
    method: the smallest value with at least ``percentile`` % of the values at or below it)."""
    return max(1, math.ceil(percentile / 100 * count))


class StatsService:
    def __init__(
        self,
        db: Database,
        scanner: StorageScanner,
        *,
        settle: Callable[[], None],
        sandbox_info: Callable[[], BackendInfo],
        started: float | None = None,
    ) -> None:
        self._db = db
        self.scanner = scanner
        self._settle = settle  # waits for answered runs whose rows are not written yet
        self._sandbox_info = sandbox_info
        self._started = time.monotonic() if started is None else started

    def start(self) -> None:
        self.scanner.start()

    def close(self) -> None:
        self.scanner.close()

    def mark_dirty(self, workspace: str) -> None:
        """``workspace`` may have changed on disk; its file count is rescanned about a second
        later. Cheap, never blocks: call it after anything that writes or deletes files."""
        self.scanner.mark_dirty(workspace)

    def mark_all_dirty(self) -> None:
        """Every workspace may have changed (after a restore): rescan them all."""
        self.scanner.mark_all()

    def storage_by_workspace(self) -> list[tuple[str, int]]:
        """(workspace, bytes) as the last scans found, for the metrics; no disk walk."""
        stmt = select(WorkspaceStorageRow.workspace, WorkspaceStorageRow.bytes)
        with self._db.connection() as conn:
            return [(str(ws), int(size)) for ws, size in conn.execute(stmt)]

    def stats(self, workspace: str | None) -> SystemStats:
        """Statistics of ``workspace``, or of every workspace when None."""
        self._settle()
        info = self._sandbox_info()
        with self._db.connection() as conn:
            executions = self._executions(conn, workspace)
            files = self._files(conn, workspace)
        return SystemStats(
            workspace=workspace,
            executions=executions,
            files=files,
            uptime_s=round(time.monotonic() - self._started, 3),
            version=__version__,
            sandbox=SandboxBackend(
                name=info.name, isolation=info.isolation, available=info.available
            ),
        )

    def _executions(self, conn: Connection, workspace: str | None) -> ExecutionStats:
        where: list[ColumnElement[bool]] = []
        if workspace is not None:
            where.append(ExecutionRow.workspace == workspace)
        by_status = {s.value: 0 for s in ExecutionStatus}
        for status, count in conn.execute(
            select(ExecutionRow.status, func.count()).where(*where).group_by(ExecutionRow.status)
        ):
            by_status[status] = by_status.get(status, 0) + int(count)
        by_kind = {k.value: 0 for k in ExecutionKind}
        for kind, count in conn.execute(
            select(ExecutionRow.kind, func.count()).where(*where).group_by(ExecutionRow.kind)
        ):
            by_kind[kind] = by_kind.get(kind, 0) + int(count)
        total = sum(by_status.values())
        since = datetime.now(UTC) - timedelta(hours=24)
        last_24h = conn.execute(
            select(func.count())
            .select_from(ExecutionRow)
            .where(*where, ExecutionRow.started_at >= since)
        ).scalar_one()
        mean = conn.execute(select(func.avg(ExecutionRow.duration_ms)).where(*where)).scalar()
        p95 = None
        if total:
            p95 = conn.execute(
                select(ExecutionRow.duration_ms)
                .where(*where)
                .order_by(ExecutionRow.duration_ms)
                .offset(nearest_rank(total, PERCENTILE) - 1)
                .limit(1)
            ).scalar()
            if p95 is None:  # retention removed runs between the two reads
                p95 = conn.execute(
                    select(func.max(ExecutionRow.duration_ms)).where(*where)
                ).scalar()
        return ExecutionStats(
            total=total,
            by_status=by_status,
            by_kind=by_kind,
            last_24h=int(last_24h),
            mean_duration_ms=None if mean is None else round(float(mean), 3),
            p95_duration_ms=None if p95 is None else float(p95),
        )

    def _files(self, conn: Connection, workspace: str | None) -> FileStats:
        stmt = select(
            func.count(),
            func.coalesce(func.sum(WorkspaceStorageRow.files), 0),
            func.coalesce(func.sum(WorkspaceStorageRow.bytes), 0),
            func.min(WorkspaceStorageRow.scanned_at),
        )
        if workspace is not None:
            stmt = stmt.where(WorkspaceStorageRow.workspace == workspace)
        workspaces, files, size, scanned_at = conn.execute(stmt).one()
        return FileStats(
            count=int(files),
            bytes=int(size),
            workspaces=int(workspaces),
            scanned_at=scanned_at,
        )
