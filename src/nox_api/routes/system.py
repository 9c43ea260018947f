"""``GET /api/system/stats`` and ``GET /api/system/resources``.

Statistics come from the database (runs) and the table the storage scanner keeps (files), never
from a walk of the disk on request. A non-admin token sees its own workspace; an admin sees
every workspace unless ``?workspace=`` narrows it. Resources describe the whole machine.
"""

from __future__ import annotations

from fastapi import APIRouter

from nox_api.deps import NoxDep, Reader, WorkspaceParam, target_workspace
from nox_api.services.tokens import Role
from noxsdk.models import SystemResources, SystemStats

router = APIRouter(tags=["system"])

_ERRORS: dict[int | str, dict[str, str]] = {
    401: {"description": "Missing or unknown token"},
    429: {"description": "Rate limit reached"},
}


@router.get(
    "/api/system/stats",
    response_model=SystemStats,
    summary="Run and file statistics (the token's workspace; admins: all or ?workspace=)",
    responses={**_ERRORS, 403: {"description": "A non-admin token named another workspace"}},
)
def system_stats(nox: NoxDep, caller: Reader, workspace: WorkspaceParam = None) -> SystemStats:
    principal = caller.principal
    assert principal is not None  # noqa: S101
    if principal.role is Role.ADMIN and workspace is None:
        return nox.stats.stats(None)
    return nox.stats.stats(target_workspace(caller, workspace))


@router.get(
    "/api/system/resources",
    response_model=SystemResources,
    summary="CPU, load, memory, the data folder's disk and the server's cgroup limits",
    responses=_ERRORS,
)
def system_resources(nox: NoxDep, caller: Reader) -> SystemResources:
    return nox.system.resources()
