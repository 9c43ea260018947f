"""An in-memory sandbox for fast tests of the routes, services and CLI.

It runs nothing: a handler turns each :class:`RunSpec` into a :class:`Result`. The default
handler answers like a tiny, honest machine: ``print(X)`` of a literal prints it, ``echo X``
echoes, ``exit N`` / ``sys.exit(N)`` exit, ``cat`` echoes stdin; anything else prints nothing.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path

from nox_api.engine.base import BackendInfo, Limits, Result, RunSpec, SandboxUnavailable
from noxsdk.models import ExecutionStatus

__all__ = ["FakeSandbox"]

_EXIT = re.compile(r"^\s*(?:exit|sys\.exit\()\s*(\d+)\)?\s*$")


def _default_handler(spec: RunSpec) -> Result:
    out = b""
    code = 0
    for line in spec.source.splitlines():
        if m := _EXIT.match(line):
            code = int(m.group(1))
            break
        stripped = line.strip()
        if spec.kind == "python" and stripped.startswith("print(") and stripped.endswith(")"):
            try:
                value = ast.literal_eval(stripped[6:-1])
            except (ValueError, SyntaxError):
                value = ""
            out += f"{value}\n".encode()
        elif spec.kind == "shell" and stripped.startswith("echo "):
            out += stripped[5:].encode() + b"\n"
        elif stripped == "cat":
            out += spec.stdin
    return Result(
        status=ExecutionStatus.OK if code == 0 else ExecutionStatus.ERROR,
        exit_code=code,
        stdout=out,
        stderr=b"",
        stdout_truncated=False,
        stderr_truncated=False,
        duration_ms=0.1,
        cpu_ms=0.1,
    )


class FakeSandbox:
    name = "fake"
    isolation = "fake"

    def __init__(
        self,
        handler: Callable[[RunSpec], Result] = _default_handler,
        unavailable: str | None = None,
    ) -> None:
        self.handler = handler
        self.unavailable = unavailable
        self.runs: list[RunSpec] = []
        self.flushes = 0  # how many times the (absent) warm pool was thrown away

    def info(self) -> BackendInfo:
        return BackendInfo(
            name=self.name,
            isolation=self.isolation,
            limits_by={},
            available=self.unavailable is None,
            reason=self.unavailable,
        )

    def run(self, spec: RunSpec) -> Result:
        if self.unavailable is not None:
            raise SandboxUnavailable(self.unavailable)
        self.runs.append(spec)
        return self.handler(spec)

    def prewarm(self, workspace: Path) -> None:
        return None

    def prepare_workspace(self, workspace: Path) -> None:
        return None

    def flush(self) -> None:
        self.flushes += 1

    def set_ceiling(self, ceiling: Limits) -> None:
        self.ceiling = ceiling

    def close(self) -> None:
        return None

    def probe(self) -> str | None:
        return self.unavailable
