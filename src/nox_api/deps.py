"""Typed dependencies of the routes: the server's parts and the caller, checked per permission.

Every route declares exactly one permission with :func:`require` (or is listed as public in
``PUBLIC_ROUTES``); a test walks the app's routes and fails on a route that declares neither.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Annotated

from asgi_correlation_id import correlation_id
from fastapi import Depends, Request

from nox_api.errors import Forbidden, Unauthorized
from nox_api.services.tokens import Principal, Role
from nox_api.state import Nox

__all__ = [
    "Admin",
    "NoxDep",
    "PUBLIC_ROUTES",
    "Permission",
    "Reader",
    "RequestIdDep",
    "Runner",
    "require",
]

PUBLIC_ROUTES = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


class Permission(StrEnum):
    READ = "read"  # health, me, files and history read, stats
    RUN = "run"  # upload and delete files, run code
    ADMIN = "admin"  # tokens, audit, backups, policy, other workspaces


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.READ}),
    Role.RUNNER: frozenset({Permission.READ, Permission.RUN}),
    Role.ADMIN: frozenset(Permission),
}


def get_nox(request: Request) -> Nox:
    nox: Nox = request.app.state.nox
    return nox


NoxDep = Annotated[Nox, Depends(get_nox)]


def get_request_id() -> str | None:
    return correlation_id.get()


RequestIdDep = Annotated[str | None, Depends(get_request_id)]


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise Unauthorized(
            "missing bearer token: send the header 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized(
            "malformed Authorization header: expected 'Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return secret.strip()


def require(permission: Permission) -> Callable[..., Principal]:
    """A dependency that authenticates the caller and checks one permission."""

    def dependency(request: Request, nox: NoxDep) -> Principal:
        principal = nox.tokens.authenticate(_bearer(request))
        if principal is None:
            raise Unauthorized(
                "unknown, expired or revoked token",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if permission not in ROLE_PERMISSIONS[principal.role]:
            raise Forbidden(
                f"the {principal.role.value} role may not do this (needs {permission.value})"
            )
        request.state.principal = principal
        return principal

    dependency.nox_permission = permission  # type: ignore[attr-defined]
    return dependency


Reader = Annotated[Principal, Depends(require(Permission.READ))]
Runner = Annotated[Principal, Depends(require(Permission.RUN))]
Admin = Annotated[Principal, Depends(require(Permission.ADMIN))]
