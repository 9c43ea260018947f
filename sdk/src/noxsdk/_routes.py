"""The routes of the Nox HTTP API (shared/API.md) as data, and one builder per client method.

A :class:`Route` row says a route's method, path template, the statuses that mean success, how
its answer is read and whether it may be retried; a builder turns a method's arguments into a
:class:`Call` of that route (path, query, body). The clients only send calls: the sync and the
async client share every row and every builder.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ValidationError

from noxsdk._upload import MultipartUpload, Progress, Source, Upload
from noxsdk.errors import InvalidRequestError
from noxsdk.models import (
    AuditList,
    AuditVerify,
    BackupCreate,
    BackupInfo,
    BackupList,
    BackupRestored,
    Execution,
    ExecutionDetail,
    ExecutionKind,
    ExecutionStatus,
    FileInfo,
    FileList,
    FileSearch,
    FileSearchResult,
    Health,
    HealthReport,
    HistoryPage,
    LogLines,
    Me,
    RunPython,
    RunShell,
    SandboxClean,
    SandboxCleaned,
    SystemResources,
    SystemStats,
    TokenCreate,
    TokenCreated,
    TokenList,
    TokenRole,
)

__all__ = [
    "Call",
    "RUN_TIMEOUT_MARGIN_S",
    "Route",
    "audit",
    "clean",
    "create_backup",
    "create_token",
    "delete_file",
    "execution",
    "health",
    "health_detailed",
    "history",
    "list_backups",
    "list_files",
    "list_tokens",
    "log_stream",
    "logs",
    "me",
    "policy",
    "put",
    "read_file",
    "reload_policy",
    "resources",
    "restore_backup",
    "revoke_token",
    "run_py",
    "run_sh",
    "search_files",
    "stats",
    "verify_audit",
    "write_file",
]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

RUN_TIMEOUT_MARGIN_S = 30.0  # a run's answer may take its timeout_s plus this, at least
_LOG_STREAM_READ_S = 45.0  # an idle log stream sends a keep-alive every 15 s

Query = Mapping[str, str | int | float | bool | None]


def _model(cls: type[M]) -> Callable[[bytes], M]:
    return cls.model_validate_json


def _nothing(_body: bytes) -> None:
    return None


def _raw(body: bytes) -> bytes:
    return body


def _object(body: bytes) -> dict[str, Any]:
    value = json.loads(body)
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


@dataclass(frozen=True, slots=True)
class Route(Generic[T]):
    """One route: ``parse`` reads a successful answer's body; ``idempotent`` routes are
    retried on failures that waiting may cure (see ``noxsdk._retry``)."""

    method: str
    path: str
    parse: Callable[[bytes], T]
    idempotent: bool
    success: tuple[int, ...] = (200,)

    def call(
        self,
        *,
        params: Query | None = None,
        body: BaseModel | None = None,
        upload: Upload | None = None,
        read_timeout: float | None = None,
        **args: str,
    ) -> Call[T]:
        path = self.path.format_map({name: _segment(name, value) for name, value in args.items()})
        query = {k: _query_value(v) for k, v in (params or {}).items() if v is not None}
        content = None if body is None else body.model_dump_json(exclude_none=True).encode()
        return Call(self, path, query, content, upload, read_timeout)


def _segment(name: str, value: str) -> str:
    """A path argument, percent-encoded; ``path`` keeps its slashes. Dot segments are encoded
    too, or the URL would be normalised before the server could refuse them."""
    parts = value.split("/") if name == "path" else [value]
    return "/".join("%2E" * len(p) if p in (".", "..") else quote(p, safe="") for p in parts)


def _query_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One request to send: a route with its arguments filled in."""

    route: Route[T]
    path: str
    params: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None  # a JSON body
    upload: Upload | None = None  # a streamed body
    read_timeout: float | None = None  # at least this long to read the answer

    @property
    def retryable(self) -> bool:
        return self.route.idempotent and (self.upload is None or self.upload.replayable)

    def headers(self) -> dict[str, str]:
        if self.upload is not None:
            return self.upload.headers()
        if self.content is not None:
            return {"Content-Type": "application/json"}
        return {}


def _request(model: type[M], **fields: Any) -> M:
    """A request body, checked here: a mistake is an error before anything is sent."""
    try:
        return model(**fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise InvalidRequestError(f"invalid {model.__name__}: {problems}") from None


# -- the routes: method, path, answer, idempotent, success statuses --

_HEALTH = Route("GET", "/health", _model(Health), True)
_RUN_PY = Route("POST", "/run_py", _model(Execution), False)
_RUN_SH = Route("POST", "/run_sh", _model(Execution), False)
_PUT = Route("POST", "/put", _model(FileInfo), False, (201,))
_FILES = Route("GET", "/api/files", _model(FileList), True)
_FILE_READ = Route("GET", "/api/files/{path}", _raw, True)
_FILE_WRITE = Route("PUT", "/api/files/{path}", _model(FileInfo), True, (201,))
_FILE_DELETE = Route("DELETE", "/api/files/{path}", _nothing, True, (204,))
_FILE_SEARCH = Route("POST", "/api/files/search", _model(FileSearchResult), True)  # reads only
_HISTORY = Route("GET", "/api/history", _model(HistoryPage), True)
_EXECUTION = Route("GET", "/api/history/{id}", _model(ExecutionDetail), True)
_STATS = Route("GET", "/api/system/stats", _model(SystemStats), True)
_RESOURCES = Route("GET", "/api/system/resources", _model(SystemResources), True)
# "fail" is a report too: 503 with the same body
_HEALTH_DETAILED = Route("GET", "/api/health/detailed", _model(HealthReport), True, (200, 503))
_ME = Route("GET", "/api/me", _model(Me), True)
_TOKEN_CREATE = Route("POST", "/api/tokens", _model(TokenCreated), False, (201,))
_TOKENS = Route("GET", "/api/tokens", _model(TokenList), True)
_TOKEN_REVOKE = Route("DELETE", "/api/tokens/{id}", _nothing, True, (204,))
_AUDIT = Route("GET", "/api/audit", _model(AuditList), True)
_AUDIT_VERIFY = Route("GET", "/api/audit/verify", _model(AuditVerify), True)
_POLICY = Route("GET", "/api/policy", _object, True)
_POLICY_RELOAD = Route("POST", "/api/policy/reload", _object, False)
_BACKUP_CREATE = Route("POST", "/api/backups", _model(BackupInfo), False, (201,))
_BACKUPS = Route("GET", "/api/backups", _model(BackupList), True)
_BACKUP_RESTORE = Route("POST", "/api/backups/{name}/restore", _model(BackupRestored), False)
_CLEAN = Route("POST", "/api/sandbox/clean", _model(SandboxCleaned), False)
_LOGS = Route("GET", "/api/logs", _model(LogLines), True)
_LOG_STREAM = Route("GET", "/api/logs/stream", _nothing, True)  # read as events, not parsed


# -- the builders: one per client method; their docstrings are the methods' --


def health() -> Call[Health]:
    """``GET /health``: is the server up, and its version (no token needed)."""
    return _HEALTH.call()


def run_py(
    code: str,
    *,
    stdin: str | None = None,
    timeout_s: float | None = None,
    memory_mib: int | None = None,
    env: dict[str, str] | None = None,
) -> Call[Execution]:
    """``POST /run_py``: run Python ``code`` in a sandbox of the token's workspace. A failing
    program is still a result: look at ``status`` and ``exit_code``. Never retried."""
    body = _request(
        RunPython, code=code, stdin=stdin, timeout_s=timeout_s, memory_mib=memory_mib, env=env
    )
    return _RUN_PY.call(body=body, read_timeout=_run_wait(timeout_s))


def run_sh(
    cmd: str,
    *,
    stdin: str | None = None,
    timeout_s: float | None = None,
    memory_mib: int | None = None,
    env: dict[str, str] | None = None,
) -> Call[Execution]:
    """``POST /run_sh``: run ``cmd`` with ``/bin/sh -c`` in a sandbox of the token's
    workspace. Never retried."""
    body = _request(
        RunShell, cmd=cmd, stdin=stdin, timeout_s=timeout_s, memory_mib=memory_mib, env=env
    )
    return _RUN_SH.call(body=body, read_timeout=_run_wait(timeout_s))


def _run_wait(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else timeout_s + RUN_TIMEOUT_MARGIN_S


def put(
    source: Source,
    path: str | None = None,
    *,
    workspace: str | None = None,
    progress: Progress | None = None,
) -> Call[FileInfo]:
    """``POST /put``: upload ``source`` (bytes, a ``pathlib.Path`` or a binary file object,
    streamed) as multipart to ``path`` (default: the source file's name). Never retried; prefer
    :meth:`write_file`, which is."""
    upload = MultipartUpload(source, progress, fields={"path": path} if path else None)
    return _PUT.call(params={"workspace": workspace}, upload=upload)


def list_files(
    path: str = "", *, recursive: bool = False, workspace: str | None = None
) -> Call[FileList]:
    """``GET /api/files``: the entries of folder ``path`` ("" for the workspace), or of its
    whole tree with ``recursive``."""
    params: Query = {"path": path, "recursive": recursive, "workspace": workspace}
    return _FILES.call(params=params)


def read_file(path: str, *, workspace: str | None = None) -> Call[bytes]:
    """``GET /api/files/{path}``: the file's bytes, in memory (use :meth:`download` or
    :meth:`iter_file` for large files)."""
    return _FILE_READ.call(params={"workspace": workspace}, path=path)


def write_file(
    path: str,
    source: Source,
    *,
    workspace: str | None = None,
    progress: Progress | None = None,
) -> Call[FileInfo]:
    """``PUT /api/files/{path}``: upload ``source`` (bytes, a ``pathlib.Path`` or a binary file
    object, streamed) to ``path``, creating its folders and replacing a file there."""
    return _FILE_WRITE.call(
        params={"workspace": workspace}, upload=Upload(source, progress), path=path
    )


def delete_file(path: str, *, recursive: bool = False, workspace: str | None = None) -> Call[None]:
    """``DELETE /api/files/{path}``: remove a file, a link or a folder (a folder that is not
    empty needs ``recursive``)."""
    params: Query = {"recursive": recursive, "workspace": workspace}
    return _FILE_DELETE.call(params=params, path=path)


def search_files(
    query: str,
    *,
    glob: str | None = None,
    regex: bool = False,
    max_results: int | None = None,
    workspace: str | None = None,
) -> Call[FileSearchResult]:
    """``POST /api/files/search``: lines of the workspace's files that contain ``query`` (a
    regular expression with ``regex``), in files whose path matches ``glob``; an empty
    ``query`` finds files by ``glob`` alone. ``max_results`` None: the server's default."""
    fields: dict[str, Any] = {"query": query, "glob": glob, "regex": regex}
    if max_results is not None:
        fields["max_results"] = max_results
    return _FILE_SEARCH.call(params={"workspace": workspace}, body=_request(FileSearch, **fields))


def history(
    *,
    limit: int | None = None,
    offset: int | None = None,
    kind: ExecutionKind | str | None = None,
    status: ExecutionStatus | str | None = None,
    workspace: str | None = None,
) -> Call[HistoryPage]:
    """``GET /api/history``: a page of runs, newest first, without output or code (None: the
    server's default page)."""
    params: Query = {
        "limit": limit,
        "offset": offset,
        "kind": None if kind is None else str(kind),
        "status": None if status is None else str(status),
        "workspace": workspace,
    }
    return _HISTORY.call(params=params)


def execution(execution_id: str) -> Call[ExecutionDetail]:
    """``GET /api/history/{id}``: one run with its output and its code."""
    return _EXECUTION.call(id=execution_id)


def stats(*, workspace: str | None = None) -> Call[SystemStats]:
    """``GET /api/system/stats``: run and file statistics of the token's workspace (an admin:
    of every workspace, or of ``workspace``)."""
    return _STATS.call(params={"workspace": workspace})


def resources() -> Call[SystemResources]:
    """``GET /api/system/resources``: CPU, load, memory, disk and cgroup limits of the server."""
    return _RESOURCES.call()


def health_detailed() -> Call[HealthReport]:
    """``GET /api/health/detailed``: each part's health. A ``fail`` report is returned, not
    raised (the server answers it with HTTP 503)."""
    return _HEALTH_DETAILED.call()


def me() -> Call[Me]:
    """``GET /api/me``: who this client's token is."""
    return _ME.call()


def create_token(
    name: str,
    role: TokenRole | str,
    *,
    workspace: str | None = None,
    expires_in_days: int | None = None,
) -> Call[TokenCreated]:
    """``POST /api/tokens`` (admin): a new token; its secret, ``token``, is shown this once."""
    body = _request(
        TokenCreate, name=name, role=role, workspace=workspace, expires_in_days=expires_in_days
    )
    return _TOKEN_CREATE.call(body=body)


def list_tokens(*, workspace: str | None = None) -> Call[TokenList]:
    """``GET /api/tokens`` (admin): every token, without secrets, newest first."""
    return _TOKENS.call(params={"workspace": workspace})


def revoke_token(token_id: str) -> Call[None]:
    """``DELETE /api/tokens/{id}`` (admin): the token stops working at once."""
    return _TOKEN_REVOKE.call(id=token_id)


def audit(
    *,
    limit: int | None = None,
    action: str | None = None,
    actor: str | None = None,
    workspace: str | None = None,
) -> Call[AuditList]:
    """``GET /api/audit`` (admin): audit log entries, newest first."""
    params: Query = {"limit": limit, "action": action, "actor": actor, "workspace": workspace}
    return _AUDIT.call(params=params)


def verify_audit() -> Call[AuditVerify]:
    """``GET /api/audit/verify`` (admin): check the audit log's MAC chain."""
    return _AUDIT_VERIFY.call()


def policy() -> Call[dict[str, Any]]:
    """``GET /api/policy`` (admin): the policy in force, as JSON."""
    return _POLICY.call()


def reload_policy() -> Call[dict[str, Any]]:
    """``POST /api/policy/reload`` (admin): load the policy file again; a bad file raises
    :class:`~noxsdk.errors.InvalidRequestError` and the old policy stays."""
    return _POLICY_RELOAD.call()


def create_backup(name: str) -> Call[BackupInfo]:
    """``POST /api/backups`` (admin): an encrypted backup of the data folder."""
    return _BACKUP_CREATE.call(body=_request(BackupCreate, name=name))


def list_backups() -> Call[BackupList]:
    """``GET /api/backups`` (admin): the backups, newest first."""
    return _BACKUPS.call()


def restore_backup(name: str) -> Call[BackupRestored]:
    """``POST /api/backups/{name}/restore`` (admin): restore a backup (the server first backs
    up the present state)."""
    return _BACKUP_RESTORE.call(name=name)


def clean(
    *,
    older_than_days: int | None = None,
    workspace: str | None = None,
    dry_run: bool = False,
) -> Call[SandboxCleaned]:
    """``POST /api/sandbox/clean`` (admin): remove leftover temporary files and, with
    ``older_than_days``, old workspace files; ``dry_run`` only reports."""
    body = _request(
        SandboxClean, older_than_days=older_than_days, workspace=workspace, dry_run=dry_run
    )
    return _CLEAN.call(body=body)


def logs(tail: int | None = None) -> Call[LogLines]:
    """``GET /api/logs`` (admin): the last ``tail`` server log lines (JSON each), oldest
    first (None: the server's default, 100)."""
    return _LOGS.call(params={"tail": tail})


def log_stream(duration_s: float | None = None) -> Call[None]:
    """``GET /api/logs/stream`` (admin): Server-Sent Events, one per new log line."""
    return _LOG_STREAM.call(params={"duration_s": duration_s}, read_timeout=_LOG_STREAM_READ_S)
