"""Fan out many runs at once with the asyncio client, a few in flight at a time.

One ``AsyncNoxClient`` serves every concurrent call; a semaphore keeps the number in flight
below the server's rate limit and pool. Needs a runner token:

    NOX_URL=http://127.0.0.1:8080 NOX_API_TOKEN=... python examples/async_fan_out.py [RUNS]
"""

from __future__ import annotations

import asyncio
import sys
import time

from noxsdk import AsyncNoxClient, Execution

IN_FLIGHT = 8


async def square(nox: AsyncNoxClient, gate: asyncio.Semaphore, n: int) -> Execution:
    async with gate:
        return await nox.run_py(f"print({n} * {n})", timeout_s=10)


async def main(count: int) -> int:
    gate = asyncio.Semaphore(IN_FLIGHT)
    started = time.perf_counter()
    async with AsyncNoxClient() as nox:  # NOX_URL and NOX_API_TOKEN from the environment
        runs = await asyncio.gather(*(square(nox, gate, n) for n in range(count)))
    elapsed = time.perf_counter() - started
    failed = [run for run in runs if run.status != "ok"]
    total = sum(int(run.stdout) for run in runs if run.status == "ok")
    print(f"{count} runs in {elapsed:.2f} s, {len(failed)} failed, sum of squares {total}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)))
