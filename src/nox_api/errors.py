"""The one exception tree of the server. Each error knows its wire ``code``, HTTP status and the
exit code of the ``nox-api`` command line::

    NoxError                      internal             500  exit 1
    ├── ConfigError               (start-up only)            exit 2
    ├── InvalidRequest            invalid_request      400  exit 2
    │   └── InvalidPath           invalid_path         400  exit 2
    ├── Unauthorized              unauthorized         401  exit 3
    ├── Forbidden                 forbidden            403  exit 3
    ├── NotFound                  not_found            404  exit 4
    ├── Conflict                  conflict             409  exit 1
    ├── PayloadTooLarge           payload_too_large    413  exit 5
    ├── RateLimited               rate_limited         429  exit 6
    ├── QuotaExceeded             quota_exceeded       429  exit 6
    ├── StorageQuotaExceeded      storage_quota_exceeded 507 exit 6
    └── SandboxUnavailableError   sandbox_unavailable  503  exit 1

Raise these from services; the app turns them into the JSON envelope of API.md.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ConfigError",
    "Conflict",
    "Forbidden",
    "InvalidPath",
    "InvalidRequest",
    "NotFound",
    "NoxError",
    "PayloadTooLarge",
    "QuotaExceeded",
    "RateLimited",
    "SandboxUnavailableError",
    "StorageQuotaExceeded",
    "Unauthorized",
]


class NoxError(Exception):
    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class ConfigError(NoxError):
    code = "invalid_configuration"
    exit_code = 2


class InvalidRequest(NoxError):
    code = "invalid_request"
    status = 400
    exit_code = 2


class InvalidPath(InvalidRequest):
    code = "invalid_path"


class Unauthorized(NoxError):
    code = "unauthorized"
    status = 401
    exit_code = 3


class Forbidden(NoxError):
    code = "forbidden"
    status = 403
    exit_code = 3


class NotFound(NoxError):
    code = "not_found"
    status = 404
    exit_code = 4


class Conflict(NoxError):
    code = "conflict"
    status = 409


class PayloadTooLarge(NoxError):
    code = "payload_too_large"
    status = 413
    exit_code = 5


class RateLimited(NoxError):
    code = "rate_limited"
    status = 429
    exit_code = 6


class QuotaExceeded(NoxError):
    code = "quota_exceeded"
    status = 429
    exit_code = 6


class StorageQuotaExceeded(NoxError):
    code = "storage_quota_exceeded"
    status = 507
    exit_code = 6


class InsufficientStorage(NoxError):
    """The server's own disk is full (not a workspace's quota)."""

    code = "insufficient_storage"
    status = 507
    exit_code = 6  # as the other "no room" errors


class SandboxUnavailableError(NoxError):
    code = "sandbox_unavailable"
    status = 503
