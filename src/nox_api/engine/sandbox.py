"""A :class:`~nox_api.engine.base.Sandbox` made of processes: a launcher (bubblewrap or the plain
``unsafe`` one), the warm pool, cgroups when the machine allows them, and a cap on how many runs
go at once. The backends in :mod:`.bwrap` and :mod:`.unsafe` are this class with their launcher.
"""

from __future__ import annotations

import logging
import math
import resource
import shutil
import tempfile
import threading
from pathlib import Path

from nox_api.engine import cgroups as cgroups_mod
from nox_api.engine.base import BackendInfo, Limits, Result, RunSpec, SandboxUnavailable
from nox_api.engine.pool import PoolStats, WarmPool
from nox_api.engine.process import (
    Launcher,
    SandboxProcess,
    Stem,
    grow,
    spawn,
    spawn_stem,
    supervise,
)
from nox_api.engine.quiet import QuietGate
from noxsdk.models import ExecutionStatus

__all__ = ["ProcessSandbox"]

log = logging.getLogger("nox.engine")


class ProcessSandbox:
    """Runs each request in a fresh sandbox process started by ``launcher``."""

    def __init__(
        self,
        *,
        name: str,
        isolation: str,
        launcher: Launcher,
        ceiling: Limits,
        pool_size: int,
        pool_idle_s: float,
        pool_max_workspaces: int,
        max_concurrent: int,
        stems: int = 0,
        use_cgroups: bool,
        probe_dir: Path,
    ) -> None:
        self.name = name
        self.isolation = isolation
        self._launcher = launcher
        self._ceiling = ceiling
        self._probe_dir = probe_dir
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._cgroups = cgroups_mod.detect() if use_cgroups else None
        if self._cgroups is not None:
            removed = self._cgroups.cleanup_stale()
            if removed:
                log.warning("removed %d sandbox cgroups left by an earlier server", removed)
        launcher.memory_by_rlimit = self._cgroups is None
        self._reason: str | None = None
        # Warm sandboxes start nice (they compete with running requests for the CPU) when
        # they can take the normal priority back: RLIMIT_NICE 20 allows nice 0, no better.
        self._pool_nice = _POOL_NICE if _allow_normal_priority() else 0
        self._quiet = QuietGate()  # refills and tear-downs wait while runs are answered
        self._pool: WarmPool[SandboxProcess] = WarmPool(
            self._spawn_ahead, pool_size, pool_idle_s, pool_max_workspaces, self._quiet
        )
        # Stems (see process.Stem) serve the runs the warm pool misses, whatever their
        # workspace. They save the cgroup's creation and join, so without cgroups they are off.
        if self._cgroups is None or not launcher.supports_stems:
            stems = 0
        self._stems: WarmPool[Stem] = WarmPool(
            self._spawn_stem, stems, math.inf, 1, self._quiet, name="nox-stems"
        )
        self._stems.prewarm(_STEMS)

    # -- Sandbox protocol ------------------------------------------------------------------
    def info(self) -> BackendInfo:
        return BackendInfo(
            name=self.name,
            isolation=self.isolation,
            limits_by=self.limits_by(),
            available=self._reason is None,
            reason=self._reason,
        )

    def run(self, spec: RunSpec) -> Result:
        if self._reason is not None:
            raise SandboxUnavailable(self._reason)
        self._check_within_ceiling(spec.limits)
        with self._slots, self._quiet.busy():
            sp = self._pool.take(spec.workspace)
            warm = sp is not None
            if sp is None:
                sp = self._cold(spec.workspace)
            return supervise(sp, spec, self._launcher.memory_by_rlimit, warm, self._quiet)

    def prewarm(self, workspace: Path) -> None:
        if self._reason is None:
            self._pool.prewarm(workspace)

    def prepare_workspace(self, workspace: Path) -> None:
        self._launcher.prepare_workspace(workspace)

    def flush(self) -> None:
        """Throw away the warm sandboxes (a restore replaced the folders they bound)."""
        self._pool.flush()  # stems have no folder yet: they stay

    def set_ceiling(self, ceiling: Limits) -> None:
        """New maxima: warm sandboxes started under the old ones are thrown away."""
        if ceiling != self._ceiling:
            self._ceiling = ceiling
            self._pool.flush()
            self._stems.flush()

    def close(self) -> None:
        self._pool.close()
        self._stems.close()
        self._launcher.close()

    # -- the rest --------------------------------------------------------------------------
    def pool_stats(self) -> PoolStats:
        return self._pool.stats()

    def stem_stats(self) -> PoolStats:
        return self._stems.stats()

    def limits_by(self) -> dict[str, str]:
        cg = f"cgroup {self._cgroups.version}" if self._cgroups is not None else None
        return {
            "timeout_s": "server (kills the whole sandbox)",
            "cpu_s": "rlimit RLIMIT_CPU",
            "memory_mib": f"{cg} memory" if cg else "rlimit RLIMIT_AS",
            "processes": f"{cg} pids" if cg else "rlimit RLIMIT_NPROC (per sandbox uid)",
            "file_size_mib": "rlimit RLIMIT_FSIZE",
            "open_files": "rlimit RLIMIT_NOFILE",
            "tmp_size_mib": "tmpfs size" if self.isolation != "none" else "not enforced",
            "output_bytes": "server (reads at most the cap)",
        }

    def probe(self) -> str | None:
        """Run ``print(1)`` for real; remember and return why it failed, or None."""
        self._probe_dir.mkdir(parents=True, exist_ok=True)
        workspace = Path(tempfile.mkdtemp(prefix="probe-", dir=self._probe_dir))
        try:
            self._launcher.prepare_workspace(workspace)
            spec = RunSpec("python", "print(1)", workspace, Limits(timeout_s=10.0))
            result = supervise(
                self._spawn(workspace), spec, self._launcher.memory_by_rlimit, warm=False
            )
            if result.status != ExecutionStatus.OK or result.stdout != b"1\n":
                detail = result.stderr.decode("utf-8", "replace").strip()[-500:]
                self._reason = (
                    f"the {self.name} sandbox cannot run a trivial program "
                    f"(status {result.status}, exit {result.exit_code}): {detail or 'no output'}"
                    f"{self._launcher.hint(detail)}"
                )
            else:
                self._reason = None
        except SandboxUnavailable as exc:
            self._reason = str(exc)
        except OSError as exc:
            self._reason = f"the {self.name} sandbox could not start: {exc}"
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
        return self._reason

    def _check_within_ceiling(self, lim: Limits) -> None:
        c = self._ceiling
        if lim.memory_mib > c.memory_mib or lim.processes > c.processes:
            raise ValueError("run limits above the sandbox ceiling; the policy must refuse them")

    def _spawn(self, workspace: Path) -> SandboxProcess:
        return spawn(self._launcher, workspace, self._cgroups, self._ceiling)

    def _cold(self, workspace: Path) -> SandboxProcess:
        """A sandbox started now: from a stem when one is ready, else from nothing."""
        stem = self._stems.take(_STEMS)
        if stem is not None:
            try:
                return grow(stem, self._launcher, workspace, self._ceiling)
            except OSError:
                log.warning("a stem died before it was used; starting a sandbox from nothing")
        return self._spawn(workspace)

    def _spawn_stem(self, _key: Path) -> Stem:
        return spawn_stem(self._launcher, self._cgroups, self._ceiling)

    def _spawn_ahead(self, workspace: Path) -> SandboxProcess:
        return spawn(self._launcher, workspace, self._cgroups, self._ceiling, nice=self._pool_nice)


_STEMS = Path("/")  # the stems' one queue in their pool: they belong to no workspace yet
_POOL_NICE = 10
_NICE_ZERO_ALLOWED = 20  # RLIMIT_NICE is 20 - the best nice value a process may set


def _allow_normal_priority() -> bool:
    """Let processes started from here raise their priority back to nice 0, never above:
    RLIMIT_NICE soft and hard exactly 20 (a higher hard limit would let a sandbox raise its
    soft one and go below nice 0). Inherited by the sandboxes; False when not allowed here."""
    try:
        resource.setrlimit(resource.RLIMIT_NICE, (_NICE_ZERO_ALLOWED, _NICE_ZERO_ALLOWED))
    except (ValueError, OSError):
        return False
    return True
