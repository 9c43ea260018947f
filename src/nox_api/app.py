"""The application factory. Nothing happens at import: :func:`create_app` builds the app, and its
lifespan starts the server's parts (database migrations, sandbox probe, warm pool)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI

from nox_api._version import __version__
from nox_api.config import Settings, load_settings
from nox_api.engine.base import Sandbox
from nox_api.http_errors import UnexpectedErrors, install_error_handlers
from nox_api.middleware import BodyLimitMiddleware
from nox_api.observability.metrics import Metrics, MetricsMiddleware
from nox_api.routes import (
    admin,
    backups,
    files,
    health,
    history,
    metrics,
    operations,
    put,
    run,
    system,
)
from nox_api.state import Nox
from nox_api.ui import install as install_dashboard

__all__ = ["create_app"]

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# (method, path prefix) of the streaming upload routes, which cap their bodies themselves
_STREAMED = (("POST", "/put"), ("PUT", "/api/files/"), ("PUT", "/ui/files/upload/"))


def _sane_request_id(value: str) -> bool:
    return bool(_REQUEST_ID_RE.match(value))


def _metrics_of(app: FastAPI) -> Metrics | None:
    nox = getattr(app.state, "nox", None)
    return None if nox is None else nox.metrics


def create_app(settings: Settings | None = None, sandbox: Sandbox | None = None) -> FastAPI:
    """Build the Nox ASGI app. ``sandbox`` replaces the configured backend (tests pass a fake)."""
    resolved = settings if settings is not None else load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nox = Nox.start(resolved, sandbox)
        app.state.nox = nox
        try:
            yield
        finally:
            nox.close()

    app = FastAPI(
        title="Nox",
        version=__version__,
        summary="Run untrusted Python and shell code in Linux sandboxes.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(run.router)
    app.include_router(put.router)
    app.include_router(files.router)
    app.include_router(admin.router)
    app.include_router(backups.router)
    app.include_router(history.router)
    app.include_router(system.router)
    app.include_router(operations.router)
    app.include_router(metrics.router)
    install_dashboard(app)  # /ui: its routes, static files and security headers
    app.add_middleware(
        BodyLimitMiddleware,
        limit=lambda: app.state.nox.request_body_limit(),  # noqa: PLW0108 - nox comes later
        exempt=_STREAMED,
    )
    app.add_middleware(UnexpectedErrors)  # inside the request id and the metrics
    app.add_middleware(MetricsMiddleware, metrics=lambda: _metrics_of(app))
    app.add_middleware(
        CorrelationIdMiddleware,
        header_name="X-Request-ID",
        validator=_sane_request_id,
        update_request_header=True,
    )
    return app
