"""Nox SDK: wire models shared by the Nox server, this SDK and ``noxctl``."""

from noxsdk._version import __version__
from noxsdk.models import (
    EffectiveLimits,
    ErrorBody,
    ErrorEnvelope,
    Execution,
    ExecutionDetail,
    ExecutionKind,
    ExecutionStatus,
    FileInfo,
    Health,
    RunPython,
    RunShell,
)

__all__ = [
    "EffectiveLimits",
    "ErrorBody",
    "ErrorEnvelope",
    "Execution",
    "ExecutionDetail",
    "ExecutionKind",
    "ExecutionStatus",
    "FileInfo",
    "Health",
    "RunPython",
    "RunShell",
    "__version__",
]
