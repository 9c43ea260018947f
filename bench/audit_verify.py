"""Micro-benchmark of the audit log (``nox_api.services.audit``).

``.venv/bin/python bench/audit_verify.py [--lines N] [--appends N]`` writes N realistic lines
(default 200,000; ``fsync=False``, rotated at the default 10 MiB) into a temp folder, times
``AuditLog.verify()`` (best of ``--repeat`` runs) and the p50 of single fsync'ed ``append()``
calls. ``measure`` and ``measure_append`` are for reuse by ``bench/run.py``. Target: verify at
least 100,000 lines/s.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

from nox_api.services.audit import (
    AuditEvent,
    AuditLog,
    MemoryCheckpointStore,
    load_or_create_key,
)

VERIFY_TARGET = 100_000  # lines per second


def _events() -> list[AuditEvent]:
    """A mix of the events the server logs, with realistic field sizes."""
    actor = {"actor_id": "3f9c2a1b", "actor_name": "ci-runner", "role": "runner"}
    where = {"workspace": "default", "client": "10.0.3.17"}
    events = []
    for i in range(64):
        request_id = hashlib.md5(str(i).encode(), usedforsecurity=False).hexdigest()
        code_sha = hashlib.sha256(str(i).encode()).hexdigest()
        events += [
            AuditEvent(
                "run",
                "ok" if i % 9 else "failed",
                **actor,
                **where,
                target="run_py",
                request_id=request_id,
                details={"sha256": code_sha, "bytes": 120 + i, "exit_code": 0 if i % 9 else 1},
            ),
            AuditEvent(
                "file.upload",
                "ok",
                **actor,
                **where,
                target=f"data/input-{i}.csv",
                request_id=request_id,
                details={"bytes": 40_960 + i, "sha256": code_sha},
            ),
            AuditEvent(
                "auth.failure",
                "denied",
                client=f"203.0.113.{i}",
                request_id=request_id,
                details={"reason": "unknown token"},
            ),
            AuditEvent(
                "token.create",
                "ok",
                actor_id="env",
                actor_name="admin",
                role="admin",
                **where,
                target=f"tok{i:04d}",
                request_id=request_id,
                details={"name": f"runner-{i}", "role": "runner", "expires_days": 30},
            ),
        ]
    return events


def _fill(log: AuditLog, lines: int) -> None:
    events = _events()
    for i in range(lines):
        log.append(events[i % len(events)])


def measure(lines: int, repeat: int = 3) -> float:
    """Lines per second of ``AuditLog.verify()`` over a log of ``lines`` lines (best run)."""
    with tempfile.TemporaryDirectory(prefix="nox-audit-bench-") as tmp:
        folder = Path(tmp)
        key = load_or_create_key(folder, None)
        log = AuditLog(folder / "audit", key, MemoryCheckpointStore(), fsync=False)
        with log:
            _fill(log, lines)
            best = float("inf")
            for _ in range(max(1, repeat)):
                start = time.perf_counter()
                report = log.verify()
                best = min(best, time.perf_counter() - start)
                if not report.ok or report.entries != lines:
                    raise RuntimeError(f"verify failed on a fresh log: {report}")
    return lines / best


def measure_append(n: int) -> float:
    """p50 in microseconds of one fsync'ed ``append()`` (checkpoint in memory), over ``n``."""
    events = _events()
    with tempfile.TemporaryDirectory(prefix="nox-audit-bench-") as tmp:
        folder = Path(tmp)
        log = AuditLog(folder, load_or_create_key(folder, None), MemoryCheckpointStore())
        with log:
            log.append(events[0])  # opens the files
            costs = []
            for i in range(n):
                event = events[i % len(events)]
                start = time.perf_counter()
                log.append(event)
                costs.append(time.perf_counter() - start)
    return statistics.median(costs) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000, help="lines to verify")
    parser.add_argument("--appends", type=int, default=1_000, help="fsync'ed appends to time")
    parser.add_argument("--repeat", type=int, default=3, help="verify runs (best is kept)")
    args = parser.parse_args(argv)
    rate = measure(args.lines, args.repeat)
    print(f"audit verify: {args.lines} lines in {args.lines / rate:.3f} s = {rate:,.0f} lines/s")
    p50 = measure_append(args.appends)
    print(f"audit append (fsync): p50 {p50:.0f} us over {args.appends} appends")
    if rate < VERIFY_TARGET:
        print(f"below the target of {VERIFY_TARGET:,} lines/s")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
