"""Running code: check the request against the limits, run it in the caller's workspace, keep it
in history, answer with the :class:`~noxsdk.models.Execution`."""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import Any

from nox_api.engine.base import Limits, Result, RunSpec, Sandbox, SandboxUnavailable
from nox_api.errors import (
    Forbidden,
    InvalidRequest,
    PayloadTooLarge,
    QuotaExceeded,
    SandboxUnavailableError,
)
from nox_api.services.auditing import Auditor, Caller, code_sha256
from nox_api.services.files import Workspaces
from nox_api.services.policy import Policy, PolicyStore
from nox_api.services.quotas import QuotaService
from nox_api.services.tokens import Principal
from nox_api.storage.db import Database
from nox_api.storage.models import ExecutionRow
from noxsdk.models import EffectiveLimits, Execution, ExecutionKind, RunPython, RunShell

__all__ = ["ExecutionService", "ceiling_of"]

log = logging.getLogger("nox.executions")


def ceiling_of(policy: Policy) -> Limits:
    """The largest limits the policy allows: what warm sandboxes start with."""
    m = policy.limits.maxima
    return Limits(
        timeout_s=m.timeout_s,
        cpu_s=m.cpu_s,
        memory_mib=m.memory_mib,
        processes=m.processes,
        file_size_mib=m.file_size_mib,
        open_files=m.open_files,
        tmp_size_mib=m.tmp_size_mib,
        output_bytes=m.output_bytes,
        output_hard_bytes=m.output_hard_bytes,
    )


class ExecutionService:
    def __init__(
        self,
        *,
        db: Database,
        sandbox: Sandbox,
        workspaces: Workspaces,
        policy: PolicyStore,
        quotas: QuotaService,
        auditor: Auditor,
        changed: Callable[[str], None] | None = None,
        background: bool = False,
        threads: int = 8,
    ) -> None:
        self._db = db
        self._sandbox = sandbox
        self._workspaces = workspaces
        self._policy = policy
        self._quotas = quotas
        self._auditor = auditor
        self._changed = changed  # told a workspace's files may have changed (after a run)
        self._unsaved = _Pending()
        # With ``background``, what follows an answer (history row, audit record) is done by
        # one writer thread, in order: not by the request's own background task, which would
        # hold its keep-alive connection (the client's next request) until it finished.
        self._writer = _Writer() if background else None
        # Runs get ``threads`` threads of their own (made when first used): runs waiting for a
        # sandbox slot must not take the threads every other synchronous route shares.
        self.threads = ThreadPoolExecutor(threads, thread_name_prefix="nox-run")
        self.observers: list[Callable[[Execution], None]] = []  # told of each finished run

    def limits_for(self, body: RunPython | RunShell, policy: Policy) -> Limits:
        """The run's limits: the request's where it asked, the policy's defaults elsewhere. A
        request above a maximum is refused, never silently lowered."""
        d, m = policy.limits.defaults, policy.limits.maxima
        timeout = body.timeout_s if body.timeout_s is not None else d.timeout_s
        if timeout > m.timeout_s:
            raise InvalidRequest(
                f"timeout_s {timeout:g} is above the policy's maximum of {m.timeout_s:g}"
            )
        memory = body.memory_mib if body.memory_mib is not None else d.memory_mib
        if memory > m.memory_mib:
            raise InvalidRequest(
                f"memory_mib {memory} is above the policy's maximum of {m.memory_mib}"
            )
        if memory < 16:
            raise InvalidRequest("memory_mib must be at least 16")
        return replace(
            ceiling_of(policy),
            timeout_s=timeout,
            cpu_s=min(m.cpu_s, max(1, math.ceil(timeout))),
            memory_mib=memory,
        )

    def run(self, caller: Caller, body: RunPython | RunShell) -> Execution:
        """Run ``body`` for ``caller``; its history row and audit record are written before
        this returns or, with ``background``, handed to the writer thread now."""
        execution, keep = self.run_held(caller, body)
        keep()
        return execution

    def run_held(
        self, caller: Caller, body: RunPython | RunShell
    ) -> tuple[Execution, Callable[[], None]]:
        """Run ``body`` for ``caller`` and return the execution with ``keep``, which writes
        its history row and audit record: the route calls it once the answer has left.

        With ``background``, ``keep`` only hands the writing to the writer thread (the route
        calls it on the event loop; it blocks only when 10,000 runs are waiting to be
        written). Writing at the same moment as the answer is built costs the answer about
        1.2 ms of a 7 ms paced request on two cores (the writer holds the interpreter lock
        and a core). Without ``background``, ``keep`` has nothing left to do: the row and the
        record are written before this returns. The run's quota counts at once either way,
        and :meth:`settle` waits for the rows of every run answered (or held) before it."""
        principal = caller.principal
        if principal is None:
            raise RuntimeError("a run needs an authenticated caller")
        policy = self._policy.current
        if isinstance(body, RunPython):
            kind, source, what = ExecutionKind.PYTHON, body.code, "code"
        else:
            kind, source, what = ExecutionKind.SHELL, body.cmd, "cmd"
        self._check_sizes(policy, source, body.stdin, what)
        limits = self.limits_for(body, policy)
        digest = code_sha256(source)
        audit: dict[str, Any] = {"target": kind.value, "code_sha256": digest}
        if kind is ExecutionKind.SHELL:
            pattern = policy.shell_denied(source)
            if pattern is not None:
                self._auditor.record(
                    "run", caller, outcome="denied", reason="shell deny-list", **audit
                )
                raise Forbidden(f"the policy refuses this command (it matches {pattern!r})")
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
        result = self._run_admitted(spec, caller, principal.workspace, audit)

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
            request_id=caller.request_id,
            limits=_effective(limits),
        )
        for observe in self.observers:
            observe(execution)
        ticket = self._unsaved.add()

        def keep() -> None:
            try:
                self._save(execution, principal, source)
                self._auditor.record("run", caller, id=execution.id,
                                     status=execution.status.value,
                                     exit_code=execution.exit_code, **audit)  # fmt: skip
            finally:
                self._unsaved.done(ticket)
                if self._changed is not None:  # the run may have written files
                    self._changed(principal.workspace)

        if self._writer is None:
            keep()
            return execution, _nothing
        return execution, _once(partial(self._writer.submit, keep))

    def _run_admitted(
        self, spec: RunSpec, caller: Caller, workspace: str, audit: dict[str, Any]
    ) -> Result:
        """Admit the run against the workspace's quota, run it, and count it (or not, when
        the sandbox could not run it)."""
        try:
            self._quotas.reserve_run(workspace)
        except QuotaExceeded:
            self._auditor.record("run", caller, outcome="denied", reason="quota", **audit)
            raise
        try:
            result = self._sandbox.run(spec)
        except SandboxUnavailable as exc:
            self._quotas.release_run(workspace)
            self._auditor.record(
                "run", caller, outcome="error", reason="sandbox unavailable", **audit
            )
            raise SandboxUnavailableError(str(exc)) from None
        except BaseException:
            self._quotas.release_run(workspace)
            raise
        self._quotas.count_run(workspace, result.cpu_ms)
        return result

    def close(self, timeout_s: float = 10.0) -> None:
        """Let started runs end, write what answered runs left to write, stop the writer."""
        self.threads.shutdown(wait=True, cancel_futures=True)
        if self._writer is not None:
            self._writer.close(timeout_s)

    def audit_barrier(self) -> None:
        """Wait until the records of runs answered before now are written (bounded by the
        writer's pace, 5 s at most), so that an audit record made after them comes after
        them in the log, as a client saw it: a run's record is written just after its answer.
        Not in the writer thread (its own records) nor on the event loop (the runs' records
        are handed over from there)."""
        if self._writer is None or self._writer.is_current():
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._unsaved.wait_until_written(5.0)

    def settle(self, timeout_s: float = 5.0) -> None:
        """Wait until every run answered before this call is in the history and the audit log
        (read-your-writes for their readers: both are written just after the answer left). Runs
        answered later are not waited for, so a steady stream of runs cannot hold a reader."""
        self._unsaved.wait_until_written(timeout_s)

    def _check_sizes(self, policy: Policy, source: str, stdin: str | None, what: str) -> None:
        m = policy.limits.maxima
        size = len(source.encode("utf-8", "surrogatepass"))
        if size > m.code_bytes:
            raise PayloadTooLarge(
                f"{what} is {size} bytes; the policy allows at most {m.code_bytes}"
            )
        if not source.strip():
            raise InvalidRequest(f"{what} is empty")
        if "\x00" in source:
            raise InvalidRequest(f"{what} contains a NUL byte")
        if stdin is not None and len(stdin.encode("utf-8", "surrogatepass")) > m.stdin_bytes:
            raise PayloadTooLarge(f"stdin is larger than the policy's {m.stdin_bytes} bytes")

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
            self._quotas.record_run(session, principal.workspace, execution.cpu_ms)


def _effective(limits: Limits) -> EffectiveLimits:
    return EffectiveLimits(
        timeout_s=limits.timeout_s,
        cpu_s=limits.cpu_s,
        memory_mib=limits.memory_mib,
        processes=limits.processes,
        file_size_mib=limits.file_size_mib,
        open_files=limits.open_files,
        tmp_size_mib=limits.tmp_size_mib,
        output_bytes=limits.output_bytes,
    )


class _Writer:
    """One thread that runs submitted work in order. A bounded queue: when the database falls
    behind, answers wait for room rather than memory growing."""

    _STOP = object()

    def __init__(self, capacity: int = 10_000) -> None:
        self._queue: queue.Queue[Callable[[], None] | object] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._loop, name="nox-after-answer", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[], None]) -> None:
        self._queue.put(work)

    def is_current(self) -> bool:
        """Whether the caller is this writer's own thread."""
        return threading.current_thread() is self._thread

    def close(self, timeout_s: float) -> None:
        self._queue.put(self._STOP)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("the history and audit writer did not finish within %g s", timeout_s)

    def _loop(self) -> None:
        while True:
            work = self._queue.get()
            if work is self._STOP:
                return
            try:
                work()  # type: ignore[operator]
            except Exception:  # one failed write must not stop the ones after it
                log.exception("writing a finished run's history row or audit record failed")


class _Pending:
    """Answered runs whose rows are not in the database yet, by ticket (increasing)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._issued = 0
        self._open: set[int] = set()

    def add(self) -> int:
        with self._changed:
            self._issued += 1
            self._open.add(self._issued)
            return self._issued

    def done(self, ticket: int) -> None:
        with self._changed:
            self._open.discard(ticket)
            self._changed.notify_all()

    def wait_until_written(self, timeout_s: float) -> bool:
        """Wait until no ticket issued before now is open; False on timeout."""
        with self._changed:
            upto = self._issued
            return self._changed.wait_for(
                lambda: not self._open or min(self._open) > upto, timeout_s
            )


def _nothing() -> None:
    """``keep`` of a run whose rows were written before it was answered."""


def _once(action: Callable[[], None]) -> Callable[[], None]:
    """``action``, done at the first call only: a route may reach ``keep`` twice (the answer
    sent, and a cancelled request's clean-up), and a run is written once."""
    done = threading.Lock()

    def call() -> None:
        if done.acquire(blocking=False):
            action()

    return call
