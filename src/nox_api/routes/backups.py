"""Encrypted backups of the data folder: create, list, restore (admin only).

The work is blocking (files, SQLite, AES): the handlers are ``def`` and run in worker threads.
One backup or restore runs at a time per data folder; another one meanwhile gets 409.
"""

from __future__ import annotations

from fastapi import APIRouter, status

from nox_api.deps import Admin, NoxDep
from nox_api.services.backups import StoredBackup
from noxsdk.models import BackupCreate, BackupInfo, BackupList, BackupRestored, RestoredCounts

router = APIRouter(tags=["backups"])

_ERRORS: dict[int | str, dict[str, str]] = {
    400: {"description": "Bad name, no backup key configured, or a database that is not SQLite"},
    401: {"description": "Missing or unknown token"},
    403: {"description": "Not an admin token"},
    409: {"description": "The name exists, or another backup or restore is running"},
    429: {"description": "Rate limit reached"},
}


def _info(stored: StoredBackup) -> BackupInfo:
    return BackupInfo(
        name=stored.name, size=stored.size, created_at=stored.created_at, sha256=stored.sha256
    )


@router.post(
    "/api/backups",
    status_code=status.HTTP_201_CREATED,
    response_model=BackupInfo,
    responses=_ERRORS,
    summary="Back up the data folder into one encrypted file",
)
def create_backup(body: BackupCreate, nox: NoxDep, caller: Admin) -> BackupInfo:
    """The database, the audit log and every workspace, as ``<name>.noxbak`` in the backups
    folder (AES-256-GCM under ``NOX_BACKUP_KEY`` or ``NOX_BACKUP_PASSPHRASE``)."""
    return _info(nox.backups.create(body.name, caller))


@router.get(
    "/api/backups",
    response_model=BackupList,
    responses=_ERRORS,
    summary="List the backups, newest first",
)
def list_backups(nox: NoxDep, caller: Admin) -> BackupList:
    return BackupList(items=[_info(stored) for stored in nox.backups.list_all()])


@router.post(
    "/api/backups/{name}/restore",
    response_model=BackupRestored,
    responses={
        **_ERRORS,
        400: {"description": "Bad name, no key, wrong key, or a damaged or unsafe backup"},
        404: {"description": "No such backup"},
    },
    summary="Restore a backup (after an automatic backup of the present state)",
)
def restore_backup(name: str, nox: NoxDep, caller: Admin) -> BackupRestored:
    """Checks the whole backup first; nothing changes when it is damaged, truncated, under
    another key or holds anything unsafe. Runs going on while it swaps keep the folders they
    started with; their results are not part of the restored state."""
    result = nox.backups.restore(name, caller)
    return BackupRestored(
        restored=RestoredCounts.model_validate(result.counts), pre_restore=result.pre_restore
    )
