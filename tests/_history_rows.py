"""History rows written straight into the database (no sandbox), for the history, retention and
statistics tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from nox_api.storage.db import Database
from nox_api.storage.models import ExecutionRow

# A recent whole second: rows relative to it are never old enough for the default retention.
NOW = datetime.now(UTC).replace(microsecond=0)


def add_runs(db: Database, *runs: dict[str, Any]) -> None:
    """Write history rows: the fields given, plausible values elsewhere."""
    with db.session() as s:
        for fields in runs:
            row: dict[str, Any] = {
                "kind": "python",
                "status": "ok",
                "exit_code": 0,
                "stdout": "out",
                "stderr": "",
                "stdout_truncated": False,
                "stderr_truncated": False,
                "duration_ms": 1.0,
                "cpu_ms": 1.0,
                "started_at": NOW,
                "workspace": "default",
                "actor": "test",
                "code": "pass",
            }
            row.update(fields)
            s.add(ExecutionRow(**row))


def ids_in(db: Database, workspace: str | None = None) -> set[str]:
    """Ids of the runs in the history (of one workspace)."""
    with db.connection() as conn:
        stmt = select(ExecutionRow.id)
        if workspace is not None:
            stmt = stmt.where(ExecutionRow.workspace == workspace)
        return set(conn.execute(stmt).scalars())
