"""The ``unsafe`` backend: a plain subprocess with rlimits and no isolation at all.

Only for development on machines without user namespaces, and only when named explicitly
(``NOX_SANDBOX_BACKEND=unsafe``). The program runs as the server's user, sees the whole file
system and the network. The server logs a loud warning and the health check says
``isolation: none``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nox_api.engine.base import Limits
from nox_api.engine.image import Bootstrap
from nox_api.engine.process import bootstrap_source

__all__ = ["UNSAFE_WARNING", "UnsafeLauncher"]

UNSAFE_WARNING = (
    "NOX_SANDBOX_BACKEND=unsafe: code runs WITHOUT ANY ISOLATION as the server's user, with "
    "access to its files and the network. Never use this backend for code you do not trust."
)


class UnsafeLauncher:
    supports_stems = False
    uses_seccomp = False

    def __init__(self, *, python: str) -> None:
        self.memory_by_rlimit = True
        self._python = python
        self._bootstrap = Bootstrap(python, bootstrap_source())

    def command(
        self, workspace: Path, bootstrap_fds: Sequence[int], seccomp_fd: int | None, limits: Limits
    ) -> list[str]:
        # The bootstrap runs from the workspace: `cd` first, through the shell-free env tool.
        return ["/usr/bin/env", "-C", str(workspace), self._python, *self._bootstrap.argv(),
                *map(str, bootstrap_fds)]  # fmt: skip

    def stem_command(
        self, bootstrap_fds: Sequence[int], seccomp_fd: int | None, args_fd: int
    ) -> list[str]:
        raise NotImplementedError("no stems without cgroups: nothing slow to do ahead")

    def stem_args(self, workspace: Path, limits: Limits) -> list[str]:
        return []

    @property
    def inherited_fds(self) -> tuple[int, ...]:
        return self._bootstrap.fds

    def close(self) -> None:
        self._bootstrap.close()

    def environment(self) -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp"}

    def prepare_workspace(self, workspace: Path) -> None:
        workspace.chmod(0o700)

    def hint(self, detail: str) -> str:
        return ""
