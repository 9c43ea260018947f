"""``POST /run_py`` and ``POST /run_sh``: run code in the caller's workspace.

The blocking part (checks, the sandbox's supervision, the quota, the answer's JSON) goes to one
of the runs' own threads in one hop; the handlers themselves are ``async``, because FastAPI would
otherwise hop to a thread for the handler and again to validate its answer (about 0.7 ms each on
a 2-core machine). The run's history row and audit record are handed to the writer thread only
once the answer has been sent (see :meth:`ExecutionService.run_held`). User code failing is still
HTTP 200; ``status`` tells how it ended.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Mapping

from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from nox_api.deps import Caller, NoxDep, Runner
from nox_api.state import Nox
from noxsdk.models import Execution, RunPython, RunShell

__all__ = ["router"]

router = APIRouter(tags=["run"])

_ERRORS: dict[int | str, dict[str, str]] = {
    400: {"description": "A limit above the server's maximum, or an invalid field"},
    401: {"description": "Missing or unknown token"},
    403: {"description": "The token's role may not run code, or the shell deny-list refuses it"},
    413: {"description": "Code, command or stdin above the policy's size limit"},
    429: {"description": "Rate limit (rate_limited) or daily quota (quota_exceeded) reached"},
    503: {"description": "No sandbox can run here; the message says how to fix it"},
}


class _RunAnswer(Response):
    """An Execution's JSON, made in the worker thread; ``keep`` runs once it has been sent
    (or sending failed: the run happened, so its history row and audit record are written)."""

    media_type = "application/json"

    def __init__(self, body: bytes, headers: Mapping[str, str], keep: Callable[[], None]) -> None:
        super().__init__(body, headers=headers)
        self._keep = keep

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._keep()


def _run(nox: Nox, caller: Caller, body: RunPython | RunShell) -> tuple[bytes, Callable[[], None]]:
    execution, keep = nox.executions.run_held(caller, body)
    return execution.model_dump_json().encode(), keep


async def _answer(
    request: Request, nox: Nox, caller: Caller, body: RunPython | RunShell
) -> Response:
    # The runs' own threads (see ExecutionService.threads), with this request's context (its
    # request id reaches the run's log lines). A request cancelled while its run goes on (a
    # server shutting down) still gets the run written once the run ends.
    context = contextvars.copy_context()
    done = asyncio.get_running_loop().run_in_executor(
        nox.executions.threads, context.run, _run, nox, caller, body
    )
    try:
        content, keep = await asyncio.shield(done)
    except asyncio.CancelledError:
        done.add_done_callback(_keep_when_ended)
        raise
    return _RunAnswer(content, getattr(request.state, "rate_headers", {}), keep)


def _keep_when_ended(done: asyncio.Future[tuple[bytes, Callable[[], None]]]) -> None:
    if not done.cancelled() and done.exception() is None:
        done.result()[1]()


@router.post(
    "/run_py",
    response_model=Execution,
    responses=_ERRORS,
    summary="Run Python code in a sandbox",
)
async def run_py(request: Request, body: RunPython, nox: NoxDep, caller: Runner) -> Response:
    return await _answer(request, nox, caller, body)


@router.post(
    "/run_sh",
    response_model=Execution,
    responses=_ERRORS,
    summary="Run a shell command (/bin/sh -c) in a sandbox",
)
async def run_sh(request: Request, body: RunShell, nox: NoxDep, caller: Runner) -> Response:
    return await _answer(request, nox, caller, body)
