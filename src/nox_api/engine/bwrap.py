"""The default backend: bubblewrap namespaces + the seccomp filter + limits.

Flags as in DESIGN.md ("known-good", 29 of 29 escape checks blocked on this kind of machine).
When the server runs as root, bwrap is started through ``setpriv`` as an unprivileged host user:
launched by root, the sandbox's uid would map to host root, RLIMIT_NPROC would not apply and files
would come out owned by root.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from nox_api.engine.base import MIB, Limits, SandboxUnavailable
from nox_api.engine.image import Bootstrap
from nox_api.engine.process import bootstrap_source
from nox_api.engine.seccomp import SeccompUnavailable, compile_filter

__all__ = ["BwrapLauncher"]

_TOP_LEVEL_LINKS = ("bin", "lib", "lib32", "lib64", "libx32", "sbin")
_ETC_FILES = ("/etc/ld.so.cache", "/etc/alternatives", "/etc/localtime")


class BwrapLauncher:
    supports_stems = True
    uses_seccomp = True

    def __init__(
        self, *, bwrap: str, python: str, uid: int, gid: int, setpriv: str | None = None
    ) -> None:
        self.memory_by_rlimit = True
        self._bwrap = bwrap
        self._python = python
        self._uid = uid
        self._gid = gid
        self._setpriv = setpriv
        self._bootstrap = Bootstrap(python, bootstrap_source())
        self._static = self._static_args()

    @classmethod
    def create(cls, *, python: str, uid: int, gid: int) -> BwrapLauncher:
        """Find the tools; raise :class:`SandboxUnavailable` with the fix when one is missing."""
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise SandboxUnavailable(
                "bubblewrap is not installed: install it with `apt-get install bubblewrap` "
                "(or set NOX_SANDBOX_BACKEND=unsafe for development without isolation)"
            )
        try:
            compile_filter()
        except SeccompUnavailable as exc:
            raise SandboxUnavailable(str(exc)) from exc
        if not os.access(python, os.X_OK):
            raise SandboxUnavailable(
                f"the sandbox interpreter {python} does not exist or is not executable: "
                "set NOX_SANDBOX_PYTHON to a python3 readable by the sandbox user"
            )
        setpriv = None
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                raise SandboxUnavailable(
                    "the server runs as root and needs setpriv (package util-linux) to start "
                    "sandboxes as an unprivileged user"
                )
        return cls(bwrap=bwrap, python=python, uid=uid, gid=gid, setpriv=setpriv)

    def _static_args(self) -> list[str]:
        args = [
            "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534",
            "--disable-userns", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--clearenv", "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
            "--setenv", "LANG", "C.UTF-8", "--setenv", "HOME", "/tmp",
            "--ro-bind", "/usr", "/usr",
        ]  # fmt: skip
        for name in _TOP_LEVEL_LINKS:
            host = Path("/") / name
            if host.is_symlink():
                args += ["--symlink", os.readlink(host), f"/{name}"]
            elif host.is_dir():
                args += ["--ro-bind", str(host), f"/{name}"]
        for etc in _ETC_FILES:
            args += ["--ro-bind-try", etc, etc]
        prefix = Path(os.path.realpath(self._python)).parent.parent
        if not (prefix == Path("/usr") or prefix.is_relative_to("/usr")):
            args += ["--ro-bind", str(prefix), str(prefix)]  # an interpreter outside /usr
        return args

    def command(
        self, workspace: Path, bootstrap_fds: Sequence[int], seccomp_fd: int | None, limits: Limits
    ) -> list[str]:
        return [
            *self._head(seccomp_fd),
            *self.stem_args(workspace, limits),
            *self._tail(bootstrap_fds),
        ]

    def stem_command(
        self, bootstrap_fds: Sequence[int], seccomp_fd: int | None, args_fd: int
    ) -> list[str]:
        """The same sandbox, except that its workspace-dependent options (:meth:`stem_args`)
        come later, NUL-separated, through ``args_fd``: bwrap blocks reading them before it
        sets anything up. If that pipe closes empty, the sandbox starts with no workspace and
        no writable folder at all, and its bootstrap exits (its control pipe is closed too)."""
        return [*self._head(seccomp_fd), "--args", str(args_fd), *self._tail(bootstrap_fds)]

    def stem_args(self, workspace: Path, limits: Limits) -> list[str]:
        """The options that depend on the workspace and the limits, in the order bwrap applies
        them after the static ones (the root is remounted read-only last)."""
        return [
            "--size", str(limits.tmp_size_mib * MIB), "--tmpfs", "/tmp",
            "--bind", str(workspace), "/workspace", "--chdir", "/workspace",
            "--proc", "/proc", "--dev", "/dev",
            # bwrap's /dev is a writable tmpfs without a size: keep only /dev/shm writable
            # (multiprocessing needs it), capped like /tmp, and make the rest read-only.
            "--size", str(limits.tmp_size_mib * MIB), "--tmpfs", "/dev/shm",
            "--remount-ro", "/dev", "--remount-ro", "/",
        ]  # fmt: skip

    def _head(self, seccomp_fd: int | None) -> list[str]:
        argv: list[str] = []
        if self._setpriv is not None:
            argv += [
                self._setpriv, f"--reuid={self._uid}", f"--regid={self._gid}",
                "--clear-groups", "--inh-caps=-all",
            ]  # fmt: skip
        argv += [self._bwrap, *self._static]
        if seccomp_fd is not None:
            argv += ["--seccomp", str(seccomp_fd)]
        return argv

    def _tail(self, bootstrap_fds: Sequence[int]) -> list[str]:
        return ["--", self._python, *self._bootstrap.argv(), *map(str, bootstrap_fds)]

    @property
    def inherited_fds(self) -> tuple[int, ...]:
        return self._bootstrap.fds

    def close(self) -> None:
        self._bootstrap.close()

    def environment(self) -> dict[str, str]:
        return {}

    def prepare_workspace(self, workspace: Path) -> None:
        """As root: the workspace folder belongs to root and the sandbox group (mode 0770), so
        sandboxed code can fill it but cannot chmod it shut for the runs after it."""
        if os.geteuid() == 0:
            os.chown(workspace, 0, self._gid)
            workspace.chmod(0o770)
        else:
            workspace.chmod(0o700)

    def hint(self, detail: str) -> str:
        if "namespace" in detail or "Operation not permitted" in detail:
            return (
                ". User namespaces look unavailable: check `sysctl user.max_user_namespaces` "
                "(must be > 0) and, on Ubuntu 24.04+, "
                "`sysctl kernel.apparmor_restrict_unprivileged_userns=0` or an AppArmor profile "
                "for bwrap"
            )
        if "Permission denied" in detail or "No such file" in detail:
            return (
                f". The sandbox user (uid {self._uid}) must be able to reach the data folder and "
                f"the interpreter {self._python}: check the permissions of their parent folders"
            )
        return ""
