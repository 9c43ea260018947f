"""The running server's parts, built once by the app's lifespan and shared by the routes."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from nox_api.config import Settings
from nox_api.engine.base import Sandbox, SandboxUnavailable, UnavailableSandbox
from nox_api.engine.process import Launcher
from nox_api.services.executions import ExecutionService
from nox_api.services.files import Workspaces
from nox_api.services.tokens import DEFAULT_WORKSPACE, TokenService
from nox_api.storage.db import Database

__all__ = ["Nox", "build_sandbox"]

log = logging.getLogger("nox")


@dataclass
class Nox:
    settings: Settings
    db: Database
    sandbox: Sandbox
    workspaces: Workspaces
    tokens: TokenService
    executions: ExecutionService
    started: float = field(default_factory=time.time)

    @classmethod
    def start(cls, settings: Settings, sandbox: Sandbox | None = None) -> Nox:
        data = settings.data_path
        data.mkdir(parents=True, exist_ok=True)
        db = Database(settings.sqlalchemy_url)
        db.migrate()
        if sandbox is None:
            sandbox = build_sandbox(settings)
        owner = None
        if os.geteuid() == 0 and settings.sandbox_backend == "bwrap":
            owner = (settings.sandbox_uid, settings.sandbox_gid)
        workspaces = Workspaces(
            settings.workspaces_dir, settings.staging_dir, sandbox.prepare_workspace, owner
        )
        workspaces.setup()
        env_token = settings.api_token.get_secret_value() if settings.api_token else None
        tokens = TokenService(db, env_token)
        executions = ExecutionService(settings, db, sandbox, workspaces)
        nox = cls(settings, db, sandbox, workspaces, tokens, executions)
        reason = sandbox.info().reason
        if reason is not None:
            log.error("sandbox unavailable: %s", reason)
        else:
            sandbox.prewarm(workspaces.path(DEFAULT_WORKSPACE))
        return nox

    def close(self) -> None:
        self.sandbox.close()
        self.db.close()


def build_sandbox(settings: Settings) -> Sandbox:
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
        ceiling=settings.ceiling(),
        pool_size=settings.pool_size,
        pool_idle_s=settings.pool_idle_s,
        pool_max_workspaces=settings.pool_max_workspaces,
        max_concurrent=settings.max_concurrent_runs,
        use_cgroups=use_cgroups,
        probe_dir=settings.data_path / "probe",
    )
    sandbox.probe()
    return sandbox
