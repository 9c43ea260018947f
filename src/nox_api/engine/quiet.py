"""A gate that keeps the engine's housekeeping off the runs' way.

Starting a warm sandbox costs the server a fork and the machine 15-25 ms of CPU; tearing one
down costs a kill, a wait and the kernel's namespace clean-up. Done while a run is being answered,
they compete with it for the CPU and the interpreter lock (measured: about 2 ms of a 7 ms
answer on two cores). Runs mark themselves busy here; the refill and the reaper call
:meth:`QuietGate.wait` first, which returns once no run has been going for ``grace_s`` (time for
the answer to leave), or after ``max_wait_s`` at the latest, so a steady stream of runs delays
housekeeping by a bounded amount but never starves it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["QuietGate"]


class QuietGate:
    def __init__(self, grace_s: float = 0.004, max_wait_s: float = 0.05) -> None:
        self.grace_s = grace_s
        self.max_wait_s = max_wait_s
        self._changed = threading.Condition()
        self._busy = 0
        self._last_end = 0.0

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Mark a run as going for the duration of the block."""
        with self._changed:
            self._busy += 1
            self._changed.notify_all()  # a waiting refill checks whether it became urgent
        try:
            yield
        finally:
            with self._changed:
                self._busy -= 1
                self._last_end = time.monotonic()
                self._changed.notify_all()

    def wait(self, urgent: Callable[[], bool] | None = None) -> None:
        """Block until the engine has been idle for ``grace_s``, or ``max_wait_s`` passed, or
        ``urgent()`` turns true (checked whenever a run starts or ends)."""
        deadline = time.monotonic() + self.max_wait_s
        with self._changed:
            while True:
                now = time.monotonic()
                if now >= deadline or (urgent is not None and urgent()):
                    return
                if self._busy:
                    self._changed.wait(deadline - now)
                    continue
                quiet_at = self._last_end + self.grace_s
                if now >= quiet_at:
                    return
                self._changed.wait(min(quiet_at, deadline) - now)
