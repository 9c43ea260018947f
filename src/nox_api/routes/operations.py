"""Operations: ``/api/health/detailed``, ``/api/sandbox/clean``, ``/api/logs`` and
``/api/logs/stream``. Blocking work runs in FastAPI's worker threads (``def`` handlers); the log
stream is served on the event loop."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from nox_api.deps import Admin, NoxDep, Reader
from nox_api.observability.logging import MAX_TAIL_LINES
from nox_api.observability.stream import MAX_STREAM_DURATION_S
from nox_api.services.tokens import Role
from noxsdk.models import (
    HealthReport,
    HealthStatus,
    LogLines,
    SandboxClean,
    SandboxCleaned,
)

__all__ = ["EventStreamResponse", "router"]

router = APIRouter(tags=["operations"])

_ADMIN_ERRORS: dict[int | str, dict[str, str]] = {
    401: {"description": "Missing or unknown token"},
    403: {"description": "Not an admin token"},
    429: {"description": "Rate limit reached"},
}


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` answer whose generator is always closed, however the response
    ends (client gone, server shutting down), so a subscription never outlives its client."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


@router.get(
    "/api/health/detailed",
    response_model=HealthReport,
    responses={
        401: _ADMIN_ERRORS[401],
        429: _ADMIN_ERRORS[429],
        503: {"model": HealthReport, "description": "At least one check failed (same body)"},
    },
    summary="Health of each part: database, sandbox, disk, audit log, policy",
)
def health_detailed(nox: NoxDep, caller: Reader, response: Response) -> HealthReport:
    """``ok`` and ``degraded`` answer 200, ``fail`` 503 with the same body. The sandbox probe
    runs at most every 30 s; the other checks run on every call and cost a few milliseconds."""
    principal = caller.principal
    report = nox.health.report(admin=principal is not None and principal.role is Role.ADMIN)
    if report.status == HealthStatus.FAIL:
        response.status_code = 503
    return report


@router.post(
    "/api/sandbox/clean",
    response_model=SandboxCleaned,
    responses={**_ADMIN_ERRORS, 404: {"description": "No such workspace"}},
    summary="Remove leftover temporary files and, optionally, old workspace files",
)
def sandbox_clean(body: SandboxClean, nox: NoxDep, caller: Admin) -> SandboxCleaned:
    report = nox.cleaner.clean(
        caller,
        older_than_days=body.older_than_days,
        workspace=body.workspace,
        dry_run=body.dry_run,
    )
    return SandboxCleaned(
        removed=report.removed,
        freed_bytes=report.freed_bytes,
        dry_run=report.dry_run,
        paths=report.paths,
        paths_truncated=report.paths_truncated,
    )


@router.get(
    "/api/logs",
    response_model=LogLines,
    responses=_ADMIN_ERRORS,
    summary="The last lines of the server log",
)
def logs_tail(
    nox: NoxDep,
    caller: Admin,
    tail: Annotated[int, Query(ge=1, le=MAX_TAIL_LINES, description="Lines wanted.")] = 100,
) -> LogLines:
    """Each line is one JSON object (``time``, ``level``, ``logger``, ``message``, and
    ``request_id`` / ``exc_info`` when known), oldest first. Read from the end of the file."""
    return LogLines(lines=nox.logs.tail(tail))


@router.get(
    "/api/logs/stream",
    response_class=EventStreamResponse,
    responses={
        **_ADMIN_ERRORS,
        200: {
            "content": {"text/event-stream": {}},
            "description": "One `data:` event per new log line; `event: dropped` when the "
            "client read too slowly; a `: keep-alive` comment after 15 s without lines",
        },
    },
    summary="Follow the server log (Server-Sent Events)",
)
async def logs_stream(
    request: Request,
    nox: NoxDep,
    caller: Admin,
    duration_s: Annotated[
        float | None,
        Query(
            gt=0, le=MAX_STREAM_DURATION_S, description="End the stream after this many seconds."
        ),
    ] = None,
) -> EventStreamResponse:
    """Lines logged from now on, until the client disconnects (or ``duration_s`` passed)."""
    headers = dict(getattr(request.state, "rate_headers", None) or {})
    headers["Cache-Control"] = "no-cache"
    headers["X-Accel-Buffering"] = "no"  # proxies such as nginx must not hold events back
    return EventStreamResponse(nox.logs.hub.events(duration_s), headers=headers)
