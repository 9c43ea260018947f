"""The server's side of the audit log: its checkpoint in the database, and :class:`Auditor`,
which turns "who did what, from where" into :class:`~nox_api.services.audit.AuditEvent` lines."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update

from nox_api.config import Settings
from nox_api.services.audit import (
    AuditEvent,
    AuditLog,
    Checkpoint,
    VerifyReport,
    load_or_create_key,
)
from nox_api.services.tokens import Principal
from nox_api.storage.db import Database
from nox_api.storage.models import AuditCheckpointRow

__all__ = [
    "Auditor",
    "Caller",
    "DatabaseCheckpointStore",
    "audit_key",
    "code_sha256",
    "open_audit_log",
]

log = logging.getLogger("nox.audit")


class DatabaseCheckpointStore:
    """The checkpoint (line count and last MAC) in the ``audit_checkpoint`` table.

    ``save`` only hands the newest checkpoint to a writer thread, which stores it within
    ``delay_s``: a database write per audited request would double the audit's cost. The log may
    run ahead of its checkpoint (verification allows that); :meth:`flush` writes it at once.
    """

    def __init__(self, db: Database, *, background: bool = True, delay_s: float = 0.05) -> None:
        self._db = db
        self._delay_s = delay_s
        self._background = background
        self._pending: Checkpoint | None = None
        self._in_flight: Checkpoint | None = None  # being written: not in the table yet
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None

    def load(self) -> Checkpoint | None:
        with self._cond:
            newest = self._pending or self._in_flight
            if newest is not None:
                return newest
        with self._db.session() as session:
            row = session.execute(
                select(AuditCheckpointRow.count, AuditCheckpointRow.last_mac).where(
                    AuditCheckpointRow.id == 1
                )
            ).first()
            return None if row is None else Checkpoint(int(row[0]), str(row[1]))

    def save(self, cp: Checkpoint) -> None:
        if not self._background:
            self._write(cp)
            return
        with self._cond:
            self._pending = cp
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._write_loop, name="nox-audit-checkpoint", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        if self._closed:
            self.flush()

    def flush(self) -> None:
        """Write the newest checkpoint now (after a write the writer thread has under way)."""
        with self._write_lock:
            with self._cond:
                cp, self._pending = self._pending, None
                self._in_flight = cp
            if cp is None:
                return
            try:
                self._write(cp)
            except BaseException:
                with self._cond:  # kept for the next try unless a newer one came meanwhile
                    self._pending = self._pending or cp
                raise
            finally:
                with self._cond:
                    self._in_flight = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            time.sleep(self._delay_s)  # let a burst of appends share one write
            try:
                self.flush()
            except Exception:
                log.exception("could not store the audit checkpoint")

    def _write(self, cp: Checkpoint) -> None:
        now = datetime.now(UTC)
        with self._db.session() as session:
            updated = session.execute(
                update(AuditCheckpointRow)
                .where(AuditCheckpointRow.id == 1, AuditCheckpointRow.count <= cp.count)
                .values(count=cp.count, last_mac=cp.last_mac, updated_at=now)
            )
            if not getattr(updated, "rowcount", 0):
                exists = session.execute(
                    select(AuditCheckpointRow.id).where(AuditCheckpointRow.id == 1)
                ).first()
                if exists is None:
                    session.add(
                        AuditCheckpointRow(
                            id=1, count=cp.count, last_mac=cp.last_mac, updated_at=now
                        )
                    )


def audit_key(settings: Settings) -> bytes:
    """The audit log's key: ``NOX_AUDIT_KEY``, or ``audit.key`` in the data folder."""
    env_key = settings.audit_key.get_secret_value() if settings.audit_key else None
    return load_or_create_key(settings.data_path, env_key)


def open_audit_log(settings: Settings, db: Database, *, background: bool = False) -> AuditLog:
    """The data folder's audit log with its key (``NOX_AUDIT_KEY`` or ``audit.key``); the
    server stores checkpoints in the ``background``, the command line at once."""
    return AuditLog(
        settings.audit_dir,
        audit_key(settings),
        checkpoint=DatabaseCheckpointStore(db, background=background),
        max_bytes=settings.audit_max_bytes,
    )


def code_sha256(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks, from where, in which request: what the audit log records of a request."""

    principal: Principal | None = None
    client: str | None = None
    request_id: str | None = None


class Auditor:
    """Records events; an event that cannot be written is logged loudly and raised: a
    security-relevant action must not happen unrecorded."""

    def __init__(self, audit_log: AuditLog) -> None:
        self.log = audit_log
        self.observers: list[Callable[[AuditEvent], None]] = []  # told of each written event
        # Called before each record: the server makes it wait for the records of runs already
        # answered (written just after their answers), so the log's order follows what the
        # clients saw. See ExecutionService.audit_barrier.
        self.barrier: Callable[[], None] | None = None

    def record(
        self,
        action: str,
        caller: Caller | None,
        *,
        outcome: str = "ok",
        workspace: str | None = None,
        target: str | None = None,
        **details: Any,
    ) -> None:
        caller = caller or Caller()
        principal = caller.principal
        event = AuditEvent(
            action=action,
            outcome=outcome,
            actor_id=principal.id if principal else None,
            actor_name=principal.name if principal else None,
            role=principal.role.value if principal else None,
            workspace=workspace or (principal.workspace if principal else None),
            target=target,
            client=caller.client,
            request_id=caller.request_id,
            details=details,
        )
        if self.barrier is not None:
            self.barrier()
        try:
            self.log.append(event)
        except Exception:
            log.exception("could not write the audit event %s", action)
            raise
        for observe in self.observers:
            observe(event)

    def verify(self) -> VerifyReport:
        return self.log.verify()

    def flush_checkpoint(self) -> None:
        """Store the newest checkpoint now (before the database is copied, say)."""
        store = self.log.checkpoint_store
        if isinstance(store, DatabaseCheckpointStore):
            store.flush()

    @contextmanager
    def suspended(self, reload_key: Callable[[], bytes] | None = None) -> Iterator[None]:
        """Hold every append while the audit folder and the database (its checkpoint) are
        replaced; on exit the log reopens and goes on with the chain it finds (see
        :meth:`AuditLog.suspended`). No checkpoint of the old chain is left pending: it would
        overwrite the restored one."""
        with self.log.suspended(reload_key):
            self.flush_checkpoint()
            yield

    def close(self) -> None:
        """Close the log and store its newest checkpoint."""
        self.log.close()
        store = self.log.checkpoint_store
        if isinstance(store, DatabaseCheckpointStore):
            store.close()
