"""What auth, policy, rate limiting, quotas and the audit log cost a ``/run_py`` request.

The same app (fake sandbox: the run itself costs nothing; uvicorn on 127.0.0.1 in this
process, a keep-alive client) answers ``/run_py``
``print(1)`` with everything on, then with the caller's dependency overridden (no token lookup,
no rate limit), the quota check and the audit log turned into no-ops. Blocks of requests
alternate between the two so that drift hits both alike. The difference of the p50s is the
cost; the target is at most 1 ms.

    .venv/bin/python bench/overhead.py [--requests N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import typing
from collections.abc import Callable
from typing import Any

import httpx2

from inprocess import serving
from nox_api import deps
from nox_api.services.auditing import Caller
from nox_api.services.tokens import Principal, Role

BLOCK = 100


def _switcher(app: Any) -> Callable[[bool], None]:
    nox = app.state.nox
    runner_dep = typing.get_args(deps.Runner)[1].dependency
    principal = Principal("bench", "bench", Role.RUNNER, "default")
    record, check_run = nox.auditor.record, nox.quotas.check_run

    def switch(enabled: bool) -> None:
        if enabled:
            app.dependency_overrides.clear()
            nox.auditor.record, nox.quotas.check_run = record, check_run
        else:
            app.dependency_overrides[runner_dep] = lambda: Caller(principal, "127.0.0.1")
            nox.auditor.record = lambda *a, **k: None
            nox.quotas.check_run = lambda *a, **k: None

    return switch


def _drive(base_url: str, token: str, switch: Callable[[bool], None], requests: int
           ) -> tuple[list[float], list[float]]:  # fmt: skip
    on: list[float] = []
    off: list[float] = []
    headers = {"Authorization": f"Bearer {token}"}
    with httpx2.Client(base_url=base_url, headers=headers) as client:

        def once() -> float:
            started = time.perf_counter()
            resp = client.post("/run_py", json={"code": "print(1)"})
            elapsed = time.perf_counter() - started
            if resp.status_code != 200:
                raise RuntimeError(f"/run_py answered {resp.status_code}: {resp.text[:200]}")
            return elapsed * 1000.0

        for enabled in (True, False, True, False):  # warm-up, both ways
            switch(enabled)
            for _ in range(BLOCK // 2):
                once()
        done = 0
        while done < requests:
            for enabled, into in ((True, on), (False, off)):
                switch(enabled)
                into.extend([once() for _ in range(BLOCK)])
            done += BLOCK
        switch(True)
    return on, off


def measure(requests: int = 2000) -> tuple[float, float]:
    """(p50 ms with everything on, p50 ms with it off) over ``requests`` each, over HTTP from
    a uvicorn server on 127.0.0.1 in this process."""
    with serving(Role.RUNNER, prefix="nox-bench-overhead-") as served:
        on, off = _drive(served.url, served.token, _switcher(served.app), requests)
    return statistics.median(on), statistics.median(off)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="auth + policy + rate limit + audit overhead")
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args(argv)
    on, off = measure(args.requests)
    print(f"/run_py p50 with auth+policy+rate limit+quota+audit {on:.3f} ms, without {off:.3f} ms")
    print(f"overhead {on - off:.3f} ms (target <= 1 ms)")
    return 0 if on - off <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
