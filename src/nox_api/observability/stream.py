"""Live server log lines for ``GET /api/logs/stream``, as Server-Sent Events.

:class:`LogHub` is a logging handler that hands each formatted line to its subscribers; no file
is polled. A subscriber is one open stream, served on the event loop. The handler runs on
whatever thread logged: it appends the line to the subscriber's bounded queue under a lock and,
when the stream is idle, wakes it with ``loop.call_soon_threadsafe`` (at most one wake-up pending
per subscriber, whatever the log rate). A full queue drops the new line and counts it; the stream
then sends ``event: dropped`` with the count. A slow client therefore costs at most
:data:`SUBSCRIBER_QUEUE_LINES` lines of memory, and the socket's own flow control does the rest.

The event stream::

    : connected                      (a comment: the subscription is live from here)
    data: {"time": ..., "level": ..., "logger": ..., "event": ...}     (one per line)
    event: dropped
    data: {"dropped": 12}            (lines lost because the client read too slowly)
    : keep-alive                     (a comment after KEEPALIVE_S seconds without lines)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from functools import partial

__all__ = [
    "EventStream",
    "KEEPALIVE_S",
    "LogHub",
    "MAX_STREAM_DURATION_S",
    "SUBSCRIBER_QUEUE_LINES",
    "Subscriber",
]

SUBSCRIBER_QUEUE_LINES = 1000
KEEPALIVE_S = 15.0
MAX_STREAM_DURATION_S = 86_400.0  # the longest ?duration_s= a stream may ask for
_POLL_S = 1.0  # an idle stream looks this often whether the server is shutting down


class Subscriber:
    """One stream's queue: filled from any thread, drained on its event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int) -> None:
        self._loop = loop
        self._capacity = capacity
        self._lock = threading.Lock()
        self._lines: deque[str] = deque()
        self._dropped = 0
        self._woken = False
        self.ready = asyncio.Event()

    def offer(self, line: str) -> None:
        with self._lock:
            if len(self._lines) >= self._capacity:
                self._dropped += 1
            else:
                self._lines.append(line)
            if self._woken:
                return
            self._woken = True
        with contextlib.suppress(RuntimeError):  # a closed loop: the stream is gone with it
            self._loop.call_soon_threadsafe(self.ready.set)

    def drain(self) -> tuple[list[str], int]:
        """The queued lines (oldest first) and how many were dropped after them. Call on the
        subscriber's loop."""
        with self._lock:
            lines = list(self._lines)
            self._lines.clear()
            dropped, self._dropped = self._dropped, 0
            self._woken = False
            self.ready.clear()
        return lines, dropped


class LogHub(logging.Handler):
    """Fans log lines out to the open streams; formats a record only when someone listens."""

    def __init__(
        self, capacity: int = SUBSCRIBER_QUEUE_LINES, keepalive_s: float = KEEPALIVE_S
    ) -> None:
        super().__init__()
        self.capacity = capacity
        self.keepalive_s = keepalive_s
        self._subs_lock = threading.Lock()
        self._subs: tuple[Subscriber, ...] = ()  # replaced whole: emit reads it without a lock
        self._ending = False

    @property
    def subscribers(self) -> int:
        """Streams open now."""
        return len(self._subs)

    def emit(self, record: logging.LogRecord) -> None:
        subs = self._subs
        if not subs:
            return
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        for sub in subs:
            sub.offer(line)

    def subscribe(self) -> Subscriber:
        """A new subscriber on the running event loop."""
        sub = Subscriber(asyncio.get_running_loop(), self.capacity)
        with self._subs_lock:
            self._subs = (*self._subs, sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._subs_lock:
            self._subs = tuple(s for s in self._subs if s is not sub)

    def end_streams(self) -> None:
        """Make every stream end within about a second. Only sets a flag: safe to call from a
        signal handler or another thread."""
        self._ending = True

    def close(self) -> None:
        self.end_streams()
        super().close()

    def events(self, duration_s: float | None = None) -> EventStream:
        """The event stream of a new subscriber, until the consumer stops iterating (the client
        went away), ``duration_s`` passed, or :meth:`end_streams`. The subscription is taken
        now, before the answer's headers leave: a client that logs something once it has them
        finds that line in the stream. ``aclose()`` gives it back (also when never iterated)."""
        sub = self.subscribe()
        return EventStream(self._events(sub, duration_s), partial(self.unsubscribe, sub))

    async def _events(self, sub: Subscriber, duration_s: float | None) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        try:
            yield b": connected\n\n"
            started = last_sent = loop.time()
            while not self._ending:
                now = loop.time()
                wait = min(_POLL_S, last_sent + self.keepalive_s - now)
                if duration_s is not None:
                    wait = min(wait, started + duration_s - now)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sub.ready.wait(), max(0.0, wait))
                lines, dropped = sub.drain()
                now = loop.time()
                chunk = b"".join(
                    b"data: " + line.encode("utf-8", "backslashreplace") + b"\n\n" for line in lines
                )
                if dropped:
                    chunk += b"event: dropped\ndata: " + json.dumps({"dropped": dropped}).encode()
                    chunk += b"\n\n"
                if chunk:
                    yield chunk
                    last_sent = now
                elif now - last_sent >= self.keepalive_s:
                    yield b": keep-alive\n\n"
                    last_sent = now
                if duration_s is not None and now - started >= duration_s:
                    return
        finally:
            self.unsubscribe(sub)


class EventStream:
    """One subscriber's events as an async iterator whose ``aclose()`` always gives the
    subscription back, whether or not iterating ever began (closing a generator that never
    started runs none of its code)."""

    def __init__(self, events: AsyncIterator[bytes], release: Callable[[], None]) -> None:
        self._events = events
        self._release = release

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> bytes:
        return await anext(self._events)

    async def aclose(self) -> None:
        try:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self._release()
