"""Running code: check the request against the limits, run it in the caller's workspace, keep it
in history, answer with the :class:`~noxsdk.models.Execution`."""

from __future__ import annotations

import math
import secrets
from datetime import UTC, datetime

from nox_api.config import Settings
from nox_api.engine.base import Limits, RunSpec, Sandbox, SandboxUnavailable
from nox_api.errors import InvalidRequest, PayloadTooLarge, SandboxUnavailableError
from nox_api.services.files import Workspaces
from nox_api.services.tokens import Principal
from nox_api.storage.db import Database
from nox_api.storage.models import ExecutionRow
from noxsdk.models import EffectiveLimits, Execution, ExecutionKind, RunPython, RunShell

__all__ = ["ExecutionService"]


class ExecutionService:
    def __init__(
        self, settings: Settings, db: Database, sandbox: Sandbox, workspaces: Workspaces
    ) -> None:
        self._settings = settings
        self._db = db
        self._sandbox = sandbox
        self._workspaces = workspaces

    def limits_for(self, body: RunPython | RunShell) -> Limits:
        """The run's limits: the request's where it asked, the defaults elsewhere. A request
        above a maximum is refused, never silently lowered."""
        s = self._settings
        timeout = body.timeout_s if body.timeout_s is not None else s.default_timeout_s
        if timeout > s.max_timeout_s:
            raise InvalidRequest(
                f"timeout_s {timeout:g} is above this server's maximum of {s.max_timeout_s:g}"
            )
        memory = body.memory_mib if body.memory_mib is not None else s.default_memory_mib
        if memory > s.max_memory_mib:
            raise InvalidRequest(
                f"memory_mib {memory} is above this server's maximum of {s.max_memory_mib}"
            )
        if memory < 16:
            raise InvalidRequest("memory_mib must be at least 16")
        return Limits(
            timeout_s=timeout,
            cpu_s=min(s.max_cpu_s, max(1, math.ceil(timeout))),
            memory_mib=memory,
            processes=s.max_processes,
            file_size_mib=s.max_file_size_mib,
            open_files=s.max_open_files,
            tmp_size_mib=s.tmp_size_mib,
            output_bytes=s.output_bytes,
            output_hard_bytes=s.output_hard_bytes,
        )

    def run(
        self, principal: Principal, body: RunPython | RunShell, request_id: str | None
    ) -> Execution:
        if isinstance(body, RunPython):
            kind, source, what = ExecutionKind.PYTHON, body.code, "code"
        else:
            kind, source, what = ExecutionKind.SHELL, body.cmd, "cmd"
        self._check_sizes(source, body.stdin, what)
        limits = self.limits_for(body)
        workspace = self._workspaces.path(principal.workspace)
        spec = RunSpec(
            kind=kind.value,
            source=source,
            workspace=workspace,
            limits=limits,
            stdin=(body.stdin or "").encode(),
            env=body.env or {},
        )
        started = datetime.now(UTC)
        try:
            result = self._sandbox.run(spec)
        except SandboxUnavailable as exc:
            raise SandboxUnavailableError(str(exc)) from None

        execution = Execution(
            id=secrets.token_hex(8),
            kind=kind,
            status=result.status,
            exit_code=result.exit_code,
            stdout=result.stdout.decode("utf-8", "replace"),
            stderr=result.stderr.decode("utf-8", "replace"),
            stdout_truncated=result.stdout_truncated,
            stderr_truncated=result.stderr_truncated,
            duration_ms=result.duration_ms,
            cpu_ms=result.cpu_ms,
            started_at=started,
            workspace=principal.workspace,
            actor=principal.name,
            request_id=request_id,
            limits=EffectiveLimits(
                timeout_s=limits.timeout_s,
                cpu_s=limits.cpu_s,
                memory_mib=limits.memory_mib,
                processes=limits.processes,
                file_size_mib=limits.file_size_mib,
                open_files=limits.open_files,
                tmp_size_mib=limits.tmp_size_mib,
                output_bytes=limits.output_bytes,
            ),
        )
        self._save(execution, principal, source)
        return execution

    def _check_sizes(self, source: str, stdin: str | None, what: str) -> None:
        s = self._settings
        size = len(source.encode("utf-8", "surrogatepass"))
        if size > s.max_code_bytes:
            raise PayloadTooLarge(
                f"{what} is {size} bytes; this server accepts at most {s.max_code_bytes}"
            )
        if not source.strip():
            raise InvalidRequest(f"{what} is empty")
        if "\x00" in source:
            raise InvalidRequest(f"{what} contains a NUL byte")
        if stdin is not None and len(stdin.encode("utf-8", "surrogatepass")) > s.max_stdin_bytes:
            raise PayloadTooLarge(f"stdin is larger than this server's {s.max_stdin_bytes} bytes")

    def _save(self, execution: Execution, principal: Principal, source: str) -> None:
        row = ExecutionRow(
            id=execution.id,
            kind=execution.kind.value,
            status=execution.status.value,
            exit_code=execution.exit_code,
            stdout=execution.stdout,
            stderr=execution.stderr,
            stdout_truncated=execution.stdout_truncated,
            stderr_truncated=execution.stderr_truncated,
            duration_ms=execution.duration_ms,
            cpu_ms=execution.cpu_ms,
            started_at=execution.started_at,
            workspace=execution.workspace,
            actor=execution.actor,
            actor_id=principal.id,
            request_id=execution.request_id,
            code=source,
            limits=execution.limits.model_dump() if execution.limits else None,
        )
        with self._db.session() as session:
            session.add(row)
