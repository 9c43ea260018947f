"""Signing in and out, and the home page (status, sandbox, version, uptime, today's runs,
resources)."""

from __future__ import annotations

import logging
from typing import Annotated

from asgi_correlation_id import correlation_id
from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from nox_api.deps import NoxDep, client_address
from nox_api.services.auditing import Caller
from nox_api.services.tokens import Principal
from nox_api.state import Nox
from nox_api.ui.access import Viewer, keeper_of
from nox_api.ui.overview import runs_today
from nox_api.ui.render import render
from nox_api.ui.routing import SIGN_IN_PATH, UiRoute, safe_next
from nox_api.ui.session import LOGIN_COOKIE, SESSION_COOKIE, SessionKeeper

__all__ = ["router"]

log = logging.getLogger("nox.ui")
router = APIRouter(route_class=UiRoute, include_in_schema=False)

_TOKEN_FIELD_MAX = 512  # a pasted token longer than this is no Nox token
_NEXT_MAX = 2048


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _sign_in_page(
    request: Request,
    keeper: SessionKeeper,
    *,
    next_path: str,
    error: str | None = None,
    notice: str | None = None,
    status: int = 200,
) -> Response:
    cookie, form_token = keeper.login_challenge()
    response = render(
        request,
        "login.html",
        None,
        status=status,
        login_csrf=form_token,
        next_path=next_path,
        error=error,
        notice=notice,
    )
    response.set_cookie(
        LOGIN_COOKIE, cookie, max_age=keeper.max_age_s, path=SIGN_IN_PATH,
        secure=_secure(request), httponly=True, samesite="strict",
    )  # fmt: skip
    return response


@router.get(SIGN_IN_PATH)
def sign_in_form(
    request: Request, nox: NoxDep, next: str | None = None, reason: str | None = None
) -> Response:
    """The sign-in page (public). A browser that is signed in already goes on."""
    keeper = keeper_of(request, nox)
    target = safe_next(next)
    session = keeper.open(request.cookies.get(SESSION_COOKIE))
    if session is not None and nox.tokens.authenticate(session.token) is not None:
        return RedirectResponse(target, status_code=303)
    notice = "Your session ended: sign in again." if reason == "expired" else None
    response = _sign_in_page(request, keeper, next_path=target, notice=notice)
    if session is None and SESSION_COOKIE in request.cookies:
        response.delete_cookie(SESSION_COOKIE, path="/ui")
    return response


def _signed_in(nox: Nox, principal: Principal, caller: Caller) -> None:
    nox.auditor.record("ui.signin", caller)
    log.info("dashboard: %s (%s) signed in", principal.name, principal.role.value)


@router.post(SIGN_IN_PATH)
async def sign_in(
    request: Request,
    nox: NoxDep,
    token: Annotated[str, Form(max_length=_TOKEN_FIELD_MAX)] = "",
    csrf: Annotated[str, Form(max_length=256)] = "",
    next: Annotated[str, Form(max_length=_NEXT_MAX)] = "/ui",
) -> Response:
    """Check the form's token like a bearer token (failures count against the client's
    address and are audited as ``auth`` ``failed``), then set the session cookie."""
    keeper = keeper_of(request, nox)
    target = safe_next(next)
    client = client_address(request)
    anonymous = Caller(None, client, correlation_id.get())
    if request.headers.get("sec-fetch-site") == "cross-site" or not keeper.login_ok(
        request.cookies.get(LOGIN_COOKIE), csrf
    ):
        return _sign_in_page(
            request, keeper, next_path=target, status=403,
            error="The sign-in form expired or came from another site: try again.",
        )  # fmt: skip
    fail_rate = nox.policy.current.rate_limits.auth_failures_per_client
    fail_key = f"authfail:{client}"
    blocked = nox.limiter.blocked(fail_key, fail_rate)
    if blocked is not None:
        return _sign_in_page(
            request, keeper, next_path=target, status=429,
            error=f"Too many failed sign-ins from {client}: try again in {blocked.reset_s} s.",
        )  # fmt: skip
    principal = nox.tokens.authenticate(token.strip()) if token.strip() else None
    if principal is None:
        nox.limiter.hit(fail_key, fail_rate)
        await run_in_threadpool(
            nox.auditor.record, "auth", anonymous, outcome="failed", target=SIGN_IN_PATH,
            reason="unknown, expired or revoked token",
        )  # fmt: skip
        return _sign_in_page(
            request, keeper, next_path=target, status=401,
            error="Unknown, expired or revoked token.",
        )  # fmt: skip
    request.state.principal = principal
    cookie, _session = keeper.seal(token.strip())
    await run_in_threadpool(
        _signed_in, nox, principal, Caller(principal, client, anonymous.request_id)
    )
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE, cookie, max_age=keeper.max_age_s, path="/ui", secure=_secure(request),
        httponly=True, samesite="strict",
    )  # fmt: skip
    response.delete_cookie(LOGIN_COOKIE, path=SIGN_IN_PATH)
    return response


@router.post("/ui/logout")
def sign_out(request: Request, nox: NoxDep, user: Viewer) -> Response:
    keeper_of(request, nox).sign_out(user.session)
    nox.auditor.record("ui.signout", user.caller)
    response = RedirectResponse(SIGN_IN_PATH, status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/ui")
    return response


@router.get("/ui")
def home(request: Request, nox: NoxDep, user: Viewer) -> Response:
    """API status, sandbox backend and isolation, version, uptime, today's runs, resources.
    Admins see every workspace's runs and files; others their own workspace's."""
    scope = None if user.is_admin else user.principal.workspace
    return render(
        request,
        "home.html",
        user,
        nav="home",
        health=nox.health.report(admin=user.is_admin),
        stats=nox.stats.stats(scope),
        backend=nox.sandbox.info(),
        resources=nox.system.resources(),
        today=runs_today(nox, scope),
        scope=scope,
    )
