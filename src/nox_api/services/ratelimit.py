"""Rate limits with the ``limits`` library: a moving window per key (a token, or a client address
for failed authentication), kept in memory or, for several servers, in Redis (``NOX_REDIS_URL``).

A storage that fails (Redis down) lets requests through and logs it: rate limits protect the
server from floods, the sandbox and the quotas stay the real limits.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage, Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter

__all__ = ["RateLimiter", "RateState"]

log = logging.getLogger("nox.ratelimit")


@dataclass(frozen=True, slots=True)
class RateState:
    """Where one key stands in its window after a request."""

    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # seconds until the window has room again (0: it has now)

    def headers(self) -> dict[str, str]:
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_s),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, self.reset_s))
        return headers


@lru_cache(maxsize=256)
def _item(rate: str) -> RateLimitItem:
    return parse(rate)


class RateLimiter:
    def __init__(self, url: str | None = None) -> None:
        self.backend = "redis" if url else "memory"
        storage = storage_from_string(url) if url else MemoryStorage()
        if not isinstance(storage, Storage):  # an async storage URL (async+redis://...)
            raise ValueError(f"rate limit storage {url!r} is asynchronous; use redis://...")
        self._storage = storage
        self._limiter = MovingWindowRateLimiter(self._storage)

    def hit(self, key: str, rate: str) -> RateState:
        """Count one request of ``key`` against ``rate`` (e.g. ``60/minute``)."""
        item = _item(rate)
        try:
            allowed = self._limiter.hit(item, key)
            stats = self._limiter.get_window_stats(item, key)
        except Exception as exc:  # the storage failed: let the request through, say so
            log.error("rate limit storage failed (%s): not limiting %s", exc, key)
            return RateState(True, item.amount, item.amount, 0)
        reset = max(0, math.ceil(stats.reset_time - time.time())) if stats.remaining == 0 else 0
        return RateState(allowed, item.amount, stats.remaining, reset)

    def blocked(self, key: str, rate: str) -> RateState | None:
        """The state of ``key`` when its window is full, without counting; None when it has
        room."""
        item = _item(rate)
        try:
            if self._limiter.test(item, key):
                return None
            stats = self._limiter.get_window_stats(item, key)
        except Exception as exc:
            log.error("rate limit storage failed (%s): not limiting %s", exc, key)
            return None
        reset = max(1, math.ceil(stats.reset_time - time.time()))
        return RateState(False, item.amount, 0, reset)

    def check(self) -> bool:
        """Whether the storage answers (for the detailed health check)."""
        try:
            return bool(self._storage.check())
        except Exception:
            return False

    def reset(self) -> None:
        self._storage.reset()
