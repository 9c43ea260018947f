"""Pages and fragments of the dashboard from Jinja2 templates (autoescaped: user content, file
names and program output always render as text), and its error answers."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from nox_api._version import __version__
from nox_api.deps import ROLE_PERMISSIONS, Permission
from nox_api.http_errors import error_response
from nox_api.services.tokens import Principal, Role
from nox_api.ui.access import User

__all__ = [
    "HTMX_FILE",
    "STATIC_DIR",
    "environment",
    "error_answer",
    "is_htmx",
    "render",
]

_HERE = Path(__file__).parent
STATIC_DIR = _HERE / "static"
HTMX_FILE = STATIC_DIR / "vendor" / "htmx.min.js"
_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB")


def _size(value: float | None) -> str:
    if value is None:
        return "-"
    amount = float(value)
    for unit in _UNITS:
        if abs(amount) < 1024 or unit == _UNITS[-1]:
            return f"{int(amount)} {unit}" if unit == "bytes" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f}"  # pragma: no cover - the loop always returns


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} ms" if value < 1000 else f"{value / 1000:.2f} s"


def _when(value: datetime | str | None) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def _pretty(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


@cache
def environment() -> jinja2.Environment:
    """The templates, loaded on first use; autoescaping is on for every template."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(size=_size, ms=_ms, when=_when, duration=_duration, pretty=_pretty)
    return env


def is_htmx(request: Request) -> bool:
    """The request came from htmx (it wants a fragment, not a page)."""
    return request.headers.get("hx-request") == "true"


def _who(principal: Principal | None) -> dict[str, Any]:
    permissions = ROLE_PERMISSIONS[principal.role] if principal is not None else frozenset()
    return {
        "me": principal,
        "can_run": Permission.RUN in permissions,
        "is_admin": principal is not None and principal.role is Role.ADMIN,
    }


def render(
    request: Request,
    template: str,
    user: User | None,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    """A page or fragment; every template sees the user, the CSRF token and the server's
    version besides ``context``."""
    values: dict[str, Any] = {
        **_who(user.principal if user is not None else None),
        "csrf": user.csrf if user is not None else "",
        "version": __version__,
        "assets_ok": HTMX_FILE.is_file(),
        "here": request.url.path,
        **context,
    }
    body = environment().get_template(template).render(values)
    return HTMLResponse(body, status_code=status, headers=headers)


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def error_answer(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    """An error as the caller can show it: the JSON envelope for scripts (the upload's
    ``Accept: application/json``), a fragment for htmx, else a page."""
    if _wants_json(request):
        return error_response(status, code, message, headers)
    principal: Principal | None = getattr(request.state, "principal", None)
    values: dict[str, Any] = {
        **_who(principal),
        "csrf": "",
        "version": __version__,
        "assets_ok": HTMX_FILE.is_file(),
        "here": request.url.path,
        "status": status,
        "code": code,
        "message": message,
    }
    template = "_error.html" if is_htmx(request) else "error.html"
    body = environment().get_template(template).render(values)
    return HTMLResponse(body, status_code=status, headers=headers)
