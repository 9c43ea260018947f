"""Alerts without Alertmanager: webhooks told when the detailed health turns ``fail``, when it
recovers, and when the audit chain breaks.

:class:`AlertHook` sees every detailed health report (:meth:`AlertHook.observe`, called by
:class:`~nox_api.services.health.HealthService` for reports asked for by requests and by the
:class:`AlertMonitor`) and sends an event on transitions only::

    health_failed     the overall status turned fail (from ok or degraded, or at the first report)
    health_recovered  the overall status left fail (one event, whatever it recovered to)
    audit_broken      the audit check turned fail (once per break; a health_failed comes with it)

Events are JSON, POSTed to every URL of ``NOX_ALERT_WEBHOOKS`` by one daemon thread. A request
thread only enqueues: :meth:`AlertHook.notify` never blocks and never raises. Each URL has its own
bounded queue (the oldest event is dropped, with a warning, when it is full) and keeps its order;
a URL waiting to retry holds back only its own events. A delivery is retried on connection errors,
timeouts, 5xx, 408 and 429, with backoff ``backoff_s`` doubling up to :data:`BACKOFF_MAX_S`, at most
``retries`` times; another 4xx is final, and redirects are not followed (a 3xx is final too).
The log (logger ``nox.alerts``) names a webhook by its position and origin only, since its
userinfo, path or query may hold a secret (Slack's and Teams' URLs carry theirs in the path).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from typing import IO, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

from nox_api._version import __version__
from noxsdk.models import HealthStatus

__all__ = [
    "AlertHook",
    "AlertMonitor",
    "BACKOFF_MAX_S",
    "BACKOFF_S",
    "CLOSE_TIMEOUT_S",
    "EVENTS",
    "QUEUE_SIZE",
    "shown_url",
]

log = logging.getLogger("nox.alerts")

EVENTS = ("health_failed", "health_recovered", "audit_broken")
QUEUE_SIZE = 100  # events waiting per webhook; the oldest goes first when full
BACKOFF_S = 1.0  # before the first retry; doubled for each further one
BACKOFF_MAX_S = 60.0
CLOSE_TIMEOUT_S = 5.0  # what close() spends at most on what is still queued
_MAX_ANSWER_BYTES = 64 * 1024  # of a receiver's answer read (and thrown away)
_RETRIED_4XX = frozenset({408, 429})


class CheckLike(Protocol):
    """What an alert takes of a health check (:class:`nox_api.services.health.Check`)."""

    @property
    def status(self) -> HealthStatus: ...

    @property
    def detail(self) -> str: ...


def shown_url(url: str) -> str:
    """``scheme://host[:port]`` and ``/...`` when there was more: what a log may say of a
    webhook URL (userinfo, path, query and fragment may hold secrets)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        port = ""
    more = "/..." if parts.path not in ("", "/") or parts.query or parts.fragment else ""
    return f"{parts.scheme}://{host}{port}{more}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx is answered as an error: the event never goes anywhere the operator did not name."""

    def redirect_request(  # noqa: PLR0917 - the signature of the base class
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Message,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


@dataclass(slots=True)
class _Delivery:
    event: str  # its name, for the log
    body: bytes
    attempts: int = 0  # made so far
    due: float = 0.0  # time.monotonic() from which it may be tried (again)


def _without_userinfo(url: str) -> tuple[str, str | None]:
    """``url`` without ``user:password@`` (urllib would take it for part of the host), and the
    ``Authorization`` header that carries it instead."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    credentials = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    basic = "Basic " + base64.b64encode(credentials.encode()).decode("ascii")
    return urlunsplit(parts._replace(netloc=netloc)), basic


@dataclass(slots=True)
class _Target:
    number: int  # 1-based position in NOX_ALERT_WEBHOOKS
    url: str
    pending: deque[_Delivery] = field(default_factory=deque)
    endpoint: str = field(init=False)  # the URL without its userinfo
    authorization: str | None = field(init=False)

    def __post_init__(self) -> None:
        self.endpoint, self.authorization = _without_userinfo(self.url)

    @property
    def name(self) -> str:
        return f"webhook #{self.number} ({shown_url(self.url)})"


class AlertHook:
    """Sends alert events to webhooks; see the module doc. :meth:`start` starts the sender,
    :meth:`close` drains what is queued (at most ``CLOSE_TIMEOUT_S``) and stops it."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = BACKOFF_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        queue_size: int = QUEUE_SIZE,
        server: str | None = None,
    ) -> None:
        for url in urls:
            if urlsplit(url).scheme not in ("http", "https"):
                raise ValueError(f"a webhook must be an http:// or https:// URL: {shown_url(url)}")
        self._targets = [_Target(n, url) for n, url in enumerate(urls, start=1)]
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._queue_size = max(1, queue_size)
        self.server = server if server is not None else socket.gethostname()
        self._opener = urllib.request.build_opener(_NoRedirect())
        self._headers = {"Content-Type": "application/json", "User-Agent": f"nox/{__version__}"}
        self._cond = threading.Condition()
        self._closing = False
        self._deadline = 0.0
        self._thread: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._health: HealthStatus | None = None  # None: no report seen yet
        self._audit_failed = False

    @property
    def urls(self) -> list[str]:
        return [t.url for t in self._targets]

    # -- transitions ---------------------------------------------------------------------------
    def observe(self, status: HealthStatus, checks: Mapping[str, CheckLike]) -> None:
        """A detailed health report was made: enqueue the events its transitions call for."""
        try:
            with self._state_lock:
                last, self._health = self._health, status
                audit = checks.get("audit")
                audit_failed = audit is not None and audit.status == HealthStatus.FAIL
                audit_broke = audit_failed and not self._audit_failed
                self._audit_failed = audit_failed
            failed = HealthStatus.FAIL
            if status == failed and last != failed:
                self.notify(self._event("health_failed", status, checks, previous=last))
            elif last == failed and status != failed:
                self.notify(self._event("health_recovered", status, checks, previous=last))
            if audit_broke and audit is not None:
                event = self._event("audit_broken", status, checks)
                event["detail"] = audit.detail
                self.notify(event)
        except Exception:  # an alert must never break the report that triggered it
            log.exception("could not make an alert of the health report")

    def _event(
        self,
        name: str,
        status: HealthStatus,
        checks: Mapping[str, CheckLike],
        *,
        previous: HealthStatus | None = None,
    ) -> dict[str, object]:
        event: dict[str, object] = {
            "source": "nox",
            "event": name,
            "status": status.value,
            "at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "server": self.server,
            "version": __version__,
            "checks": {
                n: {"status": c.status.value, "detail": c.detail} for n, c in checks.items()
            },
            "failing": [n for n, c in checks.items() if c.status == HealthStatus.FAIL],
        }
        if name != "audit_broken":
            event["previous"] = previous.value if previous is not None else None
        return event

    # -- the queue -----------------------------------------------------------------------------
    def notify(self, event: Mapping[str, object]) -> None:
        """Queue ``event`` (JSON values) for every webhook; never blocks, never raises."""
        try:
            name = str(event.get("event", "?"))
            body = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
        except Exception as exc:
            log.error("alert dropped: it cannot be sent as JSON: %s", exc)
            return
        dropped: list[tuple[str, str]] = []
        with self._cond:
            closed = self._closing
            for target in self._targets if not closed else ():
                if len(target.pending) >= self._queue_size:
                    dropped.append((target.name, target.pending.popleft().event))
                target.pending.append(_Delivery(name, body))
            self._cond.notify_all()
        if closed:
            log.warning("alert %s dropped: the alert hook is closed", name)
        for target_name, old in dropped:
            log.warning(
                "alert queue of %s is full (%d): dropped its oldest alert, %s",
                target_name, self._queue_size, old,
            )  # fmt: skip

    def pending(self) -> int:
        """Deliveries waiting (over all webhooks), including those waiting to retry."""
        with self._cond:
            return sum(len(t.pending) for t in self._targets)

    # -- the sender thread ---------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is not None or self._closing:
                return
            self._thread = threading.Thread(target=self._run, name="nox-alerts", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Give each queued delivery one last attempt, no longer retried, for at most
        ``timeout_s``; then drop what is left (logged) and stop the thread."""
        with self._cond:
            if not self._closing:
                self._closing = True
                self._deadline = time.monotonic() + timeout_s
            self._cond.notify_all()
            thread = self._thread
        if thread is None:
            self._drop_leftovers()
            return
        thread.join(timeout_s + 1.0)  # an attempt in flight has a timeout within the deadline
        if thread.is_alive():
            log.warning("the alert sender did not stop within %.0f s", timeout_s)

    def _drop_leftovers(self) -> None:
        with self._cond:
            left = [(t.name, len(t.pending)) for t in self._targets if t.pending]
            for t in self._targets:
                t.pending.clear()
        for name, count in left:
            log.error("%d alert(s) for %s dropped at shutdown: not delivered in time", count, name)

    def _next(self) -> tuple[_Target, _Delivery] | None:
        """Wait for a delivery that is due; None when closing is done."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._closing and now >= self._deadline:
                    break
                waits: list[float] = []
                for target in self._targets:
                    if not target.pending:
                        continue
                    head = target.pending[0]
                    if self._closing or head.due <= now:  # closing: no more waiting to retry
                        return target, target.pending.popleft()
                    waits.append(head.due - now)
                if self._closing:  # and nothing is left
                    break
                self._cond.wait(min(waits) if waits else None)
        self._drop_leftovers()
        return None

    def _run(self) -> None:
        while True:
            try:
                job = self._next()
                if job is None:
                    return
                self._deliver(*job)
            except Exception:  # the sender must outlive any one delivery
                log.exception("the alert sender failed")

    def _deliver(self, target: _Target, delivery: _Delivery) -> None:
        with self._cond:
            closing, deadline = self._closing, self._deadline
        timeout = self.timeout_s
        if closing:
            timeout = max(0.05, min(timeout, deadline - time.monotonic()))
        delivery.attempts += 1
        ok, retry, why = self._post(target, delivery.body, timeout)
        attempts = f"attempt {delivery.attempts} of {self.retries + 1}"
        if ok:
            log.info("alert %s delivered to %s (%s)", delivery.event, target.name, attempts)
            return
        if not retry or delivery.attempts > self.retries or closing:
            reason = "not retried" if not retry else "giving up"
            log.error(
                "alert %s to %s failed: %s (%s; %s)",
                delivery.event, target.name, why, attempts, reason,
            )  # fmt: skip
            return
        delay = min(self.backoff_s * 2 ** (delivery.attempts - 1), self.backoff_max_s)
        log.warning(
            "alert %s to %s failed: %s (%s; retrying in %.3g s)",
            delivery.event, target.name, why, attempts, delay,
        )  # fmt: skip
        delivery.due = time.monotonic() + delay
        with self._cond:
            if len(target.pending) >= self._queue_size:
                log.warning(
                    "alert queue of %s is full (%d): dropped alert %s instead of retrying it",
                    target.name, self._queue_size, delivery.event,
                )  # fmt: skip
                return
            target.pending.appendleft(delivery)  # first again: a webhook's events keep order
            self._cond.notify_all()

    def _post(self, target: _Target, body: bytes, timeout: float) -> tuple[bool, bool, str]:
        """One POST: (delivered, worth retrying, what happened)."""
        url = target.url
        headers = dict(self._headers)
        if target.authorization is not None:
            headers["Authorization"] = target.authorization
        # Only http(s) URLs get here (checked by __init__ and by the setting).
        request = urllib.request.Request(  # noqa: S310
            target.endpoint, data=body, headers=headers, method="POST"
        )
        try:
            with self._opener.open(request, timeout=timeout) as answer:
                answer.read(_MAX_ANSWER_BYTES)
                return True, False, f"HTTP {answer.status}"
        except urllib.error.HTTPError as exc:
            exc.close()
            code = exc.code
            if 300 <= code < 400:
                return False, False, f"HTTP {code}: redirects are not followed"
            return False, code >= 500 or code in _RETRIED_4XX, f"HTTP {code}"
        except urllib.error.URLError as exc:
            return False, True, _scrub(f"{type(exc.reason).__name__}: {exc.reason}", url)
        except (OSError, http.client.HTTPException) as exc:
            return False, True, _scrub(f"{type(exc).__name__}: {exc}", url)
        except Exception as exc:
            return False, False, _scrub(f"{type(exc).__name__}: {exc}", url)


def _scrub(text: str, url: str) -> str:
    """``text`` without ``url`` or its secret-bearing parts."""
    parts = urlsplit(url)
    for secret in (url, parts.query, parts.password, parts.username, parts.path):
        if secret and len(secret) > 1:
            text = text.replace(secret, "...")
    return text[:300]


class AlertMonitor:
    """Evaluates the detailed health every ``interval_s`` (the first time right away), so a
    failure is noticed when nobody polls ``/api/health/detailed``."""

    def __init__(self, evaluate: Callable[[], object], interval_s: float) -> None:
        self._evaluate = evaluate
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="nox-alert-monitor", daemon=True
            )
            self._thread.start()

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop; waits at most ``timeout_s`` for an evaluation under way."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("the alert monitor did not stop within %.0f s", timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            try:
                self._evaluate()
            except Exception:  # a failed evaluation must not end the monitor
                log.exception("the alert monitor could not evaluate the health")
            wait = self.interval_s
