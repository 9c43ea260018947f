"""Wire models of the Nox HTTP API (``shared/API.md``), defined once and shared.

The server validates requests and shapes answers with these classes; the SDK and ``noxctl``
parse answers with them. Request models forbid unknown fields so that a typo such as
``"timeout": 5`` is an error instead of a silently ignored option.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_ENV_VARS = 64
MAX_ENV_VALUE_CHARS = 32_768


class ExecutionKind(StrEnum):
    """What ran: Python code or a shell command."""

    PYTHON = "python"
    SHELL = "shell"


class ExecutionStatus(StrEnum):
    """How a run ended (the HTTP status describes the request, this describes the run)."""

    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    MEMORY_LIMIT = "memory_limit"
    OUTPUT_LIMIT = "output_limit"
    KILLED = "killed"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stdin: str | None = Field(default=None, description="Text fed to the program's standard input.")
    timeout_s: Annotated[float, Field(gt=0, le=86_400)] | None = Field(
        default=None,
        description="Wall-clock limit in seconds (default and maximum from the policy).",
    )
    memory_mib: Annotated[int, Field(gt=0, le=1_048_576)] | None = Field(
        default=None, description="Memory limit in MiB (default and maximum from the policy)."
    )
    env: dict[str, str] | None = Field(
        default=None, description="Extra environment variables for the program."
    )

    @field_validator("env")
    @classmethod
    def _check_env(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_ENV_VARS:
            raise ValueError(f"at most {MAX_ENV_VARS} environment variables are allowed")
        for name, val in value.items():
            if not ENV_NAME_RE.match(name):
                raise ValueError(
                    f"environment variable name {name[:40]!r} must match {ENV_NAME_RE.pattern}"
                )
            if "\x00" in val:
                raise ValueError(f"environment variable {name} contains a NUL byte")
            if len(val) > MAX_ENV_VALUE_CHARS:
                raise ValueError(
                    f"environment variable {name} is longer than {MAX_ENV_VALUE_CHARS} characters"
                )
        return value


class RunPython(_Request):
    """Body of ``POST /run_py``."""

    code: str = Field(description="Python source to run as the program's __main__.")


class RunShell(_Request):
    """Body of ``POST /run_sh``."""

    cmd: str = Field(description="Command line run by /bin/sh -c.")


class EffectiveLimits(BaseModel):
    """The limits a run actually had (defaults filled in from the policy)."""

    timeout_s: float
    cpu_s: int
    memory_mib: int
    processes: int
    file_size_mib: int
    open_files: int
    tmp_size_mib: int
    output_bytes: int


class Execution(BaseModel):
    """One run: the answer of the run routes and the item of history."""

    id: str
    kind: ExecutionKind
    status: ExecutionStatus
    exit_code: int | None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_ms: float
    cpu_ms: float | None = None
    started_at: datetime
    workspace: str
    actor: str
    request_id: str | None = None
    limits: EffectiveLimits | None = None


class ExecutionDetail(Execution):
    """An Execution with the code or command that ran (``GET /api/history/{id}``)."""

    code: str


class FileInfo(BaseModel):
    """A file or folder of a workspace."""

    path: str
    name: str
    type: str = Field(description='"file" or "dir"')
    size: int
    modified: datetime
    sha256: str | None = None


class Health(BaseModel):
    """Answer of ``GET /health``."""

    status: str
    version: str


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str | None = None


class ErrorEnvelope(BaseModel):
    """Every error answer: ``{"error": {"code", "message", "request_id"}}``."""

    error: ErrorBody


class TokenRole(StrEnum):
    """What a token may do: viewer reads, runner also runs and uploads, admin does all."""

    VIEWER = "viewer"
    RUNNER = "runner"
    ADMIN = "admin"


class Me(BaseModel):
    """Answer of ``GET /api/me``: who the token is."""

    id: str
    name: str
    role: TokenRole
    workspace: str


class TokenCreate(BaseModel):
    """Body of ``POST /api/tokens``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    role: TokenRole
    workspace: str | None = Field(None, min_length=1, max_length=63)
    expires_in_days: int | None = Field(None, ge=1, le=3650)


class TokenItem(BaseModel):
    """A token as ``GET /api/tokens`` lists it: never its secret."""

    id: str
    name: str
    role: TokenRole
    workspace: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    active: bool


class TokenCreated(BaseModel):
    """Answer of ``POST /api/tokens``; ``token`` is shown this once only."""

    id: str
    name: str
    role: TokenRole
    workspace: str
    token: str
    created_at: datetime
    expires_at: datetime | None = None


class TokenList(BaseModel):
    items: list[TokenItem]


class AuditEntry(BaseModel):
    """One line of the audit log (``mac`` chains it to the line before)."""

    model_config = ConfigDict(extra="allow")

    seq: int
    time: str
    action: str
    outcome: str
    actor_id: str | None = None
    actor_name: str | None = None
    role: str | None = None
    workspace: str | None = None
    target: str | None = None
    client: str | None = None
    request_id: str | None = None
    details: dict[str, object] = Field(default_factory=dict)
    mac: str


class AuditList(BaseModel):
    items: list[AuditEntry]


class AuditVerify(BaseModel):
    """Answer of ``GET /api/audit/verify``."""

    ok: bool
    entries: int
    first_bad_line: int | None = None
    reason: str | None = None
    file: str | None = None
