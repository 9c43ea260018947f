"""The engine's small surface: what to run (:class:`RunSpec`), with which :class:`Limits`,
and what came out (:class:`Result`), behind the :class:`Sandbox` protocol.

The engine knows nothing of HTTP, users or the database: a workspace is a folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from noxsdk.models import ExecutionStatus

__all__ = [
    "BackendInfo",
    "Kind",
    "Limits",
    "Result",
    "RunSpec",
    "Sandbox",
    "SandboxUnavailable",
    "UnavailableSandbox",
]

Kind = Literal["python", "shell"]

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of one run. Units are in the names."""

    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mib: int = 256
    processes: int = 64
    file_size_mib: int = 64
    open_files: int = 256
    tmp_size_mib: int = 64
    output_bytes: int = 1 * MIB  # kept per stream; beyond it output is read and dropped
    output_hard_bytes: int = 64 * MIB  # both streams together; past it the run is stopped


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One run: ``source`` is Python code or a ``/bin/sh -c`` command line."""

    kind: Kind
    source: str
    workspace: Path
    limits: Limits
    stdin: bytes = b""
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Result:
    """What a run produced. ``exit_code`` follows the shell: 128 + N when signal N ended it."""

    status: ExecutionStatus
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    duration_ms: float
    cpu_ms: float | None
    warm: bool = False


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What a backend says about itself for health checks and stats."""

    name: str
    isolation: str  # "namespaces+seccomp", "none", "fake"
    limits_by: Mapping[str, str]  # limit name -> "cgroup v1", "cgroup v2", "rlimit", "bwrap"
    available: bool
    reason: str | None = None  # why it is unavailable, with the fix


class SandboxUnavailable(RuntimeError):
    """The backend cannot run code on this machine; the message says how to fix it."""


@runtime_checkable
class Sandbox(Protocol):
    """A sandbox backend. ``run`` blocks; the server calls it from a worker thread."""

    def info(self) -> BackendInfo: ...

    def run(self, spec: RunSpec) -> Result: ...

    def prewarm(self, workspace: Path) -> None: ...

    def prepare_workspace(self, workspace: Path) -> None: ...

    def flush(self) -> None:
        """Throw away every sandbox started ahead (warm): they bound workspace folders that a
        restore replaced. Runs already going on are not touched."""

    def set_ceiling(self, ceiling: Limits) -> None:
        """The largest limits runs may get from now on (the policy's maxima changed)."""

    def probe(self) -> str | None:
        """Run a trivial program now; return why it failed (with the fix), or None. A failed
        probe makes the backend unavailable until a later probe succeeds."""

    def close(self) -> None: ...


class UnavailableSandbox:
    """Stands in for a backend that cannot work here: every run answers with the reason."""

    isolation = "none"

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, "none", {}, available=False, reason=self.reason)

    def run(self, spec: RunSpec) -> Result:
        raise SandboxUnavailable(self.reason)

    def prewarm(self, workspace: Path) -> None:
        return None

    def prepare_workspace(self, workspace: Path) -> None:
        workspace.chmod(0o700)

    def flush(self) -> None:
        return None

    def set_ceiling(self, ceiling: Limits) -> None:
        return None

    def probe(self) -> str | None:
        return self.reason

    def close(self) -> None:
        return None
