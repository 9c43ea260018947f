"""Reading the history of runs: pages of a workspace's runs, newest first, and one run in full.

A run's row is written just after its answer left (see
:meth:`~nox_api.services.executions.ExecutionService.settle`), so every read here first waits
for the rows not written yet: a client that reads right after a run sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, func, select

from nox_api.errors import InvalidRequest, NotFound
from nox_api.storage.db import Database
from nox_api.storage.models import ExecutionRow
from noxsdk.models import (
    EffectiveLimits,
    ExecutionDetail,
    ExecutionKind,
    ExecutionStatus,
    ExecutionSummary,
    HistoryPage,
)

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "HistoryFilter",
    "HistoryService",
    "MAX_OFFSET",
    "MAX_PAGE_SIZE",
    "parse_filter",
]

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 500
MAX_OFFSET = 1_000_000_000  # far beyond any history; keeps the number a database integer

_E = TypeVar("_E", ExecutionKind, ExecutionStatus)

# The columns of a list item: everything but the output bodies and the code.
_SUMMARY_COLUMNS = (
    ExecutionRow.id,
    ExecutionRow.kind,
    ExecutionRow.status,
    ExecutionRow.exit_code,
    ExecutionRow.stdout_truncated,
    ExecutionRow.stderr_truncated,
    ExecutionRow.duration_ms,
    ExecutionRow.cpu_ms,
    ExecutionRow.started_at,
    ExecutionRow.workspace,
    ExecutionRow.actor,
    ExecutionRow.request_id,
    ExecutionRow.limits,
)


@dataclass(frozen=True, slots=True)
class HistoryFilter:
    """Which runs of a workspace a page lists."""

    workspace: str
    kind: ExecutionKind | None = None
    status: ExecutionStatus | None = None


def _choice(enum: type[_E], name: str, value: str | None) -> _E | None:
    if value is None or value == "":
        return None
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum)
        raise InvalidRequest(f"unknown {name} {value[:40]!r}; use one of: {allowed}") from None


def parse_filter(workspace: str, kind: str | None, status: str | None) -> HistoryFilter:
    """The filter of ``?kind=&status=``: empty means any; an unknown value is a 400."""
    return HistoryFilter(
        workspace=workspace,
        kind=_choice(ExecutionKind, "kind", kind),
        status=_choice(ExecutionStatus, "status", status),
    )


def _summary_fields(row: Any) -> dict[str, Any]:
    """The fields of an :class:`ExecutionSummary` from a history row: an ``ExecutionRow`` or a
    result row of ``_SUMMARY_COLUMNS`` (the list never loads output bodies or code)."""
    return {
        "id": row.id,
        "kind": ExecutionKind(row.kind),
        "status": ExecutionStatus(row.status),
        "exit_code": row.exit_code,
        "stdout_truncated": row.stdout_truncated,
        "stderr_truncated": row.stderr_truncated,
        "duration_ms": row.duration_ms,
        "cpu_ms": row.cpu_ms,
        "started_at": row.started_at,
        "workspace": row.workspace,
        "actor": row.actor,
        "request_id": row.request_id,
        "limits": _limits(row.limits),
    }


def _limits(value: dict[str, Any] | None) -> EffectiveLimits | None:
    return EffectiveLimits.model_validate(value) if value else None


class HistoryService:
    def __init__(self, db: Database, settle: Callable[[], None]) -> None:
        self._db = db
        self._settle = settle  # waits for answered runs whose rows are not written yet

    def page(self, where: HistoryFilter, limit: int, offset: int) -> HistoryPage:
        """Runs matching ``where``, newest first (start time, then id, both descending)."""
        if not 1 <= limit <= MAX_PAGE_SIZE or not 0 <= offset <= MAX_OFFSET:
            raise InvalidRequest(f"limit must be 1 to {MAX_PAGE_SIZE} and offset 0 to {MAX_OFFSET}")
        conditions: list[ColumnElement[bool]] = [ExecutionRow.workspace == where.workspace]
        if where.kind is not None:
            conditions.append(ExecutionRow.kind == where.kind.value)
        if where.status is not None:
            conditions.append(ExecutionRow.status == where.status.value)
        self._settle()
        with self._db.connection() as conn:
            total = conn.execute(
                select(func.count()).select_from(ExecutionRow).where(*conditions)
            ).scalar_one()
            rows = conn.execute(
                select(*_SUMMARY_COLUMNS)
                .where(*conditions)
                .order_by(ExecutionRow.started_at.desc(), ExecutionRow.id.desc())
                .limit(limit)
                .offset(offset)
            ).all()
        items = [ExecutionSummary(**_summary_fields(row)) for row in rows]
        return HistoryPage(items=items, total=int(total))

    def get(self, execution_id: str, workspace: str | None) -> ExecutionDetail:
        """One run with its output and code. ``workspace`` None: any workspace (admins); a run of
        another workspace is "not found", exactly like a run that does not exist."""
        self._settle()
        with self._db.session() as session:
            # No id holds a NUL, which PostgreSQL refuses even as a query's parameter.
            row = None if "\x00" in execution_id else session.get(ExecutionRow, execution_id[:64])
            if row is None or (workspace is not None and row.workspace != workspace):
                raise NotFound(f"no run {execution_id[:64]!r} in the history")
            return ExecutionDetail(
                **_summary_fields(row), stdout=row.stdout, stderr=row.stderr, code=row.code
            )
