"""The server's side of the audit log: its checkpoint in the database, and :class:`Auditor`,
which turns "who did what, from where" into :class:`~nox_api.services.audit.AuditEvent` lines."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

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

__all__ = ["Auditor", "Caller", "DatabaseCheckpointStore", "code_sha256", "open_audit_log"]

log = logging.getLogger("nox.audit")


class DatabaseCheckpointStore:
    """The checkpoint (line count and last MAC) in the ``audit_checkpoint`` table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def load(self) -> Checkpoint | None:
        with self._db.session() as session:
            row = session.get(AuditCheckpointRow, 1)
            return None if row is None else Checkpoint(row.count, row.last_mac)

    def save(self, cp: Checkpoint) -> None:
        with self._db.session() as session:
            row = session.get(AuditCheckpointRow, 1)
            now = datetime.now(UTC)
            if row is None:
                session.add(AuditCheckpointRow(id=1, count=cp.count, last_mac=cp.last_mac,
                                               updated_at=now))  # fmt: skip
            else:
                row.count, row.last_mac, row.updated_at = cp.count, cp.last_mac, now


def open_audit_log(settings: Settings, db: Database) -> AuditLog:
    """The data folder's audit log with its key (``NOX_AUDIT_KEY`` or ``audit.key``)."""
    env_key = settings.audit_key.get_secret_value() if settings.audit_key else None
    key = load_or_create_key(settings.data_path, env_key)
    return AuditLog(
        settings.audit_dir,
        key,
        checkpoint=DatabaseCheckpointStore(db),
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
        try:
            self.log.append(event)
        except Exception:
            log.exception("could not write the audit event %s", action)
            raise

    def verify(self) -> VerifyReport:
        return self.log.verify()
