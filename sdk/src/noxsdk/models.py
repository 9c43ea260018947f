"""Wire models of the Nox HTTP API (``shared/API.md``), defined once and shared.

The server validates requests and shapes answers with these classes; the SDK and ``noxctl``
parse answers with them. Request models forbid unknown fields so that a typo such as
``"timeout": 5`` is an error instead of a silently ignored option.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

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


class ExecutionSummary(BaseModel):
    """A run as ``GET /api/history`` lists it: every field of :class:`Execution` but the output
    bodies ``stdout`` and ``stderr`` (the ``*_truncated`` flags stay); no code either, that is in
    :class:`ExecutionDetail` (``GET /api/history/{id}``)."""

    id: str
    kind: ExecutionKind
    status: ExecutionStatus
    exit_code: int | None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_ms: float
    cpu_ms: float | None = None
    started_at: datetime
    workspace: str
    actor: str
    request_id: str | None = None
    limits: EffectiveLimits | None = None


class Execution(ExecutionSummary):
    """One run: the answer of the run routes (a history item is its summary)."""

    stdout: str = ""
    stderr: str = ""


class ExecutionDetail(Execution):
    """An Execution with the code or command that ran (``GET /api/history/{id}``)."""

    code: str


class FileInfo(BaseModel):
    """A file or folder of a workspace."""

    path: str
    name: str
    type: Literal["file", "dir", "symlink"] = Field(
        description='"file", "dir", or "symlink" (a link is listed, never followed)'
    )
    size: int = Field(description="Bytes of a file (0 for a folder, the link's own for a link).")
    modified: datetime
    sha256: str | None = Field(None, description="On upload answers only.")


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


# -- history, system stats and resources --


class HistoryPage(BaseModel):
    """Answer of ``GET /api/history``: one page, newest first, and how many runs match."""

    items: list[ExecutionSummary]
    total: int = Field(description="Runs matching the filters over all pages.")


class ExecutionStats(BaseModel):
    """Runs in history (retention may have removed older ones)."""

    total: int
    by_status: dict[str, int] = Field(description="Every status, zeros included.")
    by_kind: dict[str, int] = Field(description="Every kind, zeros included.")
    last_24h: int = Field(description="Runs started in the last 24 hours.")
    mean_duration_ms: float | None = Field(description="null when there is no run.")
    p95_duration_ms: float | None = Field(
        description="95th percentile, nearest-rank method; null when there is no run."
    )


class FileStats(BaseModel):
    """What the workspaces store, as their last scan found it (rescanned about a second after a
    run or a file change, never on request)."""

    count: int = Field(description="Regular files (symbolic links and folders not counted).")
    bytes: int
    workspaces: int = Field(description="Workspaces counted.")
    scanned_at: datetime | None = Field(
        description="Oldest scan among the workspaces counted; null when none was scanned."
    )


class SandboxBackend(BaseModel):
    """The sandbox backend this server runs code with."""

    name: str
    isolation: str
    available: bool


class SystemStats(BaseModel):
    """Answer of ``GET /api/system/stats``, computed from the database."""

    workspace: str | None = Field(
        description="The workspace counted; null: every workspace (admins without ?workspace=)."
    )
    executions: ExecutionStats
    files: FileStats
    uptime_s: float
    version: str
    sandbox: SandboxBackend


class MemoryUsage(BaseModel):
    total_bytes: int
    available_bytes: int
    used_percent: float


class DiskUsage(BaseModel):
    """The file system of the server's data folder."""

    total_bytes: int
    used_bytes: int
    free_bytes: int
    used_percent: float


class CgroupLimits(BaseModel):
    """Limits of the control group the server runs in (the tightest of its own group and the
    groups above it that it can see); ``"none"`` when unlimited."""

    version: str = Field(description='"v1" or "v2"')
    memory_limit_bytes: int | Literal["none"]
    cpu_quota_cores: float | Literal["none"] = Field(
        description="CPU quota over period: 1.5 means one and a half CPUs."
    )


class SystemResources(BaseModel):
    """Answer of ``GET /api/system/resources``: the machine as the server sees it now."""

    cpu_percent: float = Field(description="All CPUs, 0-100, since the previous sample.")
    cpu_count: int
    load_average: list[float] = Field(description="1, 5 and 15 minute load averages.")
    memory: MemoryUsage
    disk: DiskUsage
    cgroup: CgroupLimits | None = Field(
        description="null when no control group could be read (not Linux, no /proc)."
    )


# -- files --

MAX_SEARCH_PATTERN_CHARS = 1000
MAX_SEARCH_RESULTS = 1000


class FileList(BaseModel):
    """Answer of ``GET /api/files``: the entries of a folder, or of its whole tree."""

    path: str = Field(description='The folder listed, relative to the workspace ("" for it).')
    entries: list[FileInfo]
    truncated: bool = Field(
        False, description="True when the listing stopped at the server's entry or depth cap."
    )


class FileSearch(BaseModel):
    """Body of ``POST /api/files/search``."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(
        max_length=MAX_SEARCH_PATTERN_CHARS,
        description="Text to find in file contents, line by line (empty: match names by glob).",
    )
    glob: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_SEARCH_PATTERN_CHARS,
        description="Only paths matching this pattern (fnmatch). Without '/' it is matched "
        "against the file's name, with '/' against its path; '*' may cross folders.",
    )
    regex: bool = Field(False, description="The query is a regular expression (RE2 syntax).")
    max_results: int = Field(100, ge=1, le=MAX_SEARCH_RESULTS)


class FileMatch(BaseModel):
    """One line that matched (``line`` from 1), or a file found by name (``line`` null)."""

    path: str
    line: int | None = None
    text: str | None = Field(None, description="The line, cut to a window around the match.")


class FileSearchResult(BaseModel):
    """Answer of ``POST /api/files/search``."""

    matches: list[FileMatch]
    truncated: bool = Field(
        description="True when the search stopped early: max_results, time or byte budget."
    )


# -- operations: detailed health, sandbox clean, server logs --


class HealthStatus(StrEnum):
    """``ok``: working; ``degraded``: working, but an operator should look; ``fail``: cannot do
    its work (``GET /api/health/detailed`` then answers HTTP 503)."""

    OK = "ok"
    DEGRADED = "degraded"
    FAIL = "fail"


class HealthCheck(BaseModel):
    """One check: its status, a sentence saying why, and fields of its own (``free_mib``,
    ``backend``, ``revision``...; see docs/operations.md)."""

    model_config = ConfigDict(extra="allow")

    status: HealthStatus
    detail: str


class HealthChecks(BaseModel):
    database: HealthCheck
    sandbox: HealthCheck
    disk: HealthCheck
    audit: HealthCheck
    policy: HealthCheck


class HealthReport(BaseModel):
    """Answer of ``GET /api/health/detailed``: ``status`` is the worst of the checks."""

    status: HealthStatus
    checks: HealthChecks


class SandboxClean(BaseModel):
    """Body of ``POST /api/sandbox/clean``."""

    model_config = ConfigDict(extra="forbid")

    older_than_days: int | None = Field(
        None,
        ge=0,
        le=36_500,
        description="Also remove workspace files not modified for this many days (0: all).",
    )
    workspace: str | None = Field(
        None,
        min_length=1,
        max_length=63,
        description="Only this workspace (staging and probe folders are then left alone).",
    )
    dry_run: bool = Field(False, description="Report what would be removed; change nothing.")


class SandboxCleaned(BaseModel):
    """Answer of ``POST /api/sandbox/clean``."""

    removed: int = Field(description="Files, links and folders removed (or that would be).")
    freed_bytes: int = Field(description="Sum of the sizes of the regular files removed.")
    dry_run: bool
    paths: list[str] = Field(
        description="What was removed, relative to the data folder; the first 1000 only."
    )
    paths_truncated: bool = Field(description="True when ``paths`` does not list them all.")


class LogLines(BaseModel):
    """Answer of ``GET /api/logs``: server log lines (each one JSON object), oldest first."""

    lines: list[str]


# -- backups --


class BackupCreate(BaseModel):
    """Body of ``POST /api/backups``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        description="1-64 characters of A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.' "
        "or '-'; the backup is the file <name>.noxbak in the backups folder."
    )


class BackupInfo(BaseModel):
    """One backup file (answer of ``POST /api/backups``, item of ``GET /api/backups``)."""

    name: str
    size: int = Field(description="Bytes of the backup file.")
    created_at: datetime
    sha256: str = Field(description="SHA-256 of the backup file, as sha256sum prints it.")


class BackupList(BaseModel):
    """Answer of ``GET /api/backups``: newest first."""

    items: list[BackupInfo]


class RestoredCounts(BaseModel):
    """What a restore brought back."""

    workspaces: int
    files: int = Field(description="Regular files in the workspaces.")
    bytes: int = Field(description="Bytes of those files.")
    executions: int = Field(description="Runs in the history.")
    tokens: int = Field(description="Stored tokens, revoked and expired ones included.")
    audit_entries: int = Field(description="Lines of the audit log, before the restore's own.")


class BackupRestored(BaseModel):
    """Answer of ``POST /api/backups/{name}/restore``."""

    restored: RestoredCounts
    pre_restore: str = Field(
        description="Name of the backup of the state before the restore, taken automatically."
    )
