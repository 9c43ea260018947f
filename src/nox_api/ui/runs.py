"""The Run page (an editor for Python or a shell command, its output with stdout and stderr
apart, status, exit code and duration) and the History pages (the last runs, one run in full,
its code loaded back into the editor).

Runs go through :meth:`ExecutionService.run_held`, as ``POST /run_py`` and ``/run_sh`` do: the
same limits, quotas, history row and ``run`` audit record.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, Response
from pydantic import ValidationError
from starlette.background import BackgroundTask

from nox_api.deps import NoxDep
from nox_api.errors import InvalidRequest
from nox_api.services.history import DEFAULT_PAGE_SIZE, MAX_OFFSET, parse_filter
from nox_api.ui.access import RunnerUser, User, Viewer
from nox_api.ui.render import is_htmx, render
from nox_api.ui.routing import UiRoute
from noxsdk.models import ExecutionDetail, ExecutionKind, RunPython, RunShell

__all__ = ["router"]

router = APIRouter(route_class=UiRoute, include_in_schema=False)

_ID_MAX = 64


def _detail(nox: NoxDep, user: User, run_id: str) -> ExecutionDetail:
    """One run: any workspace's for an admin, else only the user's workspace's (404 as the API)."""
    return nox.history.get(run_id, None if user.is_admin else user.principal.workspace)


def _body(kind: str, code: str, stdin: str) -> RunPython | RunShell:
    try:
        if kind == ExecutionKind.SHELL.value:
            return RunShell(cmd=code, stdin=stdin or None)
        if kind == ExecutionKind.PYTHON.value:
            return RunPython(code=code, stdin=stdin or None)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidRequest(str(first.get("msg", "invalid request"))) from None
    raise InvalidRequest(f"unknown kind {kind[:20]!r}: python or shell")


@router.get("/ui/run")
def run_page(
    request: Request,
    nox: NoxDep,
    user: RunnerUser,
    from_run: Annotated[str | None, Query(alias="from", max_length=_ID_MAX)] = None,
) -> Response:
    """The editor, empty or with the code of a past run (``?from=<run id>``)."""
    kind, code, loaded = ExecutionKind.PYTHON.value, "", None
    if from_run:
        past = _detail(nox, user, from_run)
        kind, code, loaded = past.kind.value, past.code, past.id
    return render(
        request, "run.html", user, nav="run", kind=kind, code=code, stdin="", loaded=loaded,
        result=None,
    )  # fmt: skip


@router.post("/ui/run")
def run_code(
    request: Request,
    nox: NoxDep,
    user: RunnerUser,
    *,
    code: Annotated[str, Form()],
    kind: Annotated[str, Form(max_length=20)] = ExecutionKind.PYTHON.value,
    stdin: Annotated[str, Form()] = "",
) -> Response:
    """Run the editor's code; htmx gets the result panel, a plain form post the whole page."""
    execution, keep = nox.executions.run_held(user.caller, _body(kind, code, stdin))
    after = BackgroundTask(keep)  # the history row and audit record, once the answer left
    if is_htmx(request):
        response = render(request, "_run_result.html", user, result=execution)
    else:
        response = render(
            request, "run.html", user, nav="run", kind=kind, code=code, stdin=stdin,
            loaded=None, result=execution,
        )  # fmt: skip
    response.background = after
    return response


@router.get("/ui/history")
def history_page(
    request: Request,
    nox: NoxDep,
    user: Viewer,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Response:
    """The workspace's last runs, newest first, a page of DEFAULT_PAGE_SIZE (20) at a time."""
    where = parse_filter(user.principal.workspace, None, None)
    page = nox.history.page(where, DEFAULT_PAGE_SIZE, offset)
    return render(
        request, "history.html", user, nav="history", page=page, offset=offset,
        size=DEFAULT_PAGE_SIZE, workspace=user.principal.workspace,
    )  # fmt: skip


@router.get("/ui/history/{run_id}")
def history_detail(request: Request, nox: NoxDep, user: Viewer, run_id: str) -> Response:
    return render(
        request, "history_detail.html", user, nav="history", run=_detail(nox, user, run_id)
    )
