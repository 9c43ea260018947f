"""History retention: a background thread deletes runs older than ``history_keep_days`` and
runs beyond the newest ``history_keep_runs`` of each workspace (0 turns a rule off), every
``retention_interval_s`` seconds, the first pass a minute after start (sooner when the interval
is shorter: out of the way of start-up, yet soon after it).

Deletes go in small batches, one short write transaction each with a pause in between, so runs
finishing meanwhile never wait long for the database. What a pass removed goes to the log.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, and_, delete, func, or_, select

from nox_api.storage.db import Database
from nox_api.storage.models import ExecutionRow

__all__ = ["Retention", "RetentionReport"]

log = logging.getLogger("nox.retention")


@dataclass(frozen=True, slots=True)
class RetentionReport:
    """What one pass removed."""

    by_age: int = 0
    by_count: int = 0

    @property
    def removed(self) -> int:
        return self.by_age + self.by_count


class Retention:
    def __init__(
        self,
        db: Database,
        *,
        keep_runs: int,
        keep_days: float,
        interval_s: float,
        batch_rows: int = 500,
        pause_s: float = 0.01,
        first_delay_s: float = 60.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._db = db
        self.keep_runs = keep_runs
        self.keep_days = keep_days
        self.interval_s = interval_s
        self._batch_rows = batch_rows
        self._pause_s = pause_s
        self._first_delay_s = first_delay_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pass_lock = threading.Lock()  # one pass at a time (thread and run_once)

    def start(self) -> None:
        """Start the background thread: a pass after ``min(first_delay_s, interval_s)``, then
        one every ``interval_s``."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="nox-retention", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread; a pass in progress stops after its current batch."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        wait = min(self._first_delay_s, self.interval_s)
        while not self._stop.wait(wait):
            try:
                self.run_once()
            except Exception:  # a failed pass must not end retention for good
                log.exception("history retention pass failed")
            wait = self.interval_s

    def run_once(self) -> RetentionReport:
        """One pass of both rules; returns (and logs) what it removed."""
        with self._pass_lock:
            by_age = self._by_age() if self.keep_days > 0 else 0
            by_count = self._by_count() if self.keep_runs > 0 else 0
        report = RetentionReport(by_age=by_age, by_count=by_count)
        if report.removed:
            log.info(
                "history retention removed %d run(s): %d older than %g days, %d beyond the "
                "newest %d of their workspace",
                report.removed, by_age, self.keep_days, by_count, self.keep_runs,
            )  # fmt: skip
        else:
            log.debug("history retention: nothing to remove")
        return report

    def _by_age(self) -> int:
        cutoff = self._clock() - timedelta(days=self.keep_days)
        return self._delete_batches(ExecutionRow.started_at < cutoff)

    def _by_count(self) -> int:
        with self._db.connection() as conn:
            crowded = conn.execute(
                select(ExecutionRow.workspace)
                .group_by(ExecutionRow.workspace)
                .having(func.count() > self.keep_runs)
            ).scalars().all()  # fmt: skip
        removed = 0
        for workspace in crowded:
            if self._stop.is_set():
                break
            removed += self._trim(workspace)
        return removed

    def _trim(self, workspace: str) -> int:
        """Delete the runs of ``workspace`` past its newest ``keep_runs``. The first run to go
        is found once; runs that finish meanwhile are newer and stay."""
        with self._db.connection() as conn:
            first_gone = conn.execute(
                select(ExecutionRow.started_at, ExecutionRow.id)
                .where(ExecutionRow.workspace == workspace)
                .order_by(ExecutionRow.started_at.desc(), ExecutionRow.id.desc())
                .offset(self.keep_runs)
                .limit(1)
            ).first()
        if first_gone is None:
            return 0
        started, run_id = first_gone
        return self._delete_batches(
            and_(
                ExecutionRow.workspace == workspace,
                or_(
                    ExecutionRow.started_at < started,
                    and_(ExecutionRow.started_at == started, ExecutionRow.id <= run_id),
                ),
            )
        )

    def _delete_batches(self, where: ColumnElement[bool]) -> int:
        """Delete the rows matching ``where``, ``batch_rows`` per transaction."""
        removed = 0
        while not self._stop.is_set():
            batch = select(ExecutionRow.id).where(where).limit(self._batch_rows)
            with self._db.engine.begin() as conn:
                count = conn.execute(
                    delete(ExecutionRow).where(ExecutionRow.id.in_(batch))
                ).rowcount
            removed += count
            if count < self._batch_rows:
                break
            self._stop.wait(self._pause_s)  # let other writers have the database
        return removed
