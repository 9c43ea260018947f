"""Every error answer is the JSON envelope of API.md, never HTML or a stack trace."""

from __future__ import annotations

import errno
import logging
from typing import cast

from asgi_correlation_id import correlation_id
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nox_api.errors import NoxError

__all__ = ["UnexpectedErrors", "error_response", "install_error_handlers", "note_refusal"]

log = logging.getLogger("nox.http")

_CODES_BY_STATUS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "sandbox_unavailable",
}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "request_id": correlation_id.get()}}
    return JSONResponse(body, status_code=status, headers=headers)


def _describe(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "the request is not valid"


def _rate_headers(request: Request) -> dict[str, str]:
    """The caller's X-RateLimit-* headers, when a rate-limited route counted the request."""
    headers: dict[str, str] | None = getattr(request.state, "rate_headers", None)
    return dict(headers) if headers else {}


def note_refusal(request: Request, exc: NoxError) -> None:
    """What every answer of a NoxError does besides answering: log a server error, count the
    refusal in the metrics (by code and the caller's role)."""
    if exc.status >= 500:
        log.error("%s: %s", exc.code, exc.message)
    nox = getattr(request.app.state, "nox", None)
    if nox is not None:
        principal = getattr(request.state, "principal", None)
        nox.metrics.refused(exc.code, principal.role.value if principal is not None else None)


async def _nox_error(request: Request, exc: Exception) -> JSONResponse:
    exc = cast(NoxError, exc)
    note_refusal(request, exc)
    return error_response(
        exc.status, exc.code, exc.message, {**_rate_headers(request), **exc.headers}
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    message = _describe(cast(RequestValidationError, exc))
    return error_response(422, "invalid_request", message, _rate_headers(request))


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    exc = cast(StarletteHTTPException, exc)
    code = _CODES_BY_STATUS.get(
        exc.status_code, "internal" if exc.status_code >= 500 else "invalid_request"
    )
    detail = exc.detail if isinstance(exc.detail, str) else "request refused"
    return error_response(exc.status_code, code, detail, dict(exc.headers or {}))


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # The machine's problem, not the request's: say so, without a traceback per request.
        log.error("the disk is full: %s", exc.strerror)
        return error_response(
            507, "insufficient_storage",
            "the server's disk is full; nothing was changed by this request, try again once "
            "space is freed",
        )  # fmt: skip
    log.exception("unhandled error", exc_info=exc)
    return error_response(
        500, "internal", "internal server error; the request id identifies it in the server log"
    )


class UnexpectedErrors:
    """Answers an exception no handler took (and a full disk) with the error envelope *inside*
    the request-id middleware, so even a 500 carries ``X-Request-ID`` and its id in the body;
    Starlette's own last-resort handler sits outside it. An exception after the answer
    started is re-raised (the client sees a cut answer, the log the traceback)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_watching(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_watching)
        except Exception as exc:
            if started:
                raise
            response = await _unexpected(Request(scope), exc)
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(NoxError, _nox_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
