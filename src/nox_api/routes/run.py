"""``POST /run_py`` and ``POST /run_sh``: run code in the caller's workspace.

The blocking part (checks, the sandbox's supervision, the quota) goes to a worker thread in one
hop; the handlers themselves are ``async``, because FastAPI would otherwise hop to a thread for
the handler and again to validate its answer (about 0.7 ms each on a 2-core machine). User code
failing is still HTTP 200; ``status`` tells how it ended.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from nox_api.deps import NoxDep, Runner
from noxsdk.models import Execution, RunPython, RunShell

router = APIRouter(tags=["run"])

_ERRORS: dict[int | str, dict[str, str]] = {
    400: {"description": "A limit above the server's maximum, or an invalid field"},
    401: {"description": "Missing or unknown token"},
    403: {"description": "The token's role may not run code, or the shell deny-list refuses it"},
    413: {"description": "Code, command or stdin above the policy's size limit"},
    429: {"description": "Rate limit (rate_limited) or daily quota (quota_exceeded) reached"},
    503: {"description": "No sandbox can run here; the message says how to fix it"},
}


@router.post(
    "/run_py",
    response_model=Execution,
    responses=_ERRORS,
    summary="Run Python code in a sandbox",
)
async def run_py(body: RunPython, nox: NoxDep, caller: Runner) -> Execution:
    return await run_in_threadpool(nox.executions.run, caller, body)


@router.post(
    "/run_sh",
    response_model=Execution,
    responses=_ERRORS,
    summary="Run a shell command (/bin/sh -c) in a sandbox",
)
async def run_sh(body: RunShell, nox: NoxDep, caller: Runner) -> Execution:
    return await run_in_threadpool(nox.executions.run, caller, body)
