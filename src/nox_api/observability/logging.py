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
import re
import threading
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from io import TextIOWrapper
from pathlib import Path

from asgi_correlation_id import correlation_id

from nox_api.config import Settings
from nox_api.observability.stream import LogHub
from nox_api.services.tokens import TOKEN_PREFIX
from nox_api.textfile import reverse_lines

__all__ = ["JsonFormatter", "LOGGERS", "LOG_FILE", "MAX_TAIL_LINES", "ServerLog", "tail_lines"]

LOG_FILE = "nox.log"
MAX_TAIL_LINES = 10_000  # GET /api/logs?tail= at most
# The server's own loggers and uvicorn's error logger. uvicorn's access log stays on stderr.
LOGGERS = ("nox", "uvicorn.error")
REDACTED = "[REDACTED]"
_MIN_SECRET_CHARS = 8  # shorter configured values are not searched for (too many false hits)
_TOKEN_RE = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]{20,}")
_BEARER_RE = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+")


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON; ``secrets`` are masked wherever they appear."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if len(s) >= _MIN_SECRET_CHARS)

    def redact(self, text: str) -> str:
        text = _TOKEN_RE.sub(TOKEN_PREFIX + REDACTED, text)
        text = _BEARER_RE.sub(r"\1" + REDACTED, text)
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, str] = {
            "time": f"{created:%Y-%m-%dT%H:%M:%S}.{created.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": self.redact(record.getMessage()),
        }
        request_id = correlation_id.get()
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)  # cached, as logging does
        if record.exc_text:
            entry["exc_info"] = self.redact(record.exc_text)
        if record.stack_info:
            entry["stack_info"] = self.redact(self.formatStack(record.stack_info))
        return json.dumps(entry, ensure_ascii=False)


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


_INSTALL_LOCK = threading.Lock()
_LIVE: set[ServerLog] = set()
_LEVEL_RAISED = False


class ServerLog:
    """The server log of one running server: its file, the live stream, and the handlers that
    feed both. :meth:`close` takes everything back out of the logging module."""

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
        self._install()

    def _install(self) -> None:
        global _LEVEL_RAISED  # noqa: PLW0603 - the logging module's state is global itself
        with _INSTALL_LOCK:
            for name in LOGGERS:
                logger = logging.getLogger(name)
                logger.addHandler(self._file)
                logger.addHandler(self.hub)
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
        current one holds fewer."""
        return tail_lines(self.files(), count)

    def end_streams(self) -> None:
        """End every live stream soon (the server is shutting down). Safe in a signal handler."""
        self.hub.end_streams()

    def close(self) -> None:
        global _LEVEL_RAISED  # noqa: PLW0603
        self.hub.end_streams()
        with _INSTALL_LOCK:
            for name in LOGGERS:
                logger = logging.getLogger(name)
                logger.removeHandler(self._file)
                logger.removeHandler(self.hub)
            _LIVE.discard(self)
            if not _LIVE and _LEVEL_RAISED:
                logging.getLogger(LOGGERS[0]).setLevel(logging.NOTSET)
                _LEVEL_RAISED = False
        self._file.close()
        self.hub.close()
