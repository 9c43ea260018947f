"""The in-memory moving windows behind the rate limits (Redis has its own tests)."""

from __future__ import annotations

import threading

import pytest

from nox_api.services import ratelimit
from nox_api.services.ratelimit import MemoryWindows, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(ratelimit.time, "monotonic", fake)
    return fake


def test_amount_allowed_then_refused_until_the_oldest_hit_leaves(clock: Clock) -> None:
    windows = MemoryWindows()
    states = []
    for _ in range(3):
        states.append(windows.hit("k", 3, 60))
        clock.now += 10
    assert [(s.allowed, s.remaining) for s in states] == [(True, 2), (True, 1), (True, 0)]
    assert states[-1].reset_s == 40  # the first hit (t=0) leaves at t=60; it is t=20 now
    refused = windows.hit("k", 3, 60)
    assert (refused.allowed, refused.remaining, refused.reset_s) == (False, 0, 30)
    clock.now += 30  # t=60: the first hit has left the window, one place is free
    assert windows.hit("k", 3, 60).allowed
    assert not windows.hit("k", 3, 60).allowed  # the refused hit was not counted


def test_peek_does_not_count(clock: Clock) -> None:
    windows = MemoryWindows()
    for _ in range(5):
        assert windows.peek("k", 1, 60).allowed
    windows.hit("k", 1, 60)
    assert not windows.peek("k", 1, 60).allowed


def test_keys_are_independent_and_a_new_rate_starts_afresh(clock: Clock) -> None:
    windows = MemoryWindows()
    assert windows.hit("a", 1, 60).allowed
    assert windows.hit("b", 1, 60).allowed
    assert not windows.hit("a", 1, 60).allowed
    assert windows.hit("a", 1, 3600).allowed  # the policy changed the window: a new count


def test_idle_keys_are_swept(clock: Clock) -> None:
    windows = MemoryWindows(sweep_every=10)
    for i in range(9):
        windows.hit(f"client-{i}", 5, 60)
    assert len(windows) == 9
    clock.now += 61
    windows.hit("fresh", 5, 60)  # the tenth hit sweeps the keys whose window emptied
    assert len(windows) == 1


def test_parallel_hits_never_exceed_the_amount() -> None:
    windows = MemoryWindows()
    allowed = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(200):
            state = windows.hit("shared", 250, 3600)
            with lock:
                allowed.append(state.allowed)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == 250


def test_limiter_parses_rates_and_uses_the_memory_windows(clock: Clock) -> None:
    limiter = RateLimiter()
    assert limiter.backend == "memory"
    assert limiter.check()
    assert [limiter.hit("t", "2/minute").allowed for _ in range(3)] == [True, True, False]
    blocked = limiter.blocked("t", "2/minute")
    assert blocked is not None
    assert blocked.headers()["Retry-After"] == "60"
    assert limiter.blocked("other", "2/minute") is None
    limiter.reset()
    assert limiter.hit("t", "2/minute").allowed
