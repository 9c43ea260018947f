"""The one exception tree of the SDK. Every failure of a call raises one of these, never an
``httpx2`` or ``pydantic`` exception::

    NoxError                      (base)                           status  exit
    ├── NoxConnectionError        connection_error: no answer      None    1
    │   └── NoxTimeoutError       timeout: no answer in time       None    1
    ├── InvalidRequestError       invalid_request, invalid_path    400/422 2
    ├── AuthError                 unauthorized                     401     3
    ├── PermissionDenied          forbidden                        403     3
    ├── NotFoundError             not_found                        404     4
    ├── ConflictError             conflict                         409     1
    ├── PayloadTooLargeError      payload_too_large                413     5
    ├── RateLimitedError          rate_limited (.retry_after)      429     5
    ├── QuotaExceededError        quota_exceeded                   429     5
    │                             storage_quota_exceeded           507     5
    ├── InsufficientStorageError  insufficient_storage             507     5
    ├── SandboxUnavailableError   sandbox_unavailable              503     1
    └── ServerError               internal, anything unexpected    500...  1

``code`` is the server's error code (or the SDK's own for failures without an answer),
``status`` the HTTP status (``None`` when no answer came), ``message`` the server's sentence,
``request_id`` the server's id of the request (quote it when reporting a problem).
``str(error)`` is one line: ``HTTP 404 not_found: no such file 'x' (request 3f2a...)``.
``exit_code`` is what ``noxctl`` exits with.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AuthError",
    "ConflictError",
    "InsufficientStorageError",
    "InvalidRequestError",
    "NotFoundError",
    "NoxConnectionError",
    "NoxError",
    "NoxTimeoutError",
    "PayloadTooLargeError",
    "PermissionDenied",
    "QuotaExceededError",
    "RateLimitedError",
    "SandboxUnavailableError",
    "ServerError",
]


class NoxError(Exception):
    """Base of every error the SDK raises."""

    default_code: ClassVar[str] = "error"
    exit_code: ClassVar[int] = 1

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
    ) -> None:
        self.message = " ".join(message.split())  # one line, whatever the server sent
        self.code = code or self.default_code
        self.status = status
        self.request_id = request_id
        super().__init__(self.message)

    def __str__(self) -> str:
        head = self.code if self.status is None else f"HTTP {self.status} {self.code}"
        tail = f" (request {self.request_id})" if self.request_id else ""
        return f"{head}: {self.message}{tail}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, status={self.status!r}, "
            f"message={self.message!r}, request_id={self.request_id!r})"
        )


class NoxConnectionError(NoxError):
    """No answer: the server could not be reached, the URL is wrong, or the connection broke."""

    default_code = "connection_error"
    exit_code = 1


class NoxTimeoutError(NoxConnectionError):
    """The server did not answer within the client's timeout."""

    default_code = "timeout"


class InvalidRequestError(NoxError):
    """The request is not valid (400 or 422), a bad path (``invalid_path``) included; also
    raised before sending when the SDK can tell (``status`` is then ``None``)."""

    default_code = "invalid_request"
    exit_code = 2


class AuthError(NoxError):
    """401: no token, or one the server does not know (wrong, expired or revoked)."""

    default_code = "unauthorized"
    exit_code = 3


class PermissionDenied(NoxError):
    """403: the token's role may not do this, or it named another workspace."""

    default_code = "forbidden"
    exit_code = 3


class NotFoundError(NoxError):
    """404: no such file, run, token or backup (or no such route: check the URL)."""

    default_code = "not_found"
    exit_code = 4


class ConflictError(NoxError):
    """409: e.g. a folder that is not empty, a backup name taken, a backup already running."""

    default_code = "conflict"


class PayloadTooLargeError(NoxError):
    """413: an upload, code, command or stdin above the server's limit."""

    default_code = "payload_too_large"
    exit_code = 5


class RateLimitedError(NoxError):
    """429 ``rate_limited``: too many requests; ``retry_after`` is the server's wait in
    seconds (``None`` when it sent none). Idempotent calls retry by themselves first."""

    default_code = "rate_limited"
    exit_code = 5

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code=code, status=status, request_id=request_id)
        self.retry_after = retry_after


class QuotaExceededError(NoxError):
    """A workspace's quota is spent: 429 ``quota_exceeded`` (runs, CPU or uploads per day) or
    507 ``storage_quota_exceeded`` (stored bytes). Never retried: waiting seconds won't help."""

    default_code = "quota_exceeded"
    exit_code = 5


class InsufficientStorageError(NoxError):
    """507 ``insufficient_storage``: the server's own disk is too full."""

    default_code = "insufficient_storage"
    exit_code = 5


class SandboxUnavailableError(NoxError):
    """503 ``sandbox_unavailable``: the server cannot run code; the message says how to fix it."""

    default_code = "sandbox_unavailable"


class ServerError(NoxError):
    """500 or any answer the SDK did not expect: another status, a body that is not JSON (a
    proxy's page, another web server at that URL) or not the shape of the API."""

    default_code = "internal"
