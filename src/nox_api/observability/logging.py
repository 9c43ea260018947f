"""The server log: one JSON object per line in ``<data>/logs/nox.log``, rotated by size.

:class:`ServerLog` attaches two handlers to the loggers in :data:`LOGGERS` when the server's parts
start (``Nox.start``) and removes them when they close, so two apps in one process never stack
handlers: a rotating file handler (``NOX_LOG_MAX_BYTES`` per file, ``NOX_LOG_BACKUPS`` rotated files
``nox.log.1`` ... kept, mode 0600) and the :class:`~nox_api.observability.stream.LogHub` that
feeds ``GET /api/logs/stream``. Each line holds ``time``, ``level``, ``logger``, ``message``, and
``request_id`` (the request being answered, when there is one) and ``exc_info`` (the traceback)
when present. ``nox-api serve`` keeps its plain-text stderr output besides.

Secrets never reach the log: messages and tracebacks pass through :meth:`JsonFormatter.redact`,
which masks anything shaped like a Nox token or a bearer header and the configured secrets.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from io import TextIOWrapper
from pathlib import Path

import structlog
from asgi_correlation_id import correlation_id
from structlog.typing import EventDict

from nox_api.config import Settings
from nox_api.observability.stream import LogHub
from nox_api.services.tokens import TOKEN_PREFIX
from nox_api.textfile import reverse_lines

__all__ = [
    "JsonFormatter", "LOGGERS", "LOG_FILE", "MAX_TAIL_LINES", "ServerLog", "console_formatter",
    "tail_lines",
]  # fmt: skip

LOG_FILE = "nox.log"
MAX_TAIL_LINES = 10_000  # GET /api/logs?tail= at most
# The server's own loggers and uvicorn's error logger. uvicorn's access log stays on stderr.
LOGGERS = ("nox", "uvicorn.error")
REDACTED = "[REDACTED]"
_MIN_SECRET_CHARS = 8  # shorter configured values are not searched for (too many false hits)
_TOKEN_RE = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]{20,}")
_EXTRA_FIELDS = ("method", "route", "status", "duration_ms", "actor_id")
_BEARER_RE = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+")


def _context(_logger: object, _method: str, event: EventDict) -> EventDict:
    """The request being answered, and the fields a caller gave with ``extra={...}``."""
    record: logging.LogRecord | None = event.get("_record")
    request_id = record.__dict__.get("request_id") if record is not None else None
    request_id = request_id or correlation_id.get()
    if request_id:
        event["request_id"] = request_id
    if record is not None:
        event["level"] = record.levelname
        for name in _EXTRA_FIELDS:  # the access log's fields
            value = record.__dict__.get(name)
            if value is not None:
                event[name] = value
    return event


def _time(_logger: object, _method: str, event: EventDict) -> EventDict:
    record: logging.LogRecord | None = event.get("_record")
    created = datetime.fromtimestamp(record.created if record else time.time(), UTC)
    event["time"] = f"{created:%Y-%m-%dT%H:%M:%S}.{created.microsecond // 1000:03d}Z"
    return event


_Step = Callable[[object, str, EventDict], EventDict]  # a structlog processor of this chain
_PLAIN = logging.Formatter()  # only for its traceback and stack text


def _exception_text(record: logging.LogRecord) -> str | None:
    """The record's traceback as text, made once and kept on the record (as logging does)."""
    if record.exc_info and not record.exc_text:
        record.exc_text = _PLAIN.formatException(record.exc_info)
    return record.exc_text


def _exc_info(_logger: object, _method: str, event: EventDict) -> EventDict:
    """A traceback as text under ``exc_info`` (stack under ``stack_info``), as before."""
    event.pop("exc_info", None)
    record: logging.LogRecord | None = event.get("_record")
    if record is not None and (record.exc_info or record.exc_text):
        event["exc_info"] = _exception_text(record)
    stack = event.pop("stack_info", None) or (record.stack_info if record is not None else None)
    if stack:
        event["stack_info"] = _PLAIN.formatStack(str(stack))
    return event


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON, through a structlog processor chain: ``time``, ``level``,
    ``logger``, ``event`` (the message), ``request_id`` during a request, the access log's
    fields, and ``exc_info`` for a traceback. ``secrets`` (and anything shaped like a Nox token
    or a bearer header) are masked in every value.

    The chain is run directly on an event built from the record, not through structlog's
    ``ProcessorFormatter``, which copies each record first: 25 µs a line instead of 100."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if len(s) >= _MIN_SECRET_CHARS)
        self._chain: tuple[_Step, ...] = (_time, _context, _exc_info, self._redact_all)
        self._render = structlog.processors.JSONRenderer(serializer=_dumps)

    def redact(self, text: str) -> str:
        if TOKEN_PREFIX in text:  # the regular expressions only where they can match
            text = _TOKEN_RE.sub(TOKEN_PREFIX + REDACTED, text)
        if "earer" in text.lower():
            text = _BEARER_RE.sub(r"\1" + REDACTED, text)
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def format(self, record: logging.LogRecord) -> str:
        """Rendered once per record, whatever number of handlers write it."""
        cached: str | None = record.__dict__.get("_nox_line")
        if cached is None:
            event: EventDict = {
                "event": record.getMessage(), "logger": record.name, "_record": record,
            }  # fmt: skip
            for processor in self._chain:
                event = processor(None, record.levelname.lower(), event)
            del event["_record"]
            cached = record.__dict__["_nox_line"] = str(
                self._render(None, "", _in_order(None, "", event))
            )
        return cached

    def _redact_all(self, _logger: object, _method: str, event: EventDict) -> EventDict:
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = self.redact(value)
        return event


def console_formatter() -> logging.Formatter:
    """For ``nox-api serve``'s stderr on a terminal: coloured, aligned, one line per event."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, _time, _context, _exc_info],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.dev.ConsoleRenderer(timestamp_key="time"),
        ],
    )


_FIRST = ("time", "level", "logger", "event", "request_id")


def _in_order(_logger: object, _method: str, event: EventDict) -> EventDict:
    ordered = {key: event.pop(key) for key in _FIRST if key in event}
    ordered.update(event)
    return ordered


def _dumps(obj: object, **kwargs: object) -> str:
    return json.dumps(obj, ensure_ascii=False, default=str)


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating file handler whose files are created mode 0600 (they name paths, clients and
    errors; only the server's user reads them)."""

    def _open(self) -> TextIOWrapper:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(self.baseFilename, flags, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def _secrets(settings: Settings) -> list[str]:
    values = (
        settings.api_token,
        settings.audit_key,
        settings.backup_key,
        settings.backup_passphrase,
        settings.metrics_token,
    )
    return [value.get_secret_value() for value in values if value is not None]


def tail_lines(paths: Sequence[Path], count: int) -> list[str]:
    """The last ``count`` lines over ``paths`` (the current file first, then older ones),
    oldest line first."""
    found: list[bytes] = []
    for path in paths:
        try:
            f = path.open("rb")
        except FileNotFoundError:
            continue
        with f:
            for line in reverse_lines(f):
                found.append(line)
                if len(found) >= count:
                    break
        if len(found) >= count:
            break
    found.reverse()
    return [line.decode("utf-8", "replace") for line in found]


_BATCH_S = 0.02  # the log writer's wake-up period: lines reach the file within this
_INSTALL_LOCK = threading.Lock()
_LIVE: set[ServerLog] = set()
_LEVEL_RAISED = False


class _Handoff(logging.Handler):
    """Puts records on a queue for the writer thread: rendering a line and writing it cost
    0.2-0.4 ms, which must not be paid on the event loop or a request's thread. The request id
    is taken now, while the request's context is current."""

    def __init__(self, sink: queue.SimpleQueue[logging.LogRecord | threading.Event | None]):
        super().__init__()
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if "request_id" not in record.__dict__:
                record.request_id = correlation_id.get()
            _exception_text(record)  # made here: the traceback's frames stay with this thread
            record.message = record.getMessage()
            record.msg, record.args = record.message, None
            self._sink.put(record)
        except Exception:
            self.handleError(record)


class ServerLog:
    """The server log of one running server: its file, the live stream, and the handlers that
    feed both, written by one thread in order (:meth:`flush` waits for it). :meth:`close` takes
    everything back out of the logging module."""

    def __init__(self, settings: Settings) -> None:
        folder = settings.logs_dir
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = folder / LOG_FILE
        self.backups = settings.log_backups
        formatter = JsonFormatter(_secrets(settings))
        self._file = _PrivateRotatingFileHandler(
            self.path,
            maxBytes=settings.log_max_bytes,
            backupCount=settings.log_backups,
            encoding="utf-8",
            errors="backslashreplace",
        )
        self._file.setFormatter(formatter)
        self.hub = LogHub()
        self.hub.setFormatter(formatter)
        self._queue: queue.SimpleQueue[logging.LogRecord | threading.Event | None] = (
            queue.SimpleQueue()
        )
        self._handoff = _Handoff(self._queue)
        self._writer = threading.Thread(target=self._write, name="nox-log-writer", daemon=True)
        self._writer.start()
        self._install()

    def _write(self) -> None:
        while True:
            batch = [self._queue.get()]
            # Wake at most every BATCH_S, not per line: each wake-up of this thread takes the
            # interpreter lock from a request (measured: up to a millisecond each on 2 cores).
            time.sleep(_BATCH_S)
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for item in batch:
                if item is None:
                    return
                if isinstance(item, threading.Event):
                    item.set()
                    continue
                for handler in (self._file, self.hub):
                    if item.levelno >= handler.level:
                        handler.handle(item)

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until every line logged before this call is in the file and the stream."""
        if self._writer.is_alive():
            done = threading.Event()
            self._queue.put(done)
            done.wait(timeout_s)

    def _install(self) -> None:
        global _LEVEL_RAISED  # noqa: PLW0603 - the logging module's state is global itself
        with _INSTALL_LOCK:
            for name in LOGGERS:
                logging.getLogger(name).addHandler(self._handoff)
            server = logging.getLogger(LOGGERS[0])
            if server.level == logging.NOTSET:  # else someone chose a level: keep it
                server.setLevel(logging.INFO)
                _LEVEL_RAISED = True
            _LIVE.add(self)

    def files(self) -> list[Path]:
        """The current file, then the rotated ones, newest first."""
        return [self.path] + [Path(f"{self.path}.{n}") for n in range(1, self.backups + 1)]

    def tail(self, count: int) -> list[str]:
        """The last ``count`` lines, oldest first; continues into the rotated files when the
        current one holds fewer. Lines logged before the call are in (read your writes)."""
        self.flush()
        return tail_lines(self.files(), count)

    def end_streams(self) -> None:
        """End every live stream soon (the server is shutting down). Safe in a signal handler."""
        self.hub.end_streams()

    def close(self) -> None:
        global _LEVEL_RAISED  # noqa: PLW0603
        self.hub.end_streams()
        with _INSTALL_LOCK:
            for name in LOGGERS:
                logging.getLogger(name).removeHandler(self._handoff)
            _LIVE.discard(self)
            if not _LIVE and _LEVEL_RAISED:
                logging.getLogger(LOGGERS[0]).setLevel(logging.NOTSET)
                _LEVEL_RAISED = False
        self._queue.put(None)  # after everything logged so far
        self._writer.join(timeout=10)
        self._file.close()
        self.hub.close()
