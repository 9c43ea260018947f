"""The web dashboard at ``/ui``: server-rendered Jinja2 pages, enhanced by htmx and a few small
scripts of its own, signed in with a token kept in an encrypted HttpOnly session cookie.

Layout: ``session`` (cookie and CSRF tokens), ``access`` (who may do what), ``routing`` and
``render`` (pages, fragments, error pages), ``headers`` (CSP and friends), one module of routes
per page group (``pages``, ``files``, ``runs``, ``logs``, ``admin``), ``templates/`` and
``static/`` (the vendored htmx build lands in ``static/vendor/``, built from ``ui/`` at the
repository's root by ``scripts/setup.sh``). See docs/dashboard.md.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.routing import Mount
from starlette.types import Receive, Scope, Send

__all__ = ["STATIC_PATH", "UI_PATH", "install"]

UI_PATH = "/ui"
STATIC_PATH = "/ui/static"


class _Static(StaticFiles):
    """The dashboard's static files, named by their mount in the access log and the metrics
    (``/ui/static``) instead of ``unmatched``."""

    mount: Mount | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.mount is not None:
            scope["route"] = self.mount
        await super().__call__(scope, receive, send)


def install(app: FastAPI) -> None:
    """Add the dashboard's routes, its static files and its security headers to ``app``."""
    from nox_api.ui import admin, files, logs, pages, runs
    from nox_api.ui.headers import SecurityHeaders
    from nox_api.ui.render import STATIC_DIR

    for module in (pages, files, runs, logs, admin):
        app.include_router(module.router)
    static = _Static(directory=STATIC_DIR)
    static.mount = Mount(STATIC_PATH, app=static, name="ui-static")
    app.router.routes.append(static.mount)
    app.add_middleware(SecurityHeaders, prefix=UI_PATH, static_prefix=STATIC_PATH)
