"""A client's settings: arguments first, then ``NOX_URL`` / ``NOX_API_TOKEN``, then defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

import httpx2

from noxsdk._retry import RetryHook, RetryPolicy
from noxsdk._version import __version__
from noxsdk.errors import NoxConnectionError

__all__ = ["ClientConfig", "ClientOptions", "DEFAULT_URL", "resolve"]

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0


class ClientOptions(TypedDict, total=False):
    """Keyword options of :class:`~noxsdk.NoxClient` and :class:`~noxsdk.AsyncNoxClient`."""

    timeout: float | None  # seconds to wait for data while reading or writing (None: forever)
    connect_timeout: float | None  # seconds to wait for the connection
    max_retries: int  # further attempts of an idempotent call (0: none)
    backoff_s: float  # first wait between attempts, doubled each time
    backoff_max_s: float  # longest wait, and the longest Retry-After honoured
    on_retry: RetryHook | None  # called before each retry
    headers: Mapping[str, str] | None  # extra headers sent with every request
    verify: bool | str  # TLS: verify the server (True), not (False), or a CA bundle path


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Everything a client needs, resolved and checked."""

    url: str
    token: str | None
    timeout: httpx2.Timeout
    retry: RetryPolicy
    headers: dict[str, str] = field(default_factory=dict)
    verify: bool | str = True

    def http_options(self) -> dict[str, Any]:
        """Keyword arguments for ``httpx2.Client`` / ``httpx2.AsyncClient``."""
        headers = {"User-Agent": f"noxsdk/{__version__}", **self.headers}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return {
            "base_url": self.url,
            "headers": headers,
            "timeout": self.timeout,
            "verify": self.verify,
        }


def _check_url(url: str) -> str:
    url = url.strip()
    try:
        parsed = httpx2.URL(url)
    except (httpx2.InvalidURL, TypeError) as exc:
        raise NoxConnectionError(f"invalid server URL {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise NoxConnectionError(
            f"invalid server URL {url!r}: it must look like http://HOST:PORT "
            "(or https://), e.g. http://127.0.0.1:8080"
        )
    return url.rstrip("/")


def resolve(url: str | None, token: str | None, options: ClientOptions) -> ClientConfig:
    """The configuration of a client from its arguments and the environment."""
    env_token = os.environ.get("NOX_API_TOKEN") or None
    timeout = options.get("timeout", DEFAULT_TIMEOUT_S)
    connect = options.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT_S)
    retry = RetryPolicy()  # the defaults
    return ClientConfig(
        url=_check_url(url or os.environ.get("NOX_URL") or DEFAULT_URL),
        token=token if token is not None else env_token,
        timeout=httpx2.Timeout(timeout, connect=connect),
        retry=RetryPolicy(
            max_retries=options.get("max_retries", retry.max_retries),
            backoff_s=options.get("backoff_s", retry.backoff_s),
            backoff_max_s=options.get("backoff_max_s", retry.backoff_max_s),
            on_retry=options.get("on_retry"),
        ),
        headers=dict(options.get("headers") or {}),
        verify=options.get("verify", True),
    )
