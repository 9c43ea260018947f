"""When and how long to wait before trying a call again.

Only idempotent calls are retried (GET, DELETE, PUT of a file, the read-only file search), and
only for failures that waiting may cure: no connection, a connection that broke before the
answer, HTTP 429 ``rate_limited`` and HTTP 503. The wait is the server's ``Retry-After`` when it
sent one (plus a little jitter), else an exponential backoff with jitter, capped. A
``Retry-After`` longer than the cap is not waited for: the error is raised at once.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

__all__ = ["RetryEvent", "RetryHook", "RetryPolicy", "parse_retry_after"]

log = logging.getLogger("noxsdk")

_RETRY_AFTER_JITTER = 0.1  # the most added to a Retry-After wait, as a fraction of it


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """One retry about to happen: given to the ``on_retry`` hook and logged at DEBUG level on
    the ``noxsdk`` logger."""

    method: str
    path: str
    attempt: int  # the attempt that failed, from 1
    delay_s: float  # the wait before the next attempt
    reason: str  # "HTTP 429 rate_limited", "connection: ..."
    status: int | None  # the failed attempt's HTTP status; None when no answer came


RetryHook = Callable[[RetryEvent], None]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``max_retries`` further attempts at most (0: none); waits of ``backoff_s`` doubled per
    attempt, each between half and all of that (jitter), at most ``backoff_max_s``."""

    max_retries: int = 3
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    on_retry: RetryHook | None = None

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff_s < 0 or self.backoff_max_s < 0:
            raise ValueError("max_retries, backoff_s and backoff_max_s must not be negative")

    def delay(self, attempt: int, retry_after: float | None) -> float | None:
        """The wait before the attempt after ``attempt`` (from 1); None: give up."""
        if attempt > self.max_retries:
            return None
        if retry_after is not None:
            if retry_after > self.backoff_max_s:
                return None
            return retry_after + random.uniform(0, _RETRY_AFTER_JITTER * max(retry_after, 1.0))  # noqa: S311
        ceiling = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not secrecy

    def announce(self, event: RetryEvent) -> None:
        log.debug(
            "retrying %s %s in %.2f s (attempt %d failed: %s)",
            event.method,
            event.path,
            event.delay_s,
            event.attempt,
            event.reason,
        )
        if self.on_retry is not None:
            self.on_retry(event)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (a number of seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return None if math.isnan(seconds) else max(0.0, seconds)
