"""What ``noxctl`` exits with, and the one line it prints when a command fails.

Two tables, both printed in docs/cli.md by ``scripts/gen_cli_docs.py``: :data:`ERROR_EXITS`
lists the SDK's exceptions, whose ``exit_code`` is what ``noxctl`` exits with when a request
fails (1 server or connection, 2 invalid, 3 auth, 4 not found, 5 limits), and :data:`RUN_EXITS`
says what ``run-py`` / ``run-sh`` exit with for each way a run can end.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from noxsdk.errors import (
    AuthError,
    ConflictError,
    InsufficientStorageError,
    InvalidRequestError,
    NotFoundError,
    NoxConnectionError,
    NoxError,
    NoxTimeoutError,
    PayloadTooLargeError,
    PermissionDenied,
    QuotaExceededError,
    RateLimitedError,
    SandboxUnavailableError,
    ServerError,
)
from noxsdk.models import Execution, ExecutionStatus

__all__ = [
    "ERROR_EXITS",
    "EXIT_AUTH",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_LIMIT",
    "EXIT_MEMORY",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "Failure",
    "RUN_EXITS",
    "Refused",
    "run_exit_code",
]

EXIT_OK = 0
EXIT_FAILURE = 1  # the server failed, could not be reached, or refused for another reason
EXIT_USAGE = 2  # a wrong command line, or a request the server found invalid
EXIT_AUTH = 3  # no token, a wrong one, or one whose role may not do this
EXIT_NOT_FOUND = 4  # no such file, run, token or backup
EXIT_LIMIT = 5  # a size limit, rate limit, quota or the server's free-disk floor
EXIT_TIMEOUT = 124  # a run hit its time limit (as coreutils' timeout)
EXIT_MEMORY = 137  # a run hit its memory limit (128 + SIGKILL, as the shell shows it)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)

# (exception, what it means): the exit code is the exception's own ``exit_code`` (see
# noxsdk.errors); the docs list these rows.
ERROR_EXITS: tuple[tuple[type[NoxError], str], ...] = (
    (NoxConnectionError, "no answer: a wrong URL, the server is down, or no answer in time"),
    (ConflictError, "a conflict (409): a folder not empty, a backup name taken"),
    (SandboxUnavailableError, "the server cannot run code now (503)"),
    (ServerError, "a server error (500), or what answered is not a Nox server"),
    (
        InvalidRequestError,
        "the request is invalid (400, 422): a bad path, a limit above the policy",
    ),
    (AuthError, "no token, or a wrong, expired or revoked one (401)"),
    (PermissionDenied, "the token's role or workspace may not do this (403)"),
    (NotFoundError, "no such file, run, token or backup (404)"),
    (PayloadTooLargeError, "an upload, code or stdin above the server's limit (413)"),
    (RateLimitedError, "too many requests (429 rate_limited)"),
    (QuotaExceededError, "a workspace quota is spent (429 quota_exceeded, 507)"),
    (InsufficientStorageError, "the server's disk is too full (507)"),
)

# (status, exit code, note) for the docs; run_exit_code is the rule itself.
RUN_EXITS: tuple[tuple[ExecutionStatus, str, str], ...] = (
    (ExecutionStatus.OK, "0", "the program exited with 0"),
    (ExecutionStatus.ERROR, "the program's exit code", "1-255, as the program exited"),
    (ExecutionStatus.TIMEOUT, str(EXIT_TIMEOUT), "the wall-clock or CPU time limit stopped it"),
    (ExecutionStatus.MEMORY_LIMIT, str(EXIT_MEMORY), "the memory limit stopped it"),
    (
        ExecutionStatus.OUTPUT_LIMIT,
        "the exit code the server reports",
        "its output passed the hard cap and the run was stopped (1 when none was reported)",
    ),
    (ExecutionStatus.KILLED, "128 + N", "signal N ended it, as the shell reports it"),
)


def run_exit_code(execution: Execution) -> int:
    """What ``run-py`` / ``run-sh`` exit with for ``execution``."""
    if execution.status is ExecutionStatus.OK:
        return EXIT_OK
    if execution.status is ExecutionStatus.TIMEOUT:
        return EXIT_TIMEOUT
    if execution.status is ExecutionStatus.MEMORY_LIMIT:
        return EXIT_MEMORY
    code = execution.exit_code
    return code if code is not None and 0 < code < 256 else EXIT_FAILURE


def _no_route(exc: NoxError) -> bool:
    """A 404 of the web framework itself (no route at this path), not a Nox ``not_found``:
    those always say what was not found."""
    return isinstance(exc, NotFoundError) and exc.message == "Not Found"


def _hint(exc: NoxError) -> str | None:  # noqa: PLR0911 - one return per kind of error
    if isinstance(exc, NoxTimeoutError):
        return "raise --timeout for slow calls, or check NOX_URL / --url"
    if isinstance(exc, NoxConnectionError):
        return "check NOX_URL / --url; is the server running?"
    if isinstance(exc, AuthError):
        return "check NOX_API_TOKEN / --token"
    if isinstance(exc, PermissionDenied):
        return "'noxctl whoami' shows this token's role and workspace"
    if _no_route(exc):
        return "check NOX_URL / --url: the server there has no such route"
    if exc.code == "unexpected_response":
        return "check NOX_URL / --url: what answered there is not a Nox server"
    if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
        return f"try again in {exc.retry_after:g} s"
    return None


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed command: its message and exit code, printed as one line or as JSON."""

    code: str
    message: str
    exit_code: int
    hint: str | None = None
    status: int | None = None
    request_id: str | None = None

    @classmethod
    def of(cls, exc: NoxError) -> Failure:
        """The failure an SDK error means."""
        # a URL that reaches no route is a wrong URL (exit 1), not a missing thing (exit 4)
        exit_code = EXIT_FAILURE if _no_route(exc) else exc.exit_code
        return cls(exc.code, exc.message, exit_code, _hint(exc), exc.status, exc.request_id)

    def line(self) -> str:
        """The one line printed without ``--json``."""
        text = " ".join(self.message.split())
        if self.status is not None:
            text = f"HTTP {self.status} {self.code}: {text}"
        if self.request_id:
            text += f" (request {self.request_id})"
        if self.hint:
            text += f" (hint: {self.hint})"
        return f"noxctl: error: {text}"

    def show(self, *, as_json: bool) -> int:
        """Print the failure on stderr (one line, or one JSON document); return its exit code."""
        if as_json:
            body = {
                "code": self.code,
                "message": self.message,
                "exit_code": self.exit_code,
                "status": self.status,
                "request_id": self.request_id,
                "hint": self.hint,
            }
            text = json.dumps({"error": body}, ensure_ascii=False)
        else:
            text = self.line()
        sys.stdout.flush()
        print(text, file=sys.stderr, flush=True)
        return self.exit_code


class Refused(Exception):
    """A command's own refusal (a usage problem found after parsing), shown as an error."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure
