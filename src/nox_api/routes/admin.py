"""Identity and administration: ``/api/me``, tokens, the audit log and the policy.

Every route declares its permission through its caller dependency (``Reader`` or ``Admin``).
Blocking work (database, audit file) runs in FastAPI's worker threads: the handlers are ``def``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response, status

from nox_api.deps import Admin, NoxDep, Reader, WorkspaceParam, target_workspace
from nox_api.errors import NotFound
from nox_api.services.tokens import DEFAULT_WORKSPACE, Role, TokenInfo
from nox_api.state import Nox
from noxsdk.models import (
    AuditEntry,
    AuditList,
    AuditVerify,
    Me,
    TokenCreate,
    TokenCreated,
    TokenItem,
    TokenList,
    TokenRole,
)

router = APIRouter(tags=["identity and administration"])

_ADMIN_ERRORS: dict[int | str, dict[str, str]] = {
    401: {"description": "Missing or unknown token"},
    403: {"description": "Not an admin token"},
    429: {"description": "Rate limit reached"},
}


def _item(info: TokenInfo) -> TokenItem:
    return TokenItem(
        id=info.id,
        name=info.name,
        role=TokenRole(info.role.value),
        workspace=info.workspace,
        created_at=info.created_at,
        expires_at=info.expires_at,
        revoked_at=info.revoked_at,
        active=info.active,
    )


@router.get("/api/me", response_model=Me, summary="Who this token is")
def me(caller: Reader) -> Me:
    p = caller.principal
    assert p is not None  # noqa: S101
    return Me(id=p.id, name=p.name, role=TokenRole(p.role.value), workspace=p.workspace)


@router.post(
    "/api/tokens",
    status_code=status.HTTP_201_CREATED,
    response_model=TokenCreated,
    responses=_ADMIN_ERRORS,
    summary="Create a token (its secret is shown this once only)",
)
def create_token(body: TokenCreate, nox: NoxDep, caller: Admin) -> TokenCreated:
    issued = nox.tokens.create(
        body.name, Role(body.role.value), body.workspace or DEFAULT_WORKSPACE, body.expires_in_days
    )
    p = issued.principal
    nox.auditor.record(
        "token.create", caller, workspace=p.workspace, target=p.id, name=p.name,
        role=p.role.value, expires_at=issued.expires_at.isoformat() if issued.expires_at else None,
    )  # fmt: skip
    return TokenCreated(
        id=p.id,
        name=p.name,
        role=TokenRole(p.role.value),
        workspace=p.workspace,
        token=issued.secret,
        created_at=issued.created_at,
        expires_at=issued.expires_at,
    )


@router.get("/api/tokens", response_model=TokenList, responses=_ADMIN_ERRORS, summary="List tokens")
def list_tokens(nox: NoxDep, caller: Admin, workspace: WorkspaceParam = None) -> TokenList:
    """All tokens, newest first; ``?workspace=`` narrows to one workspace."""
    return TokenList(items=[_item(info) for info in nox.tokens.list(workspace)])


@router.delete(
    "/api/tokens/{token_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={**_ADMIN_ERRORS, 404: {"description": "No such token"}},
    summary="Revoke a token; it stops working at once",
)
def revoke_token(token_id: str, nox: NoxDep, caller: Admin) -> None:
    # Returns None, not a Response: FastAPI drops the headers a dependency set (X-RateLimit-*)
    # from a Response the handler builds itself.
    try:
        info = nox.tokens.revoke(token_id)
    except NotFound:
        nox.auditor.record("token.revoke", caller, outcome="failed", target=token_id[:64])
        raise
    nox.auditor.record(
        "token.revoke", caller, workspace=info.workspace, target=info.id, name=info.name
    )


@router.get(
    "/api/audit",
    response_model=AuditList,
    responses=_ADMIN_ERRORS,
    summary="Audit log entries, newest first",
)
def audit_entries(
    nox: NoxDep,
    caller: Admin,
    *,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    action: Annotated[str | None, Query(max_length=64)] = None,
    actor: Annotated[str | None, Query(max_length=128, description="name or id")] = None,
    workspace: WorkspaceParam = None,
) -> AuditList:
    if workspace is not None:
        target_workspace(caller, workspace)  # validates the name
    nox.executions.settle()  # runs answered before this request are in the log
    entries = nox.auditor.log.query(limit, action=action, actor=actor, workspace=workspace)
    return AuditList(items=[AuditEntry.model_validate(entry) for entry in entries])


@router.get(
    "/api/audit/verify",
    response_model=AuditVerify,
    responses=_ADMIN_ERRORS,
    summary="Check the audit log's MAC chain and checkpoint",
)
def audit_verify(nox: NoxDep, caller: Admin) -> AuditVerify:
    nox.executions.settle()
    report = nox.auditor.verify()
    return AuditVerify(
        ok=report.ok,
        entries=report.entries,
        first_bad_line=report.first_bad_line,
        reason=report.reason,
        file=report.file,
    )


_POLICY_HEADERS = (
    "The effective policy as JSON; headers X-Nox-Policy-SHA256 (of the file's text), "
    "X-Nox-Policy-Loaded-At and X-Nox-Policy-Source say which file and when."
)


@router.get(
    "/api/policy",
    responses=_ADMIN_ERRORS,
    summary="The effective policy",
    description=_POLICY_HEADERS,
    response_model=None,
)
def get_policy(nox: NoxDep, caller: Admin, response: Response) -> dict[str, Any]:
    return _policy_answer(nox, response)


@router.post(
    "/api/policy/reload",
    responses={**_ADMIN_ERRORS, 400: {"description": "Invalid file; the old policy stays"}},
    summary="Reload the policy file",
    description=_POLICY_HEADERS,
    response_model=None,
)
def reload_policy(nox: NoxDep, caller: Admin, response: Response) -> dict[str, Any]:
    nox.reload_policy(caller)
    return _policy_answer(nox, response)


def _policy_answer(nox: Nox, response: Response) -> dict[str, Any]:
    store = nox.policy
    response.headers["X-Nox-Policy-SHA256"] = store.source_sha256
    response.headers["X-Nox-Policy-Loaded-At"] = store.loaded_at.isoformat()
    response.headers["X-Nox-Policy-Source"] = store.path.name
    return store.current.to_public_dict()
