"""Who may see or do what on the dashboard: the session's token, checked like a bearer token.

Each dashboard route declares one permission with :func:`allow` (``Viewer``, ``RunnerUser``,
``AdminUser`` below), exactly like the API's ``Reader``/``Runner``/``Admin``: the session cookie is
opened, its token authenticated again (a revoked or expired token ends the session), the request
counted against the token's rate limit, the role checked (a refusal is audited as ``auth``
``denied``, like the API's), and every request that is not GET or HEAD must carry the session's
CSRF token (form field ``csrf`` or header ``X-CSRF-Token``) and must not come from another site
(``Sec-Fetch-Site: cross-site``).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated

from asgi_correlation_id import correlation_id
from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from nox_api.deps import ROLE_PERMISSIONS, NoxDep, Permission, client_address
from nox_api.errors import ConfigError, Forbidden, RateLimited
from nox_api.services.auditing import Caller
from nox_api.services.tokens import Principal, Role
from nox_api.state import Nox
from nox_api.ui.session import CSRF_FIELD, CSRF_HEADER, SESSION_COOKIE, Session, SessionKeeper

__all__ = [
    "AdminUser",
    "RunnerUser",
    "SignInRequired",
    "Uploader",
    "User",
    "Viewer",
    "allow",
    "keeper_of",
]

_SAFE_METHODS = frozenset({"GET", "HEAD"})
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
_KEEPER_LOCK = threading.Lock()


class SignInRequired(Exception):
    """No valid session: the browser is sent to the sign-in page (``reason`` shown there)."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason or "sign in")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class User:
    """The signed-in caller of a dashboard request."""

    caller: Caller
    session: Session
    csrf: str  # the session's CSRF token, for the page's forms

    @property
    def principal(self) -> Principal:
        principal = self.caller.principal
        assert principal is not None  # noqa: S101 - a User is always authenticated
        return principal

    @property
    def can_run(self) -> bool:
        return Permission.RUN in ROLE_PERMISSIONS[self.principal.role]

    @property
    def is_admin(self) -> bool:
        return self.principal.role is Role.ADMIN


def keeper_of(request: Request, nox: Nox) -> SessionKeeper:
    """The app's session keeper, made on first use from the running server's settings."""
    state = request.app.state
    held: tuple[Nox, SessionKeeper] | None = getattr(state, "ui_sessions", None)
    if held is not None and held[0] is nox:
        return held[1]
    with _KEEPER_LOCK:
        held = getattr(state, "ui_sessions", None)
        if held is None or held[0] is not nox:
            try:
                keeper = SessionKeeper.from_settings(nox.settings)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"the dashboard's session key: {exc}") from None
            held = (nox, keeper)
            state.ui_sessions = held
    return held[1]


async def _csrf_candidate(request: Request, header_only: bool) -> str | None:
    header = request.headers.get(CSRF_HEADER)
    if header or header_only:
        return header
    ctype = request.headers.get("content-type", "")
    if ctype.startswith(_FORM_TYPES):
        value = (await request.form()).get(CSRF_FIELD)
        return value if isinstance(value, str) else None
    return None


async def _admit(
    request: Request, nox: Nox, permission: Permission, header_only: bool = False
) -> User:
    keeper = keeper_of(request, nox)
    session = keeper.open(request.cookies.get(SESSION_COOKIE))
    if session is None:
        raise SignInRequired()
    principal = nox.tokens.authenticate(session.token)
    if principal is None:
        raise SignInRequired("Your token was revoked or has expired: sign in again.")
    request.state.principal = principal  # the access log names the token
    caller = Caller(principal, client_address(request), correlation_id.get())
    audit = partial(nox.auditor.record, "auth", caller, outcome="denied", target=request.url.path)
    if request.method not in _SAFE_METHODS:
        if request.headers.get("sec-fetch-site") == "cross-site":
            await run_in_threadpool(audit, reason="cross-site request")
            raise Forbidden("the dashboard refuses requests sent from another site")
        if not keeper.csrf_ok(session, await _csrf_candidate(request, header_only)):
            await run_in_threadpool(audit, reason="csrf")
            raise Forbidden(
                "the form's CSRF token is missing or wrong: reload the page and try again"
            )
    rate = nox.policy.current.rate_for(principal.role, principal.id, principal.name)
    state = nox.limiter.hit(f"token:{principal.id}", rate)
    if not state.allowed:
        raise RateLimited(
            f"rate limit of {rate} reached for token {principal.name!r}; "
            f"try again in {state.reset_s} s",
            headers=state.headers(),
        )
    if permission not in ROLE_PERMISSIONS[principal.role]:
        await run_in_threadpool(audit, reason=f"needs {permission.value}")
        raise Forbidden(
            f"the {principal.role.value} role may not do this (needs {permission.value})"
        )
    return User(caller, session, keeper.csrf_token(session))


def allow(permission: Permission, *, streamed: bool = False) -> Callable[..., Awaitable[User]]:
    """A dependency that admits a signed-in user holding ``permission`` (see the module).
    ``streamed``: the route reads the body itself (an upload), so the CSRF token must come in
    the header; the body is never parsed as a form here."""

    async def dependency(request: Request, nox: NoxDep) -> User:
        return await _admit(request, nox, permission, header_only=streamed)

    dependency.nox_permission = permission  # type: ignore[attr-defined]
    dependency.nox_session = True  # type: ignore[attr-defined]
    return dependency


Viewer = Annotated[User, Depends(allow(Permission.READ))]
RunnerUser = Annotated[User, Depends(allow(Permission.RUN))]
AdminUser = Annotated[User, Depends(allow(Permission.ADMIN))]
Uploader = Annotated[User, Depends(allow(Permission.RUN, streamed=True))]
