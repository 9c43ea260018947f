"""``GET /api/history`` and ``GET /api/history/{id}``: the runs of a workspace.

A page lists runs newest first without their output or code; one run comes in full. Tokens see
their own workspace's runs; an admin pages through another with ``?workspace=`` and reads any
run by its id. A run of another workspace is 404 for everyone else, as if it did not exist.
The handlers are plain ``def``: the reads wait for runs whose rows are still being written.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from nox_api.deps import NoxDep, Reader, WorkspaceParam, target_workspace
from nox_api.services.history import (
    DEFAULT_PAGE_SIZE,
    MAX_OFFSET,
    MAX_PAGE_SIZE,
    parse_filter,
)
from nox_api.services.tokens import Role
from noxsdk.models import ExecutionDetail, ExecutionKind, ExecutionStatus, HistoryPage

router = APIRouter(tags=["history"])

_ERRORS: dict[int | str, dict[str, str]] = {
    401: {"description": "Missing or unknown token"},
    429: {"description": "Rate limit reached"},
}


@router.get(
    "/api/history",
    response_model=HistoryPage,
    summary="Runs of the workspace, newest first (without output or code)",
    responses={
        **_ERRORS,
        400: {"description": "Unknown kind or status"},
        403: {"description": "A non-admin token named another workspace"},
        422: {"description": "limit or offset out of range"},
    },
)
def list_history(
    nox: NoxDep,
    caller: Reader,
    *,
    limit: Annotated[
        int, Query(ge=1, le=MAX_PAGE_SIZE, description="Runs per page.")
    ] = DEFAULT_PAGE_SIZE,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Runs to skip.")] = 0,
    kind: Annotated[
        str | None,
        Query(
            description="Only runs of this kind (empty: any).",
            json_schema_extra={"enum": [k.value for k in ExecutionKind]},
        ),
    ] = None,
    status: Annotated[
        str | None,
        Query(
            description="Only runs that ended this way (empty: any).",
            json_schema_extra={"enum": [s.value for s in ExecutionStatus]},
        ),
    ] = None,
    workspace: WorkspaceParam = None,
) -> HistoryPage:
    where = parse_filter(target_workspace(caller, workspace), kind, status)
    return nox.history.page(where, limit, offset)


@router.get(
    "/api/history/{execution_id}",
    response_model=ExecutionDetail,
    summary="One run with its output and code",
    responses={**_ERRORS, 404: {"description": "No such run in the caller's workspace"}},
)
def get_history(execution_id: str, nox: NoxDep, caller: Reader) -> ExecutionDetail:
    principal = caller.principal
    assert principal is not None  # noqa: S101
    scope = None if principal.role is Role.ADMIN else principal.workspace
    return nox.history.get(execution_id, scope)
