"""The admin pages: tokens (create, with the secret shown once; list; revoke), the audit log with
its verify result, backups (create, list, restore with confirmation) and the policy (view,
reload). Admins only.

Each action calls what the API's handler calls (for tokens and the audit log the handler
itself), so the records in the audit log are the same whichever way an admin went.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from nox_api.deps import NoxDep
from nox_api.errors import InvalidRequest, NoxError
from nox_api.routes import admin as api_admin
from nox_api.state import Nox
from nox_api.ui.access import AdminUser, User
from nox_api.ui.render import is_htmx, render
from nox_api.ui.routing import UiRoute
from noxsdk.models import TokenCreate, TokenCreated, TokenRole

__all__ = ["router"]

router = APIRouter(route_class=UiRoute, include_in_schema=False)

_AUDIT_PAGE = 100  # entries the audit page shows (the API's default page)


def _invalid(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return InvalidRequest(f"{where}: {message}" if where else message)


# -- tokens -------------------------------------------------------------------------------------


def _tokens(
    request: Request,
    nox: Nox,
    user: User,
    *,
    created: TokenCreated | None = None,
    error: str | None = None,
    notice: str | None = None,
    status: int = 200,
) -> Response:
    context: dict[str, Any] = {
        "tokens": api_admin.list_tokens(nox, user.caller).items,
        "roles": [role.value for role in TokenRole],
        "created": created,
        "error": error,
        "notice": notice,
    }
    template = "_tokens.html" if is_htmx(request) else "admin_tokens.html"
    return render(request, template, user, nav="admin", tab="tokens", status=status, **context)


@router.get("/ui/admin")
def admin_home(user: AdminUser) -> Response:
    return RedirectResponse("/ui/admin/tokens", status_code=303)


@router.get("/ui/admin/tokens")
def tokens_page(request: Request, nox: NoxDep, user: AdminUser) -> Response:
    return _tokens(request, nox, user)


@router.post("/ui/admin/tokens")
def create_token(
    request: Request,
    nox: NoxDep,
    user: AdminUser,
    *,
    name: Annotated[str, Form(max_length=128)],
    role: Annotated[str, Form(max_length=20)],
    workspace: Annotated[str, Form(max_length=63)] = "",
    expires_in_days: Annotated[str, Form(max_length=8)] = "",
) -> Response:
    """``POST /api/tokens`` from a form: the answer shows the new secret this once."""
    try:
        body = TokenCreate.model_validate(
            {
                "name": name.strip(),
                "role": role,
                "workspace": workspace.strip() or None,
                "expires_in_days": expires_in_days.strip() or None,
            }
        )
    except ValidationError as exc:
        return _tokens(request, nox, user, error=_invalid(exc).message, status=400)
    try:
        created = api_admin.create_token(body, nox, user.caller)
    except NoxError as exc:
        return _tokens(request, nox, user, error=exc.message, status=exc.status)
    return _tokens(request, nox, user, created=created, status=201 if is_htmx(request) else 200)


@router.post("/ui/admin/tokens/{token_id}/revoke")
def revoke_token(request: Request, nox: NoxDep, user: AdminUser, token_id: str) -> Response:
    """``DELETE /api/tokens/{id}`` from a button: the token stops working at once."""
    api_admin.revoke_token(token_id, nox, user.caller)
    info = nox.tokens.get(token_id)
    name = info.name if info is not None else token_id
    return _tokens(request, nox, user, notice=f"Revoked {name}.")


# -- audit --------------------------------------------------------------------------------------


@router.get("/ui/admin/audit")
def audit_page(
    request: Request,
    nox: NoxDep,
    user: AdminUser,
    action: Annotated[str, Query(max_length=64)] = "",
    actor: Annotated[str, Query(max_length=128)] = "",
) -> Response:
    """The newest entries (filtered by action and actor) and the chain's verification."""
    entries = api_admin.audit_entries(
        nox, user.caller, limit=_AUDIT_PAGE, action=action or None, actor=actor or None
    )
    verify = api_admin.audit_verify(nox, user.caller)
    return render(
        request, "admin_audit.html", user, nav="admin", tab="audit", entries=entries.items,
        verify=verify, action=action, actor=actor, limit=_AUDIT_PAGE,
    )  # fmt: skip


# -- backups ------------------------------------------------------------------------------------


def _backups(
    request: Request,
    nox: Nox,
    user: User,
    *,
    error: str | None = None,
    notice: str | None = None,
    restored: dict[str, Any] | None = None,
    status: int = 200,
) -> Response:
    template = "_backups.html" if is_htmx(request) else "admin_backups.html"
    return render(
        request, template, user, nav="admin", tab="backups", status=status,
        backups=nox.backups.list_all(), error=error, notice=notice, restored=restored,
    )  # fmt: skip


@router.get("/ui/admin/backups")
def backups_page(request: Request, nox: NoxDep, user: AdminUser) -> Response:
    return _backups(request, nox, user)


@router.post("/ui/admin/backups")
def create_backup(
    request: Request, nox: NoxDep, user: AdminUser, name: Annotated[str, Form(max_length=64)]
) -> Response:
    try:
        stored = nox.backups.create(name.strip(), user.caller)
    except NoxError as exc:
        return _backups(request, nox, user, error=exc.message, status=exc.status)
    return _backups(request, nox, user, notice=f"Backup {stored.name} written.")


@router.post("/ui/admin/backups/{name}/restore")
def restore_backup(request: Request, nox: NoxDep, user: AdminUser, name: str) -> Response:
    try:
        result = nox.backups.restore(name, user.caller)
    except NoxError as exc:
        return _backups(request, nox, user, error=exc.message, status=exc.status)
    return _backups(
        request, nox, user, notice=f"Restored {name}; the state before was saved as "
        f"{result.pre_restore}.", restored=dict(result.counts),
    )  # fmt: skip


# -- policy -------------------------------------------------------------------------------------


def _policy(
    request: Request, nox: Nox, user: User, *, error: str | None = None, notice: str | None = None
) -> Response:
    store = nox.policy
    template = "_policy.html" if is_htmx(request) else "admin_policy.html"
    return render(
        request, template, user, nav="admin", tab="policy", policy=store.current.to_public_dict(),
        sha256=store.source_sha256, loaded_at=store.loaded_at, source=str(store.path),
        error=error, notice=notice, status=400 if error else 200,
    )  # fmt: skip


@router.get("/ui/admin/policy")
def policy_page(request: Request, nox: NoxDep, user: AdminUser) -> Response:
    return _policy(request, nox, user)


@router.post("/ui/admin/policy/reload")
def reload_policy(request: Request, nox: NoxDep, user: AdminUser) -> Response:
    """Reload the policy file; a bad file is refused and the policy in force stays."""
    try:
        nox.reload_policy(user.caller)
    except InvalidRequest as exc:
        return _policy(request, nox, user, error=exc.message)
    return _policy(request, nox, user, notice="Policy reloaded.")
