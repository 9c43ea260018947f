"""What auth, policy, rate limiting, quotas and the audit log cost a ``/run_py`` request.

The same app (fake sandbox: the run itself costs nothing; uvicorn on 127.0.0.1 in this
process; a keep-alive client in a child process, so that it does not share the server's
interpreter lock) answers ``/run_py``
``print(1)`` with everything on, then with the caller's dependency overridden (no token lookup,
no rate limit), the quota check and the audit log turned into no-ops. Blocks of requests
alternate between the two so that drift hits both alike. The difference of the p50s is the
cost; the target is at most 1 ms.

    .venv/bin/python bench/overhead.py [--requests N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
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
    quotas = nox.quotas
    saved = nox.auditor.record, quotas.reserve_run, quotas.count_run

    async def anyone() -> Caller:  # async like the real one: no worker-thread hop either way
        return Caller(principal, "127.0.0.1")

    def nothing(*_args: Any, **_kwargs: Any) -> None:
        return None

    def switch(enabled: bool) -> None:
        if enabled:
            app.dependency_overrides.clear()
            nox.auditor.record, quotas.reserve_run, quotas.count_run = saved
        else:
            app.dependency_overrides[runner_dep] = anyone
            nox.auditor.record = quotas.reserve_run = quotas.count_run = nothing

    return switch


def _client(base_url: str, token: str) -> int:
    """The child process: for each line ``N`` on stdin, send N requests and print their
    latencies (ms, comma-separated) on one line; stop at end of input."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx2.Client(base_url=base_url, headers=headers, trust_env=False) as client:
        for line in sys.stdin:
            times = []
            for _ in range(int(line)):
                started = time.perf_counter()
                resp = client.post("/run_py", json={"code": "print(1)"})
                elapsed = time.perf_counter() - started
                if resp.status_code != 200:
                    print(f"error /run_py answered {resp.status_code}", flush=True)
                    return 1
                times.append(f"{elapsed * 1000.0:.4f}")
            print(",".join(times), flush=True)
    return 0


def _drive(base_url: str, token: str, switch: Callable[[bool], None], requests: int
           ) -> tuple[list[float], list[float]]:  # fmt: skip
    on: list[float] = []
    off: list[float] = []
    child = subprocess.Popen(
        [sys.executable, __file__, "--client", base_url, token],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdin is not None
    assert child.stdout is not None

    def block(count: int) -> list[float]:
        child.stdin.write(f"{count}\n")
        child.stdin.flush()
        line = child.stdout.readline().strip()
        if not line or line.startswith("error"):
            raise RuntimeError(f"the client process failed: {line or 'no answer'}")
        return [float(v) for v in line.split(",")]

    try:
        for enabled in (True, False, True, False):  # warm-up, both ways
            switch(enabled)
            block(BLOCK // 2)
        done = 0
        order = ((True, on), (False, off))
        while done < requests:
            for enabled, into in order:  # on first, then off first: no order bias
                switch(enabled)
                into.extend(block(BLOCK))
            order = order[::-1]
            done += BLOCK
    finally:
        switch(True)
        child.stdin.close()
        child.wait(timeout=30)
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
    parser.add_argument("--client", nargs=2, metavar=("URL", "TOKEN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        return _client(*args.client)
    on, off = measure(args.requests)
    print(f"/run_py p50 with auth+policy+rate limit+quota+audit {on:.3f} ms, without {off:.3f} ms")
    print(f"overhead {on - off:.3f} ms (target <= 1 ms)")
    return 0 if on - off <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
