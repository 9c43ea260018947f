"""Typed dependencies of the routes: the server's parts and the caller, checked per permission.

Every route declares exactly one permission with :func:`require` (or is listed as public in
``PUBLIC_ROUTES``); a test walks the app's routes and fails on a route that declares neither.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from enum import StrEnum
from functools import partial
from typing import Annotated

from asgi_correlation_id import correlation_id
from fastapi import Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from nox_api.errors import Forbidden, RateLimited, Unauthorized
from nox_api.services.auditing import Caller
from nox_api.services.tokens import Role, validate_workspace_name
from nox_api.state import Nox

__all__ = [
    "Admin",
    "Caller",
    "NoxDep",
    "PUBLIC_ROUTES",
    "Permission",
    "Reader",
    "RequestIdDep",
    "Runner",
    "WorkspaceParam",
    "client_address",
    "require",
    "target_workspace",
]

# /metrics has its own access rule (loopback or the scrape token; see routes/metrics.py).
PUBLIC_ROUTES = frozenset(
    {"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)


class Permission(StrEnum):
    READ = "read"  # health, me, files and history read, stats
    RUN = "run"  # upload and delete files, run code
    ADMIN = "admin"  # tokens, audit, backups, policy, other workspaces


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.READ}),
    Role.RUNNER: frozenset({Permission.READ, Permission.RUN}),
    Role.ADMIN: frozenset(Permission),
}


async def get_nox(request: Request) -> Nox:  # async: no worker-thread hop for a lookup
    nox: Nox = request.app.state.nox
    return nox


NoxDep = Annotated[Nox, Depends(get_nox)]


async def get_request_id() -> str | None:
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


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class _Refused(Exception):
    """An answer refused, with the audit record to write before it goes out."""

    def __init__(self, error: Exception, audit: Callable[[], None]) -> None:
        super().__init__(str(error))
        self.error = error
        self.audit = audit


def _authenticate(request: Request, nox: Nox) -> Caller:
    """The caller of a bearer token; failed attempts count against the client's address."""
    client = client_address(request)
    request_id = correlation_id.get()
    fail_rate = nox.policy.current.rate_limits.auth_failures_per_client
    fail_key = f"authfail:{client}"
    blocked = nox.limiter.blocked(fail_key, fail_rate)
    if blocked is not None:
        raise RateLimited(
            f"too many failed authentications from {client}; try again in {blocked.reset_s} s",
            headers=blocked.headers(),
        )
    try:
        principal = nox.tokens.authenticate(_bearer(request))
        if principal is None:
            raise Unauthorized(
                "unknown, expired or revoked token",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
    except Unauthorized as exc:
        nox.limiter.hit(fail_key, fail_rate)
        raise _Refused(
            exc,
            partial(
                nox.auditor.record, "auth", Caller(None, client, request_id), outcome="failed",
                target=request.url.path, reason=exc.message[:120],
            ),
        ) from None  # fmt: skip
    return Caller(principal, client, request_id)


def _admit(request: Request, response: Response, nox: Nox, permission: Permission) -> Caller:
    caller = _authenticate(request, nox)
    principal = caller.principal
    assert principal is not None  # noqa: S101 - _authenticate never returns without one
    request.state.principal = principal
    # Counted before the permission check: forbidden requests spend the rate limit too
    # (each is audited; a flood of them must not turn into a flood of audit writes).
    rate = nox.policy.current.rate_for(principal.role, principal.id, principal.name)
    state = nox.limiter.hit(f"token:{principal.id}", rate)
    headers = state.headers()
    request.state.rate_headers = headers
    if not state.allowed:
        raise RateLimited(
            f"rate limit of {rate} reached for token {principal.name!r}; "
            f"try again in {state.reset_s} s"
        )
    if permission not in ROLE_PERMISSIONS[principal.role]:
        raise _Refused(
            Forbidden(
                f"the {principal.role.value} role may not do this (needs {permission.value})"
            ),
            partial(
                nox.auditor.record, "auth", caller, outcome="denied", target=request.url.path,
                reason=f"needs {permission.value}",
            ),
        )  # fmt: skip
    response.headers.update(headers)
    return caller


def require(permission: Permission) -> Callable[..., Awaitable[Caller]]:
    """A dependency that authenticates the caller, checks one permission and counts the
    request against the caller's rate limit (``X-RateLimit-*`` headers, 429 past it).

    It runs on the event loop: an indexed token lookup and a rate-limit counter cost less than
    the worker-thread hop a plain ``def`` dependency would take (about 0.7 ms here). A refusal's
    audit record is appended and fsync'ed, so that part goes to a worker thread."""

    async def dependency(request: Request, response: Response, nox: NoxDep) -> Caller:
        try:
            return _admit(request, response, nox, permission)
        except _Refused as refused:
            await run_in_threadpool(refused.audit)
            raise refused.error from None

    dependency.nox_permission = permission  # type: ignore[attr-defined]
    return dependency


def target_workspace(caller: Caller, requested: str | None) -> str:
    """The workspace a request acts on: the token's own, or for an admin ``?workspace=``.
    Others naming a workspace get 403 unless it is their own (never a hint that it exists)."""
    principal = caller.principal
    assert principal is not None  # noqa: S101
    if requested is None or requested == principal.workspace:
        return principal.workspace
    if principal.role is not Role.ADMIN:
        raise Forbidden("only an admin may act on another workspace")
    return validate_workspace_name(requested)


WorkspaceParam = Annotated[
    str | None,
    Query(
        description="Admins only: act on this workspace instead of the token's own.",
        max_length=63,
    ),
]

Reader = Annotated[Caller, Depends(require(Permission.READ))]
Runner = Annotated[Caller, Depends(require(Permission.RUN))]
Admin = Annotated[Caller, Depends(require(Permission.ADMIN))]
