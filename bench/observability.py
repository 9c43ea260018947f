"""What metrics and the access log cost per request, and how fast ``GET /metrics`` answers.

Run from the repository root: ``.venv/bin/python bench/observability.py`` (``bench/run.py``
runs it too). The per-request cost is measured like the multi-user cost (``overhead.py``): one
in-process server on the fake sandbox, one client process, ``/run_py`` requests in interleaved
blocks with the observability on and off. "Off" empties the run and audit observers and makes
the HTTP metrics middleware (which also writes the access line) a plain pass-through.
``/metrics`` is timed from loopback against a database of 10,000 history rows and 50 workspaces'
storage rows.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx2
from starlette.types import Receive, Scope, Send

from inprocess import serving
from nox_api.config import Settings
from nox_api.observability.metrics import MetricsMiddleware
from nox_api.services.tokens import Role
from nox_api.storage.db import Database
from nox_api.storage.models import ExecutionRow, WorkspaceStorageRow
from overhead import _drive

HISTORY_ROWS = 10_000
WORKSPACES = 50


async def _through(self: MetricsMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
    await self.app(scope, receive, send)


def _switcher(app: Any) -> Callable[[bool], None]:
    nox = app.state.nox
    runs, audits = list(nox.executions.observers), list(nox.auditor.observers)
    counting = MetricsMiddleware.__call__

    def switch(enabled: bool) -> None:
        nox.executions.observers[:] = runs if enabled else []
        nox.auditor.observers[:] = audits if enabled else []
        MetricsMiddleware.__call__ = counting if enabled else _through  # type: ignore[method-assign]

    return switch


def measure_cost(requests: int) -> tuple[float, float]:
    """(p50 ms with metrics and access log, p50 ms without) of /run_py."""
    with serving(Role.RUNNER, prefix="nox-bench-obs-") as served:
        on, off = _drive(served.url, served.token, _switcher(served.app), requests)
    return statistics.median(on), statistics.median(off)


def _fill(settings: Settings) -> None:
    db = Database(settings.sqlalchemy_url)
    now = datetime.now(UTC)
    try:
        with db.session() as session:
            session.add_all(
                ExecutionRow(
                    id=secrets.token_hex(8),
                    kind="python",
                    status="ok",
                    exit_code=0,
                    stdout="1\n",
                    stderr="",
                    stdout_truncated=False,
                    stderr_truncated=False,
                    duration_ms=1.0,
                    cpu_ms=1.0,
                    started_at=now,
                    workspace=f"ws{n % WORKSPACES:02d}",
                    actor="bench",
                    code="print(1)",
                )
                for n in range(HISTORY_ROWS)
            )
            session.add_all(
                WorkspaceStorageRow(workspace=f"ws{n:02d}", files=n, bytes=n * 1000, scanned_at=now)
                for n in range(WORKSPACES)
            )
    finally:
        db.close()


def measure_scrape(calls: int) -> tuple[float, float, int]:
    """(p50 ms, p95 ms, answer bytes) of GET /metrics."""
    with serving(Role.ADMIN, prepare=_fill, prefix="nox-bench-scrape-") as served:
        served.app.state.nox.stats.scanner.close()  # keep the 50 storage rows as written
        times: list[float] = []
        size = 0
        with httpx2.Client(base_url=served.url, trust_env=False, timeout=30) as client:
            for n in range(calls + 5):
                started = time.perf_counter()
                resp = client.get("/metrics")
                elapsed = (time.perf_counter() - started) * 1000.0
                if resp.status_code != 200 or b"nox_workspace_storage_bytes" not in resp.content:
                    raise RuntimeError(f"/metrics answered {resp.status_code}")
                size = len(resp.content)
                if n >= 5:  # the first scrapes run the health's sandbox probe and warm caches
                    times.append(elapsed)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1], size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="metrics and access-log cost; /metrics speed")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--scrapes", type=int, default=100)
    args = parser.parse_args(argv)
    on, off = measure_cost(args.requests)
    print(f"/run_py p50 with metrics and access log {on:.3f} ms, without {off:.3f} ms: "
          f"{on - off:+.3f} ms")  # fmt: skip
    p50, p95, size = measure_scrape(args.scrapes)
    print(f"/metrics with {HISTORY_ROWS} history rows, {WORKSPACES} workspaces: p50 {p50:.2f} ms, "
          f"p95 {p95:.2f} ms, {size} bytes")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
