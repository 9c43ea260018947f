"""Prometheus metrics: what ``GET /metrics`` exposes (see docs/operations.md, "Metrics").

Each app has its own :class:`Metrics` (its own registry: two apps in one process, as in the
tests, never share counters). Counters are incremented where things happen (the HTTP middleware
below, the run service, the auditor, the error handler); the pool, storage, health and build
series are read when Prometheus scrapes, by :class:`_StateCollector`.

Label values are bounded: routes are templates (``/api/history/{execution_id}``, never the raw
path; ``unmatched`` for a path no route knows), statuses and kinds come from enums, roles from the
three roles, and per-workspace storage is kept to the ``NOX_METRICS_MAX_WORKSPACES`` biggest, the
rest summed as ``_other``.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nox_api._version import __version__

if TYPE_CHECKING:
    from nox_api.state import Nox

__all__ = ["CONTENT_TYPE", "Metrics", "MetricsMiddleware"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER_WORKSPACES = "_other"
_HEALTH_VALUE = {"ok": 0, "degraded": 1, "fail": 2}
# Requests: from a millisecond (a health check) to a minute (a long run).
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_RUN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

log = logging.getLogger("nox.metrics")


class Metrics:
    def __init__(self, max_workspaces: int = 50) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.max_workspaces = max_workspaces
        r = self.registry
        self.http_requests = Counter(
            "nox_http_requests", "HTTP requests answered.", ["method", "route", "status"],
            registry=r,
        )  # fmt: skip
        self.http_duration = Histogram(
            "nox_http_request_duration_seconds", "Time to answer an HTTP request.",
            ["method", "route"], buckets=_HTTP_BUCKETS, registry=r,
        )  # fmt: skip
        self.runs = Counter(
            "nox_runs", "Runs finished, by kind and status.", ["kind", "status"], registry=r
        )
        self.run_duration = Histogram(
            "nox_run_duration_seconds", "Wall time of runs.", ["kind"], buckets=_RUN_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.run_cpu = Histogram(
            "nox_run_cpu_seconds", "CPU time of runs.", ["kind"], buckets=_RUN_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            "nox_rate_limited", "Requests refused by a rate limit, by role.", ["role"], registry=r
        )
        self.quota_refused = Counter(
            "nox_quota_refused", "Requests refused by a quota, by role.", ["role"], registry=r
        )
        self.auth_failures = Counter("nox_auth_failures", "Failed authentications.", registry=r)
        self.audit_events = Counter(
            "nox_audit_events", "Audit events written.", ["action", "outcome"], registry=r
        )
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self._state = _StateCollector(self)
        r.register(self._state)

    def attach(self, nox: Nox) -> None:
        """Read the pool, storage and health from ``nox`` at scrape time."""
        self._state.nox = nox

    def observe_run(self, kind: str, status: str, duration_ms: float, cpu_ms: float | None) -> None:
        self.runs.labels(kind, status).inc()
        self.run_duration.labels(kind).observe(duration_ms / 1000.0)
        if cpu_ms is not None:
            self.run_cpu.labels(kind).observe(cpu_ms / 1000.0)

    def refused(self, code: str, role: str | None) -> None:
        """Count an error answer that operators watch (called by the error handler)."""
        if code == "rate_limited":
            self.rate_limited.labels(role or "none").inc()
        elif code in ("quota_exceeded", "storage_quota_exceeded"):
            self.quota_refused.labels(role or "none").inc()
        elif code == "unauthorized":
            self.auth_failures.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Series read from the server's state when Prometheus scrapes."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.nox: Nox | None = None

    def describe(self) -> Iterable[Metric]:
        return []  # collected on each scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        nox = self.nox
        build = GaugeMetricFamily(
            "nox_build_info", "Nox build (always 1).", labels=["version", "python", "backend"]
        )
        backend = nox.sandbox.info().name if nox is not None else "none"
        build.add_metric([__version__, platform.python_version(), backend], 1)
        yield build
        if nox is None:
            return
        for step in (self._pool, self._storage, self._health):
            try:
                yield from step(nox)
            except Exception:  # a scrape must answer with what it could read
                log.exception("collecting %s metrics failed", step.__name__.strip("_"))

    @staticmethod
    def _pool(nox: Nox) -> Iterator[Metric]:
        stats = _call(nox.sandbox, "pool_stats")
        stems = _call(nox.sandbox, "stem_stats")
        pool = (stats.ready, stats.hits, stats.misses) if stats else (0, 0, 0)
        yield GaugeMetricFamily("nox_pool_ready_sandboxes", "Warm sandboxes ready.", value=pool[0])
        yield CounterMetricFamily("nox_pool_hits", "Runs that took a warm sandbox.", value=pool[1])
        yield CounterMetricFamily(
            "nox_pool_misses", "Runs that found no warm sandbox.", value=pool[2]
        )
        yield GaugeMetricFamily(
            "nox_stems_ready", "Half-started sandboxes ready.", value=stems.ready if stems else 0
        )

    def _storage(self, nox: Nox) -> Iterator[Metric]:
        rows = nox.stats.storage_by_workspace()
        rows.sort(key=lambda row: row[1], reverse=True)
        keep, rest = rows[: self._metrics.max_workspaces], rows[self._metrics.max_workspaces :]
        family = GaugeMetricFamily(
            "nox_workspace_storage_bytes",
            "Bytes a workspace stores, as its last scan found (the biggest ones; the rest summed "
            f"as {OTHER_WORKSPACES}).",
            labels=["workspace"],
        )
        for workspace, size in keep:
            family.add_metric([workspace], size)
        if rest:
            family.add_metric([OTHER_WORKSPACES], sum(size for _ws, size in rest))
        yield family

    @staticmethod
    def _health(nox: Nox) -> Iterator[Metric]:
        report = nox.health.report()
        family = GaugeMetricFamily(
            "nox_health_status",
            "Detailed health per check: 0 ok, 1 degraded, 2 fail.",
            labels=["check"],
        )
        family.add_metric(["overall"], _HEALTH_VALUE[report.status.value])
        checks = report.checks.model_dump()
        for name, check in checks.items():
            family.add_metric([name], _HEALTH_VALUE[check["status"]])
        yield family
        free_mib = checks.get("disk", {}).get("free_mib")
        if free_mib is not None:
            yield GaugeMetricFamily(
                "nox_disk_free_bytes", "Free bytes in the data folder.", value=free_mib * (1 << 20)
            )


def _call(obj: object, name: str) -> Any:
    method: Callable[[], Any] | None = getattr(obj, name, None)
    return method() if method is not None else None


access_log = logging.getLogger("nox.http")


class MetricsMiddleware:
    """Counts and times every HTTP request by method, route template and status, and writes
    one access line per request to the server log (``nox.http``: method, route template,
    status, duration, the caller's token id; the request id is added by the formatter)."""

    def __init__(self, app: ASGIApp, metrics: Callable[[], Metrics | None]) -> None:
        self.app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception that escapes everything is a 500 for the client

        async def send_counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            metrics = self._metrics()
            if metrics is not None:
                metrics.http_requests.labels(method, template, str(status)).inc()
                metrics.http_duration.labels(method, template).observe(elapsed)
            if access_log.isEnabledFor(logging.INFO):
                principal = scope.get("state", {}).get("principal")
                # A record made here, not by access_log.info(): that one walks the stack to
                # find its caller, 60-80 us of every request on this machine.
                record = logging.LogRecord(
                    access_log.name, logging.INFO, __file__, 0, "%s %s %s",
                    (method, template, status), None,
                )  # fmt: skip
                record.method, record.route, record.status = method, template, status
                record.duration_ms = round(elapsed * 1000.0, 3)
                record.actor_id = getattr(principal, "id", None)
                access_log.handle(record)
