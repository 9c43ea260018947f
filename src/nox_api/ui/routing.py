"""The dashboard's route class: errors become pages (or fragments), never a stack trace.

A dashboard handler raises what the API's handlers raise (:class:`~nox_api.errors.NoxError` and
its kin); :class:`UiRoute` turns it into an HTML page for a browser, a fragment for htmx, or the
API's JSON envelope for a script that asks for JSON. A request without a valid session is sent
to the sign-in page (htmx requests with the ``HX-Redirect`` header).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlencode, urlsplit

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.routing import APIRoute

from nox_api.errors import NoxError
from nox_api.http_errors import note_refusal
from nox_api.ui.access import SignInRequired
from nox_api.ui.render import error_answer, is_htmx

__all__ = ["SIGN_IN_PATH", "UiRoute", "safe_next", "sign_in_redirect"]


SIGN_IN_PATH = "/ui/login"


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a dashboard path of this server, nothing else (no open
    redirect to another site)."""
    if (
        not target
        or not target.startswith("/ui")
        or target.startswith("//")
        or "\\" in target
        or any(ord(ch) < 0x20 for ch in target)
        or target.startswith(SIGN_IN_PATH)
    ):
        return "/ui"
    return target


def sign_in_redirect(request: Request, reason: str | None = None) -> Response:
    """To the sign-in page, which comes back here afterwards: to this page for a page, to the
    page the browser shows for an htmx request (``HX-Redirect``, since htmx does not follow a
    redirect itself)."""
    if is_htmx(request):
        shown = urlsplit(request.headers.get("hx-current-url", ""))
        back = shown.path + (f"?{shown.query}" if shown.query else "")
    else:
        back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.method != "GET":
            back = ""  # a form post is not repeated: back to the dashboard
    query = {}
    if safe_next(back) != "/ui":
        query["next"] = back
    if reason:
        query["reason"] = "expired"
    location = SIGN_IN_PATH + (f"?{urlencode(query)}" if query else "")
    if is_htmx(request):
        return Response(status_code=204, headers={"HX-Redirect": location})
    return RedirectResponse(location, status_code=303)


def _describe(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "the request is not valid"


class UiRoute(APIRoute):
    """An APIRoute whose errors are answered for a person (see the module)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except SignInRequired as exc:
                return sign_in_redirect(request, exc.reason)
            except NoxError as exc:
                note_refusal(request, exc)
                return error_answer(request, exc.status, exc.code, exc.message, exc.headers)
            except RequestValidationError as exc:
                return error_answer(request, 400, "invalid_request", _describe(exc))

        return guarded
