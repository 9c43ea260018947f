"""Rate limits: a moving window per key (a token, or a client address for failed
authentication), kept in this server's memory or, for several servers, in Redis
(``NOX_REDIS_URL``, through the ``limits`` library, which also parses the rates).

The memory windows are Nox's own (:class:`MemoryWindows`): ``limits``' memory storage starts a
new ``threading.Timer`` thread whenever its previous 10 ms one has ended, which under paced
traffic is once per request (about 0.5 ms of every answer on a 2-core machine).

A storage that fails (Redis down) lets requests through and logs it: rate limits protect the
server from floods, the sandbox and the quotas stay the real limits.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

from limits import RateLimitItem, parse
from limits.storage import Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter

__all__ = ["MemoryWindows", "RateLimiter", "RateState"]

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


class MemoryWindows:
    """Moving windows in memory: per key, the times of the hits of the last window (at most
    the limit's amount of them). Keys whose window emptied are dropped every
    ``sweep_every`` hits, so addresses that failed once do not pile up."""

    def __init__(self, sweep_every: int = 4096) -> None:
        self._hits: dict[str, tuple[float, deque[float]]] = {}  # key -> (window s, hit times)
        self._lock = threading.Lock()
        self._sweep_every = sweep_every
        self._since_sweep = 0

    def hit(self, key: str, amount: int, window_s: float) -> RateState:
        with self._lock:
            now = time.monotonic()
            times = self._prune(key, window_s, now)
            allowed = len(times) < amount
            if allowed:
                times.append(now)
            self._since_sweep += 1
            if self._since_sweep >= self._sweep_every:
                self._sweep(now)
            return self._state(allowed, times, amount, window_s, now)

    def peek(self, key: str, amount: int, window_s: float) -> RateState:
        with self._lock:
            now = time.monotonic()
            times = self._prune(key, window_s, now)
            return self._state(len(times) < amount, times, amount, window_s, now)

    def reset(self) -> None:
        with self._lock:
            self._hits.clear()

    def __len__(self) -> int:
        return len(self._hits)

    def _prune(self, key: str, window_s: float, now: float) -> deque[float]:
        entry = self._hits.get(key)
        if entry is None or entry[0] != window_s:  # new key, or its rate changed
            entry = self._hits[key] = (window_s, deque())
        times = entry[1]
        while times and times[0] <= now - window_s:
            times.popleft()
        return times

    def _sweep(self, now: float) -> None:
        self._since_sweep = 0
        for key in [k for k, (w, t) in self._hits.items() if not t or t[-1] <= now - w]:
            del self._hits[key]

    @staticmethod
    def _state(
        allowed: bool, times: deque[float], amount: int, window_s: float, now: float
    ) -> RateState:
        remaining = max(0, amount - len(times))
        reset = 0
        if remaining == 0 and times:
            reset = max(1, math.ceil(times[0] + window_s - now))
        return RateState(allowed, amount, remaining, reset)


class RateLimiter:
    def __init__(self, url: str | None = None) -> None:
        self.backend = "redis" if url else "memory"
        self._memory: MemoryWindows | None = None
        self._storage: Storage | None = None
        if url is None:
            self._memory = MemoryWindows()
            return
        storage = storage_from_string(url)
        if not isinstance(storage, Storage):  # an async storage URL (async+redis://...)
            raise ValueError(f"rate limit storage {url!r} is asynchronous; use redis://...")
        self._storage = storage
        self._limiter = MovingWindowRateLimiter(storage)

    def hit(self, key: str, rate: str) -> RateState:
        """Count one request of ``key`` against ``rate`` (e.g. ``60/minute``)."""
        item = _item(rate)
        if self._memory is not None:
            return self._memory.hit(key, item.amount, item.get_expiry())
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
        if self._memory is not None:
            state = self._memory.peek(key, item.amount, item.get_expiry())
            return None if state.allowed else state
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
        if self._storage is None:
            return True
        try:
            return bool(self._storage.check())
        except Exception:
            return False

    def reset(self) -> None:
        if self._memory is not None:
            self._memory.reset()
        if self._storage is not None:
            self._storage.reset()
