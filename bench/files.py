"""How long ``GET /api/files?recursive=true`` takes on a workspace of 10,000 files.

A workspace of ``files`` small files spread over ``folders`` folders is written straight to
disk; a uvicorn server on 127.0.0.1 in this process (fake sandbox: no run is involved) answers
the recursive listing ``calls`` times to a keep-alive client with a viewer token. The figure is
the p50 of those calls, whole answer received and parsed; the target is under 200 ms.

    .venv/bin/python bench/files.py [--files N] [--folders N] [--calls N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2

from inprocess import serving
from nox_api.config import Settings
from nox_api.services.tokens import Role

TARGET_MS = 200.0


@dataclass(frozen=True)
class Listing:
    p50_ms: float
    p95_ms: float
    entries: int
    answer_bytes: int


def _fill(workspace: Path, files: int, folders: int) -> None:
    for i in range(folders):
        (workspace / f"folder{i:03}").mkdir(parents=True)
    for i in range(files):
        (workspace / f"folder{i % folders:03}" / f"file{i:06}.txt").write_bytes(b"x" * (i % 97))


def measure(files: int = 10_000, folders: int = 10, calls: int = 15) -> Listing:
    """p50 and p95 (ms) of ``calls`` recursive listings of a workspace of ``files`` files in
    ``folders`` folders, over HTTP from a uvicorn server on 127.0.0.1 in this process."""

    def fill(settings: Settings) -> None:
        _fill(settings.workspaces_dir / "default", files, folders)

    with serving(Role.VIEWER, fill, prefix="nox-bench-files-") as served:
        return _drive(served.url, served.token, files + folders, calls)


def _drive(base_url: str, token: str, expected: int, calls: int) -> Listing:
    times: list[float] = []
    size = 0
    headers = {"Authorization": f"Bearer {token}"}
    with httpx2.Client(base_url=base_url, headers=headers, timeout=60) as client:
        for i in range(calls + 2):  # two to warm up
            started = time.perf_counter()
            resp = client.get("/api/files", params={"recursive": "true"})
            entries = len(resp.json()["entries"])
            elapsed = (time.perf_counter() - started) * 1000.0
            if resp.status_code != 200 or entries != expected:
                raise RuntimeError(f"the listing answered {resp.status_code}, {entries} entries")
            size = len(resp.content)
            if i >= 2:
                times.append(elapsed)
    times.sort()
    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    return Listing(statistics.median(times), p95, expected, size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="recursive listing of a large workspace")
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--folders", type=int, default=10)
    parser.add_argument("--calls", type=int, default=15)
    args = parser.parse_args(argv)
    result = measure(args.files, args.folders, args.calls)
    print(
        f"GET /api/files?recursive=true, {result.entries} entries ({result.answer_bytes} bytes): "
        f"p50 {result.p50_ms:.1f} ms, p95 {result.p95_ms:.1f} ms (target < {TARGET_MS:.0f} ms)"
    )
    return 0 if result.p50_ms < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
