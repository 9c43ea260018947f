"""``GET /api/health/detailed``: can each part of the server do its work right now?

Five checks, each ``ok``, ``degraded`` (works, but an operator should look) or ``fail`` (cannot do
its work); the report's status is the worst of them::

    database  reachable, and at the newest migration this server knows; else fail
    sandbox   the backend runs print(1) for real (a probe, at most once per PROBE_INTERVAL_S,
              the result shared meanwhile); a failed probe is fail; the unsafe backend
              (isolation "none") is degraded
    disk      free space of the data folder: degraded below NOX_DISK_FREE_MIN_MIB, fail below a
              tenth of it
    audit     the tail of the audit log (see :mod:`nox_api.services.audit_tail`); fail when it
              was cut, edited or rewritten
    policy    the policy in force; degraded when the last reload of the file was refused

A check that itself raises is ``fail`` with the error (never a 500). Changes of the overall status
are logged (a warning when it gets worse), so polling leaves a trace only when something changes;
with ``NOX_ALERT_WEBHOOKS`` each report also goes to the
:class:`~nox_api.services.alerts.AlertHook`, which queues an event when the status turns fail or
back, or the audit check turns fail.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.exc import SQLAlchemyError

from nox_api.config import Settings
from nox_api.engine.base import MIB, Sandbox
from nox_api.services.alerts import AlertHook
from nox_api.services.audit import AuditLog
from nox_api.services.audit_tail import check_audit_tail
from nox_api.services.policy import PolicyStore
from nox_api.storage.db import Database
from noxsdk.models import HealthCheck, HealthChecks, HealthReport, HealthStatus

__all__ = ["Check", "HealthService", "PROBE_INTERVAL_S", "worst"]

log = logging.getLogger("nox.health")

PROBE_INTERVAL_S = 30.0  # a probe costs ~30 ms of a sandbox start: polling must not add load
_RANK = {HealthStatus.OK: 0, HealthStatus.DEGRADED: 1, HealthStatus.FAIL: 2}
_MAX_ERROR_CHARS = 300


@dataclass(frozen=True, slots=True)
class Check:
    """One check's outcome; ``extra`` holds its own fields (JSON values)."""

    status: HealthStatus
    detail: str
    extra: dict[str, object] = field(default_factory=dict)


def worst(statuses: list[HealthStatus]) -> HealthStatus:
    return max(statuses, key=_RANK.__getitem__, default=HealthStatus.OK)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps the driver's error
    text = str(orig if orig is not None else exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:_MAX_ERROR_CHARS]


@dataclass(frozen=True, slots=True)
class _Probe:
    reason: str | None
    at: float  # time.monotonic()
    ms: float


class HealthService:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        sandbox: Sandbox,
        audit_log: AuditLog,
        policy: PolicyStore,
        *,
        probe_interval_s: float = PROBE_INTERVAL_S,
        alerts: AlertHook | None = None,
    ) -> None:
        self._settings = settings
        self._db = db
        self._sandbox = sandbox
        self._audit_log = audit_log
        self._policy = policy
        self._probe_interval_s = probe_interval_s
        self._probe_lock = threading.Lock()
        self._probe: _Probe | None = None
        self._head: str | None = None
        self._last: HealthStatus | None = None
        self.alerts = alerts
        self._change_lock = threading.Lock()
        self._reports = itertools.count(1)  # numbers reports by when they began
        self._newest = 0  # the number of the newest report whose outcome was taken in

    def report(self, *, admin: bool = False) -> HealthReport:
        """Run every check. ``admin`` adds what only admins may read (policy errors)."""
        number = next(self._reports)
        checks: dict[str, Check] = {}
        steps: dict[str, Callable[[], Check]] = {
            "database": self.database,
            "sandbox": self.sandbox,
            "disk": self.disk,
            "audit": self.audit,
            "policy": lambda: self.policy(admin=admin),
        }
        for name, step in steps.items():
            try:
                checks[name] = step()
            except Exception as exc:
                log.exception("the %s health check failed", name)
                checks[name] = Check(HealthStatus.FAIL, f"the check failed: {_first_line(exc)}")
        status = worst([check.status for check in checks.values()])
        with self._change_lock:
            # Reports run at once (requests, the alert monitor): one begun before the newest
            # taken in is older news, and must not flip the status back.
            if number > self._newest:
                self._newest = number
                self._log_change(status, checks)
                if self.alerts is not None:
                    self.alerts.observe(status, checks)  # only enqueues: never blocks
        return HealthReport(
            status=status,
            checks=HealthChecks(
                **{
                    name: HealthCheck(status=c.status, detail=c.detail, **c.extra)
                    for name, c in checks.items()
                }
            ),
        )

    def _log_change(self, status: HealthStatus, checks: dict[str, Check]) -> None:
        last, self._last = self._last, status
        if status == last or (last is None and status == HealthStatus.OK):
            return
        problems = "; ".join(
            f"{name} {c.status.value}: {c.detail}"
            for name, c in checks.items()
            if c.status != HealthStatus.OK
        )
        if last is None or _RANK[status] > _RANK[last]:
            log.warning("health is %s: %s", status.value, problems)
        else:
            log.info("health is %s again%s", status.value, f": {problems}" if problems else "")

    # -- the checks ----------------------------------------------------------------------------
    def database(self) -> Check:
        started = time.perf_counter()
        try:
            revision = self._db.revision()
        except SQLAlchemyError as exc:
            return Check(HealthStatus.FAIL, f"the database cannot be reached: {_first_line(exc)}")
        latency_ms = round((time.perf_counter() - started) * 1000, 2)
        if self._head is None:
            self._head = self._db.head()  # the migration scripts do not change while running
        head = self._head
        extra: dict[str, object] = {"revision": revision, "head": head, "latency_ms": latency_ms}
        if revision is None:
            return Check(
                HealthStatus.FAIL,
                "the database has no schema revision: it was emptied or replaced after start-up; "
                "restart the server to migrate it",
                extra,
            )
        if revision != head:
            return Check(
                HealthStatus.FAIL,
                f"the database is at revision {revision}, this server needs {head}: "
                "restart the server (it migrates at start) or run the matching version",
                extra,
            )
        return Check(HealthStatus.OK, f"reachable, at the newest revision {head}", extra)

    def _probed(self) -> _Probe:
        """The last probe, run again when older than the interval; concurrent callers wait for
        the one probe running instead of starting their own."""
        with self._probe_lock:
            probe = self._probe
            now = time.monotonic()
            if probe is None or now - probe.at >= self._probe_interval_s:
                started = time.perf_counter()
                reason = self._sandbox.probe()
                ms = (time.perf_counter() - started) * 1000
                probe = self._probe = _Probe(reason, time.monotonic(), ms)
            return probe

    def sandbox(self) -> Check:
        probe = self._probed()
        info = self._sandbox.info()
        extra: dict[str, object] = {
            "backend": info.name,
            "isolation": info.isolation,
            "probe_ms": round(probe.ms, 2),
            "probe_age_s": round(time.monotonic() - probe.at, 1),
        }
        if probe.reason is not None:
            return Check(HealthStatus.FAIL, probe.reason, extra)
        if info.isolation == "none":
            return Check(
                HealthStatus.DEGRADED,
                f"the {info.name} backend runs code WITHOUT ISOLATION, as the server's user: "
                "for development only (set NOX_SANDBOX_BACKEND=bwrap)",
                extra,
            )
        return Check(
            HealthStatus.OK,
            f"the {info.name} backend ran print(1) in {probe.ms:.0f} ms",
            extra,
        )

    def disk(self) -> Check:
        usage = shutil.disk_usage(self._settings.data_path)
        min_mib = self._settings.disk_free_min_mib
        extra: dict[str, object] = {
            "free_mib": usage.free // MIB,
            "total_mib": usage.total // MIB,
            "min_free_mib": min_mib,
        }
        free = f"{usage.free / MIB:.0f} MiB free in the data folder"
        if usage.free * 10 < min_mib * MIB:
            return Check(
                HealthStatus.FAIL,
                f"{free}, below a tenth of NOX_DISK_FREE_MIN_MIB ({min_mib} MiB): "
                "uploads, runs and the audit log may fail; free space now",
                extra,
            )
        if usage.free < min_mib * MIB:
            return Check(
                HealthStatus.DEGRADED, f"{free}, below NOX_DISK_FREE_MIN_MIB ({min_mib} MiB)", extra
            )
        return Check(HealthStatus.OK, f"{free} (warning below {min_mib} MiB)", extra)

    def audit(self) -> Check:
        result = check_audit_tail(self._audit_log, self._settings)
        if result.status == HealthStatus.FAIL:
            # An append or a rotation may have been under way while the tail was read: a
            # real problem is still there a moment later.
            time.sleep(0.05)
            result = check_audit_tail(self._audit_log, self._settings)
        return Check(result.status, result.detail, result.extra)

    def policy(self, *, admin: bool = False) -> Check:
        store = self._policy
        extra: dict[str, object] = {
            "source": store.path.name,
            "sha256": store.source_sha256,
            "loaded_at": store.loaded_at.isoformat(),
        }
        loaded = (
            f"the policy of {store.path.name} loaded at {store.loaded_at:%Y-%m-%d %H:%M:%S} UTC"
        )
        refusal = store.last_refusal
        if refusal is None:
            return Check(HealthStatus.OK, f"{loaded} is in force", extra)
        extra["refused_at"] = refusal.at.isoformat()
        problems = refusal.message.count("\n") + 1
        if admin:
            extra["errors"] = refusal.message
        return Check(
            HealthStatus.DEGRADED,
            f"the policy file changed and was refused at {refusal.at:%Y-%m-%d %H:%M:%S} UTC "
            f"({problems} problem{'s' if problems != 1 else ''}; admins see them in 'errors', "
            f"the server log and POST /api/policy/reload); {loaded} stays in force",
            extra,
        )
