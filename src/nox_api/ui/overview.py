"""What the dashboard's home page counts that the stats API does not: today's runs by status."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import ColumnElement, func, select

from nox_api.state import Nox
from nox_api.storage.models import ExecutionRow
from noxsdk.models import ExecutionStatus

__all__ = ["runs_today"]


def runs_today(nox: Nox, workspace: str | None) -> dict[str, int]:
    """Runs started since 00:00 UTC today, by status (every status, zeros included), in
    ``workspace`` or, with None, in every workspace."""
    nox.executions.settle()  # runs answered before this request are counted
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    where: list[ColumnElement[bool]] = [ExecutionRow.started_at >= midnight]
    if workspace is not None:
        where.append(ExecutionRow.workspace == workspace)
    counts = {status.value: 0 for status in ExecutionStatus}
    with nox.db.connection() as conn:
        rows = conn.execute(
            select(ExecutionRow.status, func.count()).where(*where).group_by(ExecutionRow.status)
        )
        for status, count in rows:
            counts[status] = counts.get(status, 0) + int(count)
    return counts
