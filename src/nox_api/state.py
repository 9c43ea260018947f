"""The running server's parts, built once by the app's lifespan and shared by the routes."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from nox_api.config import Settings
from nox_api.engine.base import Limits, Sandbox, SandboxUnavailable, UnavailableSandbox
from nox_api.engine.process import Launcher
from nox_api.errors import ConfigError
from nox_api.observability.logging import ServerLog
from nox_api.observability.metrics import Metrics
from nox_api.services.alerts import AlertHook, AlertMonitor
from nox_api.services.auditing import Auditor, Caller, open_audit_log
from nox_api.services.backups import BackupService, refuse_interrupted_restore
from nox_api.services.cleaning import Cleaner
from nox_api.services.executions import ExecutionService, ceiling_of
from nox_api.services.file_search import SearchBudget
from nox_api.services.files import Workspaces
from nox_api.services.health import HealthService
from nox_api.services.history import HistoryService
from nox_api.services.policy import Policy, PolicyError, PolicyStore, install_sighup
from nox_api.services.quotas import QuotaService
from nox_api.services.ratelimit import RateLimiter
from nox_api.services.retention import Retention
from nox_api.services.scanner import StorageScanner
from nox_api.services.server_lock import ServerLock
from nox_api.services.stats import StatsService
from nox_api.services.system import SystemMonitor
from nox_api.services.tokens import DEFAULT_WORKSPACE, TokenService
from nox_api.services.tree_walk import WalkGate
from nox_api.services.upload_quota import UploadQuota
from nox_api.services.workspace_files import WorkspaceFiles
from nox_api.storage.db import Database
from noxsdk.models import FileInfo

__all__ = ["Nox", "build_sandbox"]

log = logging.getLogger("nox")


@dataclass
class Nox:
    settings: Settings
    db: Database
    sandbox: Sandbox
    workspaces: Workspaces
    files: WorkspaceFiles
    tokens: TokenService
    policy: PolicyStore
    limiter: RateLimiter
    quotas: QuotaService
    uploads: UploadQuota
    auditor: Auditor
    executions: ExecutionService
    backups: BackupService
    logs: ServerLog
    health: HealthService
    cleaner: Cleaner
    history: HistoryService
    retention: Retention
    stats: StatsService
    system: SystemMonitor
    started: float = field(default_factory=time.time)
    alerts: AlertHook | None = None  # with NOX_ALERT_WEBHOOKS only, as is the monitor
    alert_monitor: AlertMonitor | None = None
    metrics: Metrics = field(default_factory=Metrics)

    @classmethod
    def start(cls, settings: Settings, sandbox: Sandbox | None = None) -> Nox:
        settings.data_path.mkdir(parents=True, exist_ok=True)
        logs = ServerLog(settings)  # first, so the start-up's own lines reach the file
        try:
            return cls._start(settings, sandbox, logs)
        except BaseException:
            logs.close()
            raise

    @classmethod
    def _start(  # noqa: PLR0915 - one step per part, in start-up order
        cls, settings: Settings, sandbox: Sandbox | None, logs: ServerLog
    ) -> Nox:
        data = settings.data_path
        data.mkdir(parents=True, exist_ok=True)
        server_lock = ServerLock.shared(data)  # no offline restore while this server runs
        try:
            refuse_interrupted_restore(data)
        except ConfigError:
            server_lock.release()
            raise
        try:
            policy = PolicyStore(settings.policy_path)
        except PolicyError as exc:
            raise ConfigError(f"NOX_POLICY_FILE: {exc.message}") from None
        db = Database(settings.sqlalchemy_url)
        db.migrate()
        auditor = Auditor(open_audit_log(settings, db, background=True))
        if sandbox is None:
            sandbox = build_sandbox(settings, ceiling_of(policy.current))
        else:
            sandbox.set_ceiling(ceiling_of(policy.current))
        owner = None
        if os.geteuid() == 0 and settings.sandbox_backend == "bwrap":
            owner = (settings.sandbox_uid, settings.sandbox_gid)
        workspaces = Workspaces(
            settings.workspaces_dir, settings.staging_dir, sandbox.prepare_workspace, owner
        )
        workspaces.setup()
        files = WorkspaceFiles(
            workspaces, SearchBudget.from_settings(settings), WalkGate.from_settings(settings)
        )
        env_token = settings.api_token.get_secret_value() if settings.api_token else None
        tokens = TokenService(db, env_token)
        quotas = QuotaService(db, policy)
        uploads = UploadQuota(quotas)
        scanner = StorageScanner(db, settings.workspaces_dir)
        executions = ExecutionService(
            db=db,
            sandbox=sandbox,
            workspaces=workspaces,
            policy=policy,
            quotas=quotas,
            auditor=auditor,
            changed=scanner.mark_dirty,
            background=True,
            threads=settings.max_concurrent_runs + 8,  # 8 more may wait for a slot in a thread
        )
        auditor.barrier = executions.audit_barrier
        history = HistoryService(db, executions.settle)
        retention = Retention(
            db,
            keep_runs=settings.history_keep_runs,
            keep_days=settings.history_keep_days,
            interval_s=settings.retention_interval_s,
        )
        stats = StatsService(db, scanner, settle=executions.settle, sandbox_info=sandbox.info)
        system = SystemMonitor(data)
        limiter = RateLimiter(settings.redis_url)
        health = HealthService(
            settings, db, sandbox, auditor.log, policy, alerts=_alert_hook(settings)
        )
        cleaner = Cleaner(settings, auditor, changed=scanner.mark_dirty)
        backups = BackupService(
            settings, db, auditor, owner=owner, prepare=sandbox.prepare_workspace,
            settle=executions.settle, changed=scanner.mark_dirty, server_lock=server_lock,
            after_restore=(sandbox.flush, quotas.forget_cached, tokens.changed),
        )  # fmt: skip
        nox = cls(
            settings=settings,
            db=db,
            sandbox=sandbox,
            workspaces=workspaces,
            files=files,
            tokens=tokens,
            policy=policy,
            limiter=limiter,
            quotas=quotas,
            uploads=uploads,
            auditor=auditor,
            executions=executions,
            backups=backups,
            logs=logs,
            health=health,
            cleaner=cleaner,
            history=history,
            retention=retention,
            stats=stats,
            system=system,
        )
        nox._watch_metrics()
        retention.start()
        policy.on_change(nox._policy_changed)
        policy.start_watching()
        install_sighup(policy)  # only where it can: the main thread of `nox-api serve`
        reason = sandbox.info().reason
        if reason is not None:
            log.error("sandbox unavailable: %s", reason)
        else:
            sandbox.prewarm(workspaces.path(DEFAULT_WORKSPACE))
        stats.start()  # after the default workspace's folder exists: it is scanned too
        nox._start_alerts(health.alerts)
        return nox

    def _start_alerts(self, alerts: AlertHook | None) -> None:
        """With NOX_ALERT_WEBHOOKS: the sender, and the monitor that evaluates the health."""
        if alerts is None:
            return
        self.alerts = alerts
        alerts.start()

        def health() -> object:  # self.health when called: tests may replace it
            return self.health.report()

        self.alert_monitor = AlertMonitor(health, self.settings.alert_interval_s)
        self.alert_monitor.start()

    def _watch_metrics(self) -> None:
        metrics = self.metrics
        metrics.max_workspaces = self.settings.metrics_max_workspaces
        metrics.attach(self)
        self.auditor.observers.append(
            lambda event: metrics.audit_events.labels(event.action, event.outcome).inc()
        )
        self.executions.observers.append(
            lambda run: metrics.observe_run(
                run.kind.value, run.status.value, run.duration_ms, run.cpu_ms
            )
        )

    def _policy_changed(self, old: Policy, new: Policy) -> None:
        """Whatever reloaded it (API, SIGHUP, the file watcher): apply and record it."""
        self.sandbox.set_ceiling(ceiling_of(new))
        self.auditor.record(
            "policy.change", Caller(), target=str(self.policy.path),
            sha256=self.policy.source_sha256,
        )  # fmt: skip
        log.info("policy changed (%s)", self.policy.source_sha256[:12])

    def reload_policy(self, caller: Caller | None) -> Policy:
        """Reload the policy file; audited either way. Raises PolicyError, the old one stays."""
        try:
            policy = self.policy.reload()
        except PolicyError as exc:
            self.auditor.record("policy.reload", caller, outcome="failed", error=exc.message[:500])
            raise
        self.auditor.record("policy.reload", caller, sha256=self.policy.source_sha256)
        return policy

    def record_upload(self, caller: Caller, workspace: str, info: FileInfo) -> None:
        """After a file landed in a workspace by upload: rescan its storage, count it against
        the daily upload quota, audit it."""
        self.stats.mark_dirty(workspace)
        self.quotas.record_upload(workspace, info.size)
        self.auditor.record(
            "file.upload", caller, workspace=workspace, target=info.path, size=info.size,
            sha256=info.sha256,
        )  # fmt: skip

    def request_body_limit(self) -> int:
        """Largest JSON body: the policy's code and stdin maxima and room for the rest."""
        m = self.policy.current.limits.maxima
        return m.code_bytes + m.stdin_bytes + 256 * 1024

    def close(self) -> None:
        if self.alert_monitor is not None:
            self.alert_monitor.close()  # first: no health report while the parts close
        self.retention.close()
        self.stats.close()
        self.policy.stop_watching()
        self.sandbox.close()
        self.executions.close()  # the last runs' history rows and audit records
        self.auditor.close()
        self.db.close()
        self.backups.close()  # releases server.lock: an offline restore may run from now on
        if self.alerts is not None:
            self.alerts.close()  # the queued alerts, at most CLOSE_TIMEOUT_S; failures logged
        self.logs.close()  # last: what closing logs still reaches the file


def _alert_hook(settings: Settings) -> AlertHook | None:
    if not settings.alert_webhooks:
        return None
    return AlertHook(
        settings.alert_webhooks, timeout_s=settings.alert_timeout_s, retries=settings.alert_retries
    )


def build_sandbox(settings: Settings, ceiling: Limits) -> Sandbox:
    """The configured backend, probed with a trivial program. A backend that cannot work is
    still returned (it answers 503 with the reason), so the server starts and says why."""
    from nox_api.engine.sandbox import ProcessSandbox

    launcher: Launcher
    if settings.sandbox_backend == "unsafe":
        from nox_api.engine.unsafe import UNSAFE_WARNING, UnsafeLauncher

        log.warning(UNSAFE_WARNING)
        name, isolation, use_cgroups = "unsafe", "none", False
        launcher = UnsafeLauncher(python=settings.sandbox_python)
    else:
        from nox_api.engine.bwrap import BwrapLauncher

        name, isolation, use_cgroups = "bwrap", "namespaces+seccomp", settings.sandbox_cgroups
        try:
            launcher = BwrapLauncher.create(
                python=settings.sandbox_python, uid=settings.sandbox_uid, gid=settings.sandbox_gid
            )
        except SandboxUnavailable as exc:
            return UnavailableSandbox(name, str(exc))
    sandbox = ProcessSandbox(
        name=name,
        isolation=isolation,
        launcher=launcher,
        ceiling=ceiling,
        pool_size=settings.pool_size,
        pool_idle_s=settings.pool_idle_s,
        pool_max_workspaces=settings.pool_max_workspaces,
        max_concurrent=settings.max_concurrent_runs,
        stems=settings.pool_stems,
        use_cgroups=use_cgroups,
        probe_dir=settings.probe_dir,
    )
    sandbox.probe()
    return sandbox
