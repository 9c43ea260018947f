"""What both clients share about sending a call: building each attempt's request, reading the
answer, mapping failures onto :mod:`noxsdk.errors`, and deciding on retries.

The clients only loop: build a request with :meth:`Exchange.request` and send it; a success is
returned, anything else goes to :meth:`Exchange.refused` (an answer) or :meth:`Exchange.failed`
(an ``httpx2`` error), which raise the SDK's error or give the wait before the next attempt.
Sync and async differ in nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import httpx2
from pydantic import ValidationError

from noxsdk._config import ClientConfig
from noxsdk._retry import RetryEvent, parse_retry_after
from noxsdk._routes import Call
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
from noxsdk.models import ErrorEnvelope

__all__ = ["Exchange", "error_from_response", "transport_error"]

T = TypeVar("T")

_BY_CODE: dict[str, type[NoxError]] = {
    "invalid_request": InvalidRequestError,
    "invalid_path": InvalidRequestError,
    "method_not_allowed": InvalidRequestError,
    "unsupported_media_type": InvalidRequestError,
    "unauthorized": AuthError,
    "forbidden": PermissionDenied,
    "not_found": NotFoundError,
    "conflict": ConflictError,
    "payload_too_large": PayloadTooLargeError,
    "rate_limited": RateLimitedError,
    "quota_exceeded": QuotaExceededError,
    "storage_quota_exceeded": QuotaExceededError,
    "insufficient_storage": InsufficientStorageError,
    "sandbox_unavailable": SandboxUnavailableError,
    "internal": ServerError,
}
_BY_STATUS: dict[int, type[NoxError]] = {
    400: InvalidRequestError,
    401: AuthError,
    403: PermissionDenied,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: InvalidRequestError,
    429: RateLimitedError,
    503: SandboxUnavailableError,
}
# no connection, or one that broke before the whole answer came: worth another attempt
_TRANSIENT = (
    httpx2.NetworkError,
    httpx2.ConnectTimeout,
    httpx2.PoolTimeout,
    httpx2.RemoteProtocolError,
)
_ERRNO_RE = re.compile(r"^\[Errno -?\d+\]\s*")


def _reason(exc: BaseException) -> str:
    text = _ERRNO_RE.sub("", str(exc).strip()) or type(exc).__name__
    return " ".join(text.split())


def transport_error(call: Call[Any], exc: httpx2.HTTPError, config: ClientConfig) -> NoxError:
    """The SDK's error for ``exc``, raised by ``httpx2`` while ``call`` went to the server."""
    what, url, timeout = f"{call.route.method} {call.path}", config.url, config.timeout
    read = timeout.read
    if read is not None and call.read_timeout is not None:
        read = max(read, call.read_timeout)
    timeouts: dict[type[httpx2.TimeoutException], str] = {
        httpx2.ConnectTimeout: f"could not connect to {url} within {timeout.connect} s",
        httpx2.ReadTimeout: f"no answer to {what} from {url} within the read timeout "
        f"(timeout={read} s; raise it for long calls)",
        httpx2.WriteTimeout: f"could not send {what} to {url} within {timeout.write} s",
        httpx2.PoolTimeout: f"no free connection to {url} within {timeout.pool} s",
    }
    for kind, message in timeouts.items():
        if isinstance(exc, kind):
            return NoxTimeoutError(message)
    if isinstance(exc, httpx2.SSEError):
        return ServerError(f"{what} did not answer a stream of events: {_reason(exc)}")
    if isinstance(exc, httpx2.ConnectError):
        message = f"could not connect to {url}: {_reason(exc)}"
    elif isinstance(exc, httpx2.RemoteProtocolError | httpx2.ReadError | httpx2.WriteError):
        message = f"the connection to {url} broke during {what}: {_reason(exc)}"
    else:
        message = f"{what} to {url} failed: {_reason(exc)}"
    return NoxConnectionError(message)


def error_from_response(
    response: httpx2.Response, call: Call[Any], config: ClientConfig
) -> NoxError:
    """The SDK's error for an unsuccessful answer (its body must have been read)."""
    status = response.status_code
    request_id = response.headers.get("x-request-id")
    try:
        body = ErrorEnvelope.model_validate_json(response.content).error
    except ValidationError:
        ctype = response.headers.get("content-type", "no content type").split(";")[0]
        return ServerError(
            f"{call.route.method} {call.path} got HTTP {status} ({ctype}), not a Nox answer: "
            f"is {config.url} a Nox server?",
            code="unexpected_response",
            status=status,
            request_id=request_id,
        )
    cls = _BY_CODE.get(body.code) or _BY_STATUS.get(status)
    if cls is None:
        cls = InvalidRequestError if 400 <= status < 500 else ServerError
    message = body.message
    if cls is AuthError and not config.token:
        message += " (this client has no token: pass token= or set NOX_API_TOKEN)"
    kwargs: dict[str, Any] = {
        "code": body.code,
        "status": status,
        "request_id": body.request_id or request_id,
    }
    if cls is RateLimitedError:
        kwargs["retry_after"] = parse_retry_after(response.headers.get("retry-after"))
    return cls(message, **kwargs)


class Exchange(Generic[T]):
    """The attempts of one call."""

    def __init__(self, call: Call[T], config: ClientConfig) -> None:
        self.call = call
        self.config = config
        self.attempt = 0

    def request(self, http: httpx2.Client | httpx2.AsyncClient) -> httpx2.Request:
        """The next attempt's request (a streamed body starts over)."""
        self.attempt += 1
        call = self.call
        timeout = self._timeout()
        content: Any = call.content
        if call.upload is not None:
            is_async = isinstance(http, httpx2.AsyncClient)
            content = call.upload.achunks() if is_async else call.upload.chunks()
        return http.build_request(
            call.route.method,
            call.path,
            params=call.params,
            content=content,
            headers=call.headers(),
            timeout=httpx2.USE_CLIENT_DEFAULT if timeout is None else timeout,
        )

    def _timeout(self) -> httpx2.Timeout | None:
        """A longer read timeout than the client's when the call needs one."""
        wait, base = self.call.read_timeout, self.config.timeout
        if wait is None or base.read is None or wait <= base.read:
            return None
        return httpx2.Timeout(connect=base.connect, read=wait, write=base.write, pool=base.pool)

    def succeeded(self, response: httpx2.Response) -> bool:
        return response.status_code in self.call.route.success

    def failed(self, exc: httpx2.HTTPError) -> float:
        """The wait before another attempt after ``exc``; raises when there is none."""
        error = transport_error(self.call, exc, self.config)
        if isinstance(exc, _TRANSIENT):
            delay = self._retry(None, None, str(error))
            if delay is not None:
                return delay
        raise error from None

    def refused(self, response: httpx2.Response) -> float:
        """The wait before another attempt after an answer that is not the call's success;
        raises the answer's error when there is none. The answer's body must have been read."""
        error = error_from_response(response, self.call, self.config)
        status = response.status_code
        if status == 503 or (status == 429 and not isinstance(error, QuotaExceededError)):
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            delay = self._retry(retry_after, status, f"HTTP {status} {error.code}")
            if delay is not None:
                return delay
        raise error

    def _retry(self, retry_after: float | None, status: int | None, reason: str) -> float | None:
        if not self.call.retryable:
            return None
        policy = self.config.retry
        delay = policy.delay(self.attempt, retry_after)
        if delay is not None:
            policy.announce(
                RetryEvent(
                    self.call.route.method, self.call.path, self.attempt, delay, reason, status
                )
            )
        return delay

    def result(self, response: httpx2.Response) -> T:
        """The call's typed result from a successful answer (its body read)."""
        try:
            return self.call.route.parse(response.content)
        except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            raise ServerError(
                f"unexpected answer to {self.call.route.method} {self.call.path}: {_summary(exc)}",
                code="unexpected_response",
                status=response.status_code,
                request_id=response.headers.get("x-request-id"),
            ) from None

    @contextmanager
    def streaming(self) -> Iterator[None]:
        """Around reading a streamed answer: ``httpx2`` errors become the SDK's."""
        try:
            yield
        except httpx2.HTTPError as exc:
            raise transport_error(self.call, exc, self.config) from None


def _summary(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        return f"{exc.error_count()} problem(s), first {where}: {err['msg']}"
    return _reason(exc)
