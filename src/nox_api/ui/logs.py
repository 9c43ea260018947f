"""The live server log (admins): the last lines, then each new line as it is written, through
Server-Sent Events from the same hub as ``GET /api/logs/stream``; the page can pause it."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from nox_api.deps import NoxDep
from nox_api.observability.stream import MAX_STREAM_DURATION_S
from nox_api.routes.operations import EventStreamResponse
from nox_api.ui.access import AdminUser
from nox_api.ui.render import render
from nox_api.ui.routing import UiRoute

__all__ = ["parse_line", "router"]

router = APIRouter(route_class=UiRoute, include_in_schema=False)

TAIL_LINES = 100  # lines the page starts with (the API's default tail)


def parse_line(line: str) -> dict[str, Any]:
    """A log line's fields for the page; a line that is not JSON shows as its text."""
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        return {"time": "", "level": "", "logger": "", "event": line}
    return {
        "time": str(record.get("time", "")),
        "level": str(record.get("level", "")),
        "logger": str(record.get("logger", "")),
        "event": str(record.get("event", "")),
    }


@router.get("/ui/logs")
def logs_page(request: Request, nox: NoxDep, user: AdminUser) -> Response:
    lines = [parse_line(line) for line in nox.logs.tail(TAIL_LINES)]
    return render(request, "logs.html", user, nav="logs", lines=lines, tail=TAIL_LINES)


@router.get("/ui/logs/stream")
async def logs_stream(
    nox: NoxDep,
    user: AdminUser,
    duration_s: Annotated[float | None, Query(gt=0, le=MAX_STREAM_DURATION_S)] = None,
) -> Response:
    """New server log lines as Server-Sent Events, until the page goes away (or
    ``duration_s`` passed): ``GET /api/logs/stream`` behind the session."""
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return EventStreamResponse(nox.logs.hub.events(duration_s), headers=headers)
