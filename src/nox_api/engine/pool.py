"""The warm pool: sandboxes started ahead of time, per workspace, each used once.

A sandbox's workspace is bound when it starts, so the pool keeps one queue per workspace. A run
takes the oldest ready sandbox of its workspace (or gets ``None`` and starts one itself: a miss);
one background thread refills queues to their size (once the runs going on let it: see
:mod:`.quiet`), throws away sandboxes that died, and drops the
queues of workspaces idle for longer than ``idle_s``. At most ``max_workspaces`` queues exist;
the least recently used one makes room for a new one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from nox_api.engine.quiet import QuietGate

__all__ = ["PoolStats", "Pooled", "WarmPool"]

log = logging.getLogger("nox.engine.pool")


@dataclass(frozen=True)
class PoolStats:
    ready: int
    workspaces: int
    hits: int
    misses: int
    spawn_failures: int


class Pooled(Protocol):
    """What the pool keeps: a started sandbox (or a :class:`~.process.Stem`)."""

    def alive(self) -> bool: ...

    def discard(self) -> None: ...


T = TypeVar("T", bound=Pooled)


class _Queue(Generic[T]):
    __slots__ = ("last_used", "ready")

    def __init__(self) -> None:
        self.ready: deque[T] = deque()
        self.last_used = time.monotonic()


class WarmPool(Generic[T]):
    def __init__(
        self,
        spawn: Callable[[Path], T],
        size: int,
        idle_s: float,
        max_workspaces: int,
        quiet: QuietGate | None = None,
        *,
        name: str = "nox-pool",
    ) -> None:
        self._spawn = spawn
        self._quiet = quiet
        self._size = size
        self._idle_s = idle_s
        self._max_workspaces = max_workspaces
        self._queues: OrderedDict[Path, _Queue[T]] = OrderedDict()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._hits = self._misses = self._failures = 0
        self._generation = 0  # bumped by flush(): a sandbox started before it is not kept
        self._thread: threading.Thread | None = None
        if size > 0:
            self._thread = threading.Thread(target=self._refill_loop, name=name, daemon=True)
            self._thread.start()

    def take(self, workspace: Path) -> T | None:
        """A ready sandbox for ``workspace``, or None (the caller starts one)."""
        if self._size <= 0:
            return None
        stale: list[T] = []
        found: T | None = None
        with self._lock:
            queue = self._touch(workspace)
            while queue.ready:
                candidate = queue.ready.popleft()
                if candidate.alive():
                    found = candidate
                    break
                stale.append(candidate)
            if found is None:
                self._misses += 1
            else:
                self._hits += 1
            self._wake.notify()
        for sp in stale:
            sp.discard()
        return found

    def prewarm(self, workspace: Path) -> None:
        """Start filling the queue of ``workspace`` now (e.g. the default one at start-up)."""
        if self._size <= 0:
            return
        with self._lock:
            self._touch(workspace)
            self._wake.notify()

    def stats(self) -> PoolStats:
        with self._lock:
            ready = sum(len(q.ready) for q in self._queues.values())
            return PoolStats(ready, len(self._queues), self._hits, self._misses, self._failures)

    def flush(self) -> None:
        """Throw away every ready sandbox (they started under settings that changed); the
        queues refill with new ones."""
        with self._lock:
            self._generation += 1
            stale = [sp for queue in self._queues.values() for sp in queue.ready]
            for queue in self._queues.values():
                queue.ready.clear()
            self._wake.notify()
        for sp in stale:
            sp.discard()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            queues = list(self._queues.values())
            self._queues.clear()
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for queue in queues:
            for sp in queue.ready:
                sp.discard()

    # -- inside the lock -------------------------------------------------------------------
    def _touch(self, workspace: Path) -> _Queue[T]:
        queue = self._queues.get(workspace)
        if queue is None:
            queue = self._queues[workspace] = _Queue()
        self._queues.move_to_end(workspace)
        queue.last_used = time.monotonic()
        return queue

    def _evictions(self) -> list[T]:
        now = time.monotonic()
        dropped: list[T] = []
        for path in list(self._queues):
            queue = self._queues[path]
            too_many = len(self._queues) > self._max_workspaces
            if too_many or now - queue.last_used > self._idle_s:
                dropped.extend(queue.ready)
                del self._queues[path]
        return dropped

    def _next_to_fill(self) -> Path | None:
        for path in reversed(self._queues):  # the most recently used first
            if len(self._queues[path].ready) < self._size:
                return path
        return None

    # -- the refill thread -----------------------------------------------------------------
    def _refill_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                dropped = self._evictions()
                target = self._next_to_fill()
                generation = self._generation
                queue = None if target is None else self._queues[target]
                if target is None and not dropped:
                    self._wake.wait(timeout=min(self._idle_s, 5.0))
                    continue
            for sp in dropped:
                sp.discard()
            if target is None:
                continue
            if self._quiet is not None and queue is not None:
                # Let a run being answered have the CPU first, unless the queue runs empty: its
                # next run would then start a sandbox itself, on its own path, which costs it
                # far more than sharing the CPU with a refill (runs back to back never leave the
                # gate a quiet moment: the stems ran out on 2 of 3 such runs).
                self._quiet.wait(urgent=partial(_is_empty, queue.ready))
            try:
                sp = self._spawn(target)
            except Exception:
                with self._lock:
                    self._failures += 1
                log.exception("warm pool: starting a sandbox failed")
                time.sleep(1.0)  # do not spin when the machine refuses sandboxes
                continue
            kept = False
            with self._lock:
                queue = self._queues.get(target)
                if (
                    queue is not None
                    and not self._closed
                    and generation == self._generation  # no flush while it started
                    and len(queue.ready) < self._size
                ):
                    queue.ready.append(sp)
                    kept = True
            if not kept:  # the workspace was dropped or the pool closed meanwhile
                with contextlib.suppress(Exception):
                    sp.discard()


def _is_empty(ready: deque[T]) -> bool:
    return not ready
