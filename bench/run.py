"""Nox benchmark: end-to-end latency, throughput and server memory of real servers.

Run from the repository root with ``.venv/bin/python bench/run.py`` (``--quick`` for a smoke test).
It starts its own ``nox-api serve`` processes on free ports with fresh data folders under /tmp,
measures them over HTTP, stops them (also on an error or Ctrl-C), checks the performance targets,
writes the results section of ``docs/benchmarks.md`` and the raw figures to
``bench/results/latest.json``. Exit status: 0 all targets pass, 1 a target fails, 2 the benchmark
could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

import httpx2
import psutil

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "docs" / "benchmarks.md"
RESULTS_JSON = ROOT / "bench" / "results" / "latest.json"
SANDBOX_PYTHON = "/usr/bin/python3"
MIB = 1 << 20
SECTION_START = "<!-- nox-bench:start -->"
SECTION_END = "<!-- nox-bench:end -->"
BIG_PRINT_CODE = (
    "import sys\nb = b'x' * (1 << 20)\nfor _ in range({mib}):\n    sys.stdout.buffer.write(b)\n"
)
REQUEST_TIMEOUT_S = 30.0
SETTLE_S = 0.5  # pause after a warm-up so the warm pool is full again when measuring starts
# Between the requests of the "paced" cell: a client that reads an answer before it asks again
# (an agent, a person, a CI step), not a flood; the flood is measured by the other cells.
PACE_S = 0.02


class BenchError(Exception):
    """The benchmark cannot go on (a server would not start, the sandbox is broken, ...)."""


# -- what to run -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How many requests each part of the benchmark makes."""

    name: str
    warmup: int
    requests_c1: int
    requests_c4: int
    bare_runs: int
    rss_runs: int
    rss_batch: int
    big_print_mib: int
    overhead_requests: int
    audit_lines: int
    listing_calls: int
    backup_mib: int


FULL = Plan("full", warmup=20, requests_c1=200, requests_c4=400, bare_runs=200, rss_runs=1000,
            rss_batch=100, big_print_mib=1024, overhead_requests=2000,
            audit_lines=200_000, listing_calls=15, backup_mib=1024)  # fmt: skip
QUICK = Plan("quick", warmup=5, requests_c1=25, requests_c4=50, bare_runs=40, rss_runs=100,
             rss_batch=50, big_print_mib=1024, overhead_requests=300,
             audit_lines=50_000, listing_calls=5, backup_mib=256)  # fmt: skip
LISTING_FILES = 10_000


@dataclass(frozen=True)
class Security:
    """What multi-user Nox costs: auth, policy, rate limit, quota and audit per /run_py, and
    how fast the audit log verifies."""

    on_p50_ms: float
    off_p50_ms: float
    requests: int
    audit_lines: int
    verify_lines_per_s: float
    append_p50_us: float
    obs_on_p50_ms: float  # /run_py with metrics and the access log ...
    obs_off_p50_ms: float  # ... and without (bench/observability.py)
    scrape_p50_ms: float  # GET /metrics with 10,000 history rows and 50 workspaces
    scrape_p95_ms: float

    @property
    def overhead_ms(self) -> float:
        return self.on_p50_ms - self.off_p50_ms

    @property
    def obs_cost_ms(self) -> float:
        return self.obs_on_p50_ms - self.obs_off_p50_ms


def measure_security(plan: Plan) -> Security:
    import audit_verify
    import observability
    import overhead

    on, off = overhead.measure(plan.overhead_requests)
    obs_on, obs_off = observability.measure_cost(plan.overhead_requests)
    scrape_p50, scrape_p95, _size = observability.measure_scrape(plan.listing_calls * 6)
    return Security(
        on_p50_ms=on,
        off_p50_ms=off,
        requests=plan.overhead_requests,
        audit_lines=plan.audit_lines,
        verify_lines_per_s=audit_verify.measure(plan.audit_lines),
        append_p50_us=audit_verify.measure_append(1000),
        obs_on_p50_ms=obs_on,
        obs_off_p50_ms=obs_off,
        scrape_p50_ms=scrape_p50,
        scrape_p95_ms=scrape_p95,
    )


@dataclass(frozen=True)
class Operations:
    """Files and backups: a recursive listing of 10,000 files, backup and restore speed."""

    listing_files: int
    listing_p50_ms: float
    listing_p95_ms: float
    listing_answer_bytes: int
    backup_mib: int
    backup_files: int
    backup_mb_s: float
    restore_mb_s: float  # the whole restore, the automatic pre-restore backup included
    restore_unpack_mb_s: float  # unpacking, checking (beside the pre-restore backup), swapping
    backup_ratio: float  # backup file size / data size


def measure_operations(plan: Plan) -> Operations:
    import backup
    import files

    listing = files.measure(files=LISTING_FILES, folders=10, calls=plan.listing_calls)
    print(f"  listing of {listing.entries} entries: p50 {listing.p50_ms:.1f} ms, "
          f"p95 {listing.p95_ms:.1f} ms", file=sys.stderr)  # fmt: skip
    fig = backup.measure(total_mib=plan.backup_mib)
    print(f"  backup {fig.backup_mb_s:.0f} MB/s, restore {fig.restore_mb_s:.0f} MB/s "
          f"(own part {fig.restore_unpack_mb_s:.0f} MB/s)", file=sys.stderr)  # fmt: skip
    return Operations(
        listing_files=LISTING_FILES,
        listing_p50_ms=listing.p50_ms,
        listing_p95_ms=listing.p95_ms,
        listing_answer_bytes=listing.answer_bytes,
        backup_mib=plan.backup_mib,
        backup_files=fig.files,
        backup_mb_s=fig.backup_mb_s,
        restore_mb_s=fig.restore_mb_s,
        restore_unpack_mb_s=fig.restore_unpack_mb_s,
        backup_ratio=fig.backup_bytes / fig.data_bytes,
    )


@dataclass(frozen=True)
class Workload:
    route: str
    body: Mapping[str, Any]
    expected_stdout: str


PY = Workload("/run_py", {"code": "print(1)"}, "1\n")
SH = Workload("/run_sh", {"cmd": "echo hi"}, "hi\n")


# -- statistics ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stats:
    """Latency summary in milliseconds."""

    n: int
    mean_ms: float
    p50_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float


def percentile(ordered: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of sorted values, linear between the closest ranks."""
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(seconds: list[float]) -> Stats:
    return summarize_ms([s * 1000.0 for s in seconds])


def summarize_ms(values_ms: list[float]) -> Stats:
    ms = sorted(values_ms)
    if not ms:
        return Stats(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    return Stats(
        n=len(ms),
        mean_ms=sum(ms) / len(ms),
        p50_ms=percentile(ms, 50),
        p99_ms=percentile(ms, 99),
        min_ms=ms[0],
        max_ms=ms[-1],
    )


# -- a server under test ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _nox_api() -> str:
    beside = Path(sys.executable).parent / "nox-api"
    if beside.exists():
        return str(beside)
    found = shutil.which("nox-api")
    if found is None:
        raise BenchError("nox-api is not installed in this environment (pip install -e .)")
    return found


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds of the server process and of its reaped children (the sandboxes)."""

    server_s: float
    children_s: float


class Server:
    """A ``nox-api serve`` subprocess with its own data folder, port and admin token."""

    def __init__(self, name: str, settings: Mapping[str, str]) -> None:
        self.name = name
        self.settings = dict(settings)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"nox-bench-{name}-", dir="/tmp"))
        self.data_dir.chmod(0o711)  # the sandbox user (uid 65534) must reach the workspaces
        self.log_path = self.data_dir / "server.log"
        self.token = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._ps: psutil.Process | None = None
        self._keep_data = False

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOX_")}
        env.update(
            NOX_HOST="127.0.0.1",
            NOX_PORT=str(self.port),
            NOX_DATA_DIR=str(self.data_dir),
            NOX_SANDBOX_PYTHON=SANDBOX_PYTHON,
        )
        env.update(self.settings)
        return env

    def start(self, timeout_s: float = 60.0) -> None:
        nox_api = _nox_api()
        env = self._env()
        made = subprocess.run(
            [nox_api, "token", "create", "--role", "admin", "--name", "bench"],
            env=env, capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        lines = made.stdout.strip().splitlines()
        if made.returncode != 0 or not lines:
            self._keep_data = True
            raise BenchError(f"{self.name}: `nox-api token create` failed: {made.stderr.strip()}")
        self.token = lines[-1].strip()
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [nox_api, "serve"],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=ROOT,
            )  # fmt: skip
        self._ps = psutil.Process(self._proc.pid)
        self._wait_healthy(timeout_s)

    def _wait_healthy(self, timeout_s: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        with httpx2.Client(base_url=self.url, timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    self._keep_data = True
                    raise BenchError(
                        f"{self.name}: the server exited with {self._proc.returncode} at start; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx2.TransportError):
                    if client.get("/health").status_code == 200:
                        return
                time.sleep(0.1)
        self._keep_data = True
        raise BenchError(f"{self.name}: no healthy answer within {timeout_s:g} s ({self.log_path})")

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def client(self, timeout_s: float = REQUEST_TIMEOUT_S) -> httpx2.Client:
        return httpx2.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=timeout_s,
            trust_env=False,
        )

    def rss_bytes(self) -> int:
        assert self._ps is not None
        rss: int = self._ps.memory_info().rss
        return rss

    def cpu(self) -> CpuSample:
        assert self._ps is not None
        t = self._ps.cpu_times()
        return CpuSample(t.user + t.system, t.children_user + t.children_system)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully and closes the pool
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        if self._keep_data:
            print(f"  (kept {self.data_dir} for inspection)", file=sys.stderr)
        else:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            self._keep_data = True
        self.stop()


# -- driving load ----------------------------------------------------------------------------
def check_answer(response: httpx2.Response, work: Workload) -> tuple[str | None, float | None]:
    """(None, the server's ``duration_ms``) when the answer is right, else a short description
    of what was wrong."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}", None
    try:
        data = response.json()
    except ValueError:
        return "answer is not JSON", None
    if data.get("status") != "ok":
        return f"run status {data.get('status')!r}", None
    if data.get("stdout") != work.expected_stdout:
        return "wrong stdout", None
    duration = data.get("duration_ms")
    return None, float(duration) if isinstance(duration, int | float) else None


@dataclass
class Batch:
    """What one burst of requests produced."""

    latencies_s: list[float] = field(default_factory=list)
    run_ms: list[float] = field(default_factory=list)  # the server's duration_ms of each run
    failures: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    def merge(self, other: Batch) -> None:
        self.latencies_s += other.latencies_s
        self.run_ms += other.run_ms
        self.failures.update(other.failures)
        for kind, text in other.examples.items():
            self.examples.setdefault(kind, text)
        self.wall_s += other.wall_s


def drive(
    server: Server, work: Workload, concurrency: int, requests: int, pace_s: float = 0.0
) -> Batch:
    """Send ``requests`` requests from ``concurrency`` threads, each with its own keep-alive
    client whose connection is opened before the clock starts; each worker waits ``pace_s``
    after an answer before its next request (not timed)."""
    lock = threading.Lock()
    issued = 0
    per_worker = [Batch() for _ in range(concurrency)]
    ready = threading.Barrier(concurrency + 1)

    def next_ticket() -> bool:
        nonlocal issued
        with lock:
            if issued >= requests:
                return False
            issued += 1
            return True

    def worker(mine: Batch) -> None:
        with server.client() as client:
            try:
                client.get("/health")  # open the connection outside the measurement
            finally:
                ready.wait()
            while next_ticket():
                began = time.perf_counter()
                try:
                    response = client.post(work.route, json=work.body)
                    problem, run_ms = check_answer(response, work)
                    detail = response.text[:300]
                except httpx2.HTTPError as exc:
                    problem, detail, run_ms = type(exc).__name__, str(exc)[:300], None
                elapsed = time.perf_counter() - began
                if problem is None:
                    mine.latencies_s.append(elapsed)
                    if run_ms is not None:
                        mine.run_ms.append(run_ms)
                else:
                    mine.failures[problem] += 1
                    mine.examples.setdefault(problem, detail)
                if pace_s:
                    time.sleep(pace_s)

    threads = [
        threading.Thread(target=worker, args=(b,), name=f"bench-{i}", daemon=True)
        for i, b in enumerate(per_worker)
    ]
    for thread in threads:
        thread.start()
    ready.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    total = Batch(wall_s=time.perf_counter() - began)
    for batch in per_worker:
        total.merge(batch)  # the workers' wall_s are 0: the total keeps the measured one
    return total


# -- the measurements ------------------------------------------------------------------------
@dataclass
class Cell:
    """One latency cell: a server, a route, a concurrency."""

    server: str
    route: str
    concurrency: int
    pace_ms: float  # pause between one worker's requests (0: back to back)
    requests: int
    ok: int
    failed: int
    failures: dict[str, str]
    latency: Stats
    server_duration: Stats  # the answers' duration_ms: the run itself, as the server timed it
    wall_s: float
    runs_per_s: float
    server_cpu_ms_per_run: float
    sandbox_cpu_ms_per_run: float
    client_cpu_ms_per_run: float


def measure_cell(  # noqa: PLR0917 - a cell is all of these
    server: Server,
    work: Workload,
    concurrency: int,
    requests: int,
    plan: Plan,
    pace_s: float = 0.0,
) -> Cell:
    drive(server, work, concurrency, plan.warmup, pace_s)
    time.sleep(SETTLE_S)
    cpu_before, client_before = server.cpu(), time.process_time()
    batch = drive(server, work, concurrency, requests, pace_s)
    cpu_after, client_after = server.cpu(), time.process_time()
    done = max(requests, 1)
    cell = Cell(
        server=server.name,
        route=work.route,
        concurrency=concurrency,
        pace_ms=pace_s * 1000,
        requests=requests,
        ok=batch.ok,
        failed=sum(batch.failures.values()),
        failures={f"{k} x{n}": batch.examples[k] for k, n in batch.failures.items()},
        latency=summarize(batch.latencies_s),
        server_duration=summarize_ms(batch.run_ms),
        wall_s=batch.wall_s,
        runs_per_s=batch.ok / batch.wall_s if batch.wall_s > 0 else 0.0,
        server_cpu_ms_per_run=(cpu_after.server_s - cpu_before.server_s) * 1000 / done,
        sandbox_cpu_ms_per_run=(cpu_after.children_s - cpu_before.children_s) * 1000 / done,
        client_cpu_ms_per_run=(client_after - client_before) * 1000 / done,
    )
    lat = cell.latency
    print(
        f"  {server.name:>4} {work.route} c={concurrency}{_paced(cell)}: n={requests} "
        f"failed={cell.failed} "
        f"mean {lat.mean_ms:.2f} p50 {lat.p50_ms:.2f} p99 {lat.p99_ms:.2f} ms "
        f"(duration_ms p50 {cell.server_duration.p50_ms:.2f}), {cell.runs_per_s:.1f} runs/s, "
        f"server CPU {cell.server_cpu_ms_per_run:.2f} ms/run, "
        f"sandbox CPU {cell.sandbox_cpu_ms_per_run:.2f} ms/run",
        file=sys.stderr,
    )
    return cell


def measure_bare(runs: int, warmup: int) -> Stats:
    """The yardstick: start the sandbox's interpreter bare, without any sandbox or server."""
    argv = [SANDBOX_PYTHON, "-I", "-S", "-c", "print(1)"]
    times: list[float] = []
    for i in range(warmup + runs):
        began = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, check=False)
        elapsed = time.perf_counter() - began
        if done.returncode != 0 or done.stdout != b"1\n":
            raise BenchError(f"{SANDBOX_PYTHON} -I -S -c 'print(1)' failed: {done.stderr!r}")
        if i >= warmup:
            times.append(elapsed)
    stats = summarize(times)
    print(
        f"  bare {SANDBOX_PYTHON}: mean {stats.mean_ms:.2f} p50 {stats.p50_ms:.2f} "
        f"p99 {stats.p99_ms:.2f} ms",
        file=sys.stderr,
    )
    return stats


@dataclass
class RssRuns:
    """Server RSS over many warm runs."""

    runs: int
    ok: int
    failed: int
    before_mib: float
    after_mib: float
    growth_mib: float
    samples_mib: list[float]
    latency: Stats


def measure_rss_runs(server: Server, plan: Plan) -> RssRuns:
    time.sleep(SETTLE_S)
    before = server.rss_bytes()
    total = Batch()
    samples: list[float] = []
    left = plan.rss_runs
    while left > 0:
        size = min(plan.rss_batch, left)
        total.merge(drive(server, PY, 4, size))
        samples.append(server.rss_bytes() / MIB)
        left -= size
    time.sleep(SETTLE_S)
    after = server.rss_bytes()
    result = RssRuns(
        runs=plan.rss_runs,
        ok=total.ok,
        failed=sum(total.failures.values()),
        before_mib=before / MIB,
        after_mib=after / MIB,
        growth_mib=(after - before) / MIB,
        samples_mib=[round(s, 2) for s in samples],
        latency=summarize(total.latencies_s),
    )
    print(
        f"  RSS over {plan.rss_runs} warm runs: {result.before_mib:.1f} -> "
        f"{result.after_mib:.1f} MiB ({result.growth_mib:+.2f}), failed={result.failed}",
        file=sys.stderr,
    )
    return result


@dataclass
class BigPrint:
    """Server RSS around one run that prints a lot."""

    printed_mib: int
    http_status: int | None
    run_status: str | None
    error: str | None
    client_s: float
    server_duration_ms: float | None
    stdout_chars: int
    stdout_truncated: bool | None
    before_mib: float
    peak_mib: float
    after_mib: float
    growth_mib: float


def measure_big_print(server: Server, plan: Plan) -> BigPrint:
    drive(server, PY, 1, plan.warmup)  # load what the first requests load, then measure
    time.sleep(SETTLE_S)
    before = server.rss_bytes()
    peak = before
    done = threading.Event()

    def sample_peak() -> None:
        nonlocal peak
        while not done.wait(0.02):
            with contextlib.suppress(psutil.Error):
                peak = max(peak, server.rss_bytes())

    sampler = threading.Thread(target=sample_peak, name="bench-rss", daemon=True)
    sampler.start()
    body = {"code": BIG_PRINT_CODE.format(mib=plan.big_print_mib), "timeout_s": 60}
    http_status = None
    data: dict[str, Any] = {}
    error = None
    began = time.perf_counter()
    try:
        with server.client(timeout_s=180.0) as client:
            response = client.post("/run_py", json=body)
        http_status = response.status_code
        data = response.json()
    except (httpx2.HTTPError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    client_s = time.perf_counter() - began
    done.set()
    sampler.join()
    time.sleep(SETTLE_S)
    after = server.rss_bytes()
    result = BigPrint(
        printed_mib=plan.big_print_mib,
        http_status=http_status,
        run_status=data.get("status"),
        error=error or (data.get("error", {}).get("message") if "error" in data else None),
        client_s=client_s,
        server_duration_ms=data.get("duration_ms"),
        stdout_chars=len(data.get("stdout") or ""),
        stdout_truncated=data.get("stdout_truncated"),
        before_mib=before / MIB,
        peak_mib=max(peak, after) / MIB,
        after_mib=after / MIB,
        growth_mib=(after - before) / MIB,
    )
    print(
        f"  print {plan.big_print_mib} MiB: HTTP {http_status} status {result.run_status} in "
        f"{client_s:.2f} s; RSS {result.before_mib:.1f} -> {result.after_mib:.1f} MiB "
        f"(peak {result.peak_mib:.1f})",
        file=sys.stderr,
    )
    return result


# -- targets ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    limit: str
    passed: bool


def _paced(cell: Cell) -> str:
    return f", paced {cell.pace_ms:g} ms" if cell.pace_ms else ""


def _cell(
    cells: list[Cell], server: str, route: str, concurrency: int, *, paced: bool = False
) -> Cell:
    for cell in cells:
        if (cell.server, cell.route, cell.concurrency, bool(cell.pace_ms)) == (
            server,
            route,
            concurrency,
            paced,
        ):
            return cell
    raise KeyError((server, route, concurrency, paced))


def evaluate(  # noqa: PLR0917 - one argument per part of the run
    cells: list[Cell], bare: Stats, rss: RssRuns, big: BigPrint, sec: Security, ops: Operations
) -> list[Target]:
    flood1 = _cell(cells, "warm", PY.route, 1)
    warm1 = _cell(cells, "warm", PY.route, 1, paced=True)
    cold1 = _cell(cells, "cold", PY.route, 1)
    warm4 = _cell(cells, "warm", PY.route, 4)
    big_ok = big.http_status == 200
    return [
        Target(
            f"warm /run_py print(1) p50 <= 1.0x bare interpreter p50 (c=1{_paced(warm1)})",
            f"{warm1.latency.p50_ms:.2f} ms = {warm1.latency.p50_ms / bare.p50_ms:.2f}x "
            f"({bare.p50_ms:.2f} ms bare; back to back: {flood1.latency.p50_ms:.2f} ms = "
            f"{flood1.latency.p50_ms / bare.p50_ms:.2f}x)",
            f"<= {bare.p50_ms:.2f} ms",
            warm1.failed == 0 and warm1.latency.p50_ms <= 1.0 * bare.p50_ms,
        ),
        Target(
            "cold /run_py print(1) p50 <= 2.5x bare interpreter p50",
            f"{cold1.latency.p50_ms:.2f} ms = {cold1.latency.p50_ms / bare.p50_ms:.2f}x",
            f"<= {2.5 * bare.p50_ms:.2f} ms",
            cold1.failed == 0 and cold1.latency.p50_ms <= 2.5 * bare.p50_ms,
        ),
        Target(
            f"warm /run_py print(1) p99 <= 3x its p50 (c=1{_paced(warm1)})",
            f"{warm1.latency.p99_ms:.2f} ms = {warm1.latency.p99_ms / warm1.latency.p50_ms:.2f}x "
            f"(back to back: {flood1.latency.p99_ms / flood1.latency.p50_ms:.2f}x)",
            f"<= {3 * warm1.latency.p50_ms:.2f} ms",
            warm1.failed == 0 and warm1.latency.p99_ms <= 3 * warm1.latency.p50_ms,
        ),
        Target(
            "warm /run_py throughput at concurrency 4 >= 40 runs/s",
            f"{warm4.runs_per_s:.1f} runs/s",
            ">= 40 runs/s",
            warm4.failed == 0 and warm4.runs_per_s >= 40,
        ),
        Target(
            f"server RSS growth < 20 MiB over {rss.runs} warm runs",
            f"{rss.growth_mib:+.2f} MiB",
            "< 20 MiB",
            rss.failed == 0 and rss.growth_mib < 20,
        ),
        Target(
            f"server RSS growth < 20 MiB over one {big.printed_mib} MiB print",
            f"{big.growth_mib:+.2f} MiB (peak {big.peak_mib - big.before_mib:+.1f}); "
            f"HTTP {big.http_status}, status {big.run_status}",
            "< 20 MiB, HTTP 200",
            big_ok and big.growth_mib < 20,
        ),
        Target(
            "auth + policy + rate limit + quota + audit add <= 1 ms p50 to /run_py",
            f"{sec.overhead_ms:.3f} ms ({sec.on_p50_ms:.3f} on, {sec.off_p50_ms:.3f} off)",
            "<= 1 ms",
            sec.overhead_ms <= 1.0,
        ),
        Target(
            "metrics and access log add <= 0.3 ms p50 to /run_py",
            f"{sec.obs_cost_ms:+.3f} ms ({sec.obs_on_p50_ms:.3f} on, {sec.obs_off_p50_ms:.3f} off)",
            "<= 0.3 ms",
            sec.obs_cost_ms <= 0.3,
        ),
        Target(
            "GET /metrics p50 < 20 ms with 10,000 history rows and 50 workspaces",
            f"{sec.scrape_p50_ms:.2f} ms (p95 {sec.scrape_p95_ms:.2f} ms)",
            "< 20 ms",
            sec.scrape_p50_ms < 20,
        ),
        Target(
            "audit verify reads >= 100,000 lines/s",
            f"{sec.verify_lines_per_s:,.0f} lines/s over {sec.audit_lines:,} lines",
            ">= 100,000 lines/s",
            sec.verify_lines_per_s >= 100_000,
        ),
        Target(
            f"recursive listing of {ops.listing_files:,} files p50 < 200 ms",
            f"{ops.listing_p50_ms:.1f} ms (p95 {ops.listing_p95_ms:.1f} ms)",
            "< 200 ms",
            ops.listing_p50_ms < 200,
        ),
        Target(
            f"backup of {ops.backup_mib} MiB of workspace data >= 100 MB/s",
            f"{ops.backup_mb_s:.0f} MB/s",
            ">= 100 MB/s",
            ops.backup_mb_s >= 100,
        ),
        Target(
            f"restore of {ops.backup_mib} MiB of workspace data >= 100 MB/s (whole restore, "
            "its automatic pre-restore backup included)",
            f"{ops.restore_mb_s:.0f} MB/s (unpack, check and swap, beside the pre-restore "
            "backup: "
            f"{ops.restore_unpack_mb_s:.0f} MB/s)",
            ">= 100 MB/s",
            ops.restore_mb_s >= 100,
        ),
    ]


# -- the environment -------------------------------------------------------------------------
def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _command_line() -> str:
    exe = Path(sys.executable)
    shown = str(exe.relative_to(ROOT)) if exe.is_relative_to(ROOT) else str(exe)
    script = Path(sys.argv[0]).resolve()
    script_shown = str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else str(script)
    return shlex.join([shown, script_shown, *sys.argv[1:]])


def machine_info() -> dict[str, str]:
    uname = platform.uname()
    git = _first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    return {
        "os": f"{uname.system} {uname.release} {uname.machine}",
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": f"{psutil.virtual_memory().total / (1 << 30):.1f} GiB",
        "python_server": f"{platform.python_version()} ({sys.executable})",
        "python_sandbox": f"{_first_line([SANDBOX_PYTHON, '--version'])} ({SANDBOX_PYTHON})",
        "bwrap": _first_line(["bwrap", "--version"]),
        "nox_commit": git,
    }


# -- the report ------------------------------------------------------------------------------
def _f(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


@dataclass
class Report:
    """Everything one run measured, with where and how."""

    started_utc: str
    duration_s: float
    command: str
    plan: Plan
    load_start: float
    load_end: float
    machine: dict[str, str]
    bare: Stats
    cells: list[Cell]
    rss_runs: RssRuns
    big_print: BigPrint
    security: Security
    operations: Operations
    targets: list[Target]

    @property
    def all_passed(self) -> bool:
        return all(t.passed for t in self.targets)


def render_markdown(r: Report) -> str:
    m, plan, bare, rss, big = r.machine, r.plan, r.bare, r.rss_runs, r.big_print
    sec, ops = r.security, r.operations
    lines = [
        SECTION_START,
        "## Latest results",
        "",
        "_Generated by `bench/run.py`; this section is overwritten by each run._",
        "",
        f"- Date: {r.started_utc} (UTC), the run took {r.duration_s:.0f} s",
        f"- Command: `{r.command}`",
        f"- Mode: {plan.name} ({plan.requests_c1} requests per cell at concurrency 1, "
        f"{plan.requests_c4} at 4, {plan.warmup} warm-up requests first)",
        f"- Machine: {m['os']}; {m['cpu']}, {m['cores']} cores, {m['memory']} RAM",
        f"- Load average (1 min) at start / end: {r.load_start:.2f} / {r.load_end:.2f}",
        f"- Python: server {m['python_server']}; sandbox {m['python_sandbox']}",
        f"- bubblewrap: {m['bwrap']}; Nox at `{m['nox_commit']}`",
        "- Servers: `nox-api serve` on 127.0.0.1, fresh data folder each, default settings "
        "except `NOX_POOL_SIZE=4` (warm) or `0` (cold; the default 2 stems stay on)",
        "",
        "### Latency, end to end over HTTP (ms)",
        "",
        "One keep-alive `httpx2` client per worker thread; only correct answers (HTTP 200, "
        "`status` ok, the right stdout) count in the latency figures. Run `duration_ms`: the "
        "run itself as the server timed it (reported in each answer). Server CPU: CPU time of "
        "the `nox-api serve` process per request, the warm pool's refills included; sandbox CPU: "
        "CPU time of its reaped children (setpriv, bwrap, the interpreter) per request.",
        "",
        f"Paced: each client waits {PACE_S * 1000:g} ms after an answer before it asks again "
        "(a client that reads its answers: an agent, a person, a CI step), so a warm sandbox is "
        "ready and no refill competes with the request; the other cells send back to back.",
        "",
        "| server | route | concurrency | pace | requests | failed | mean | p50 | p99 | max "
        "| run `duration_ms` p50 | runs/s | server CPU ms/run | sandbox CPU ms/run |",
        "|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in r.cells:
        lat = c.latency
        lines.append(
            f"| {c.server} | `{c.route}` | {c.concurrency} "
            f"| {f'{c.pace_ms:g} ms' if c.pace_ms else 'none'} | {c.requests} | {c.failed} "
            f"| {_f(lat.mean_ms)} | {_f(lat.p50_ms)} | {_f(lat.p99_ms)} | {_f(lat.max_ms)} "
            f"| {_f(c.server_duration.p50_ms)} | {_f(c.runs_per_s, 1)} "
            f"| {_f(c.server_cpu_ms_per_run)} | {_f(c.sandbox_cpu_ms_per_run)} |"
        )
    failures = [(c, kind, text) for c in r.cells for kind, text in c.failures.items()]
    if failures:
        lines += ["", "Failed requests:", ""]
        lines += [f"- {c.server} `{c.route}` c={c.concurrency}{_paced(c)}: {k}: `{t[:120]}`"
                  for c, k, t in failures]  # fmt: skip
    lines += [
        "",
        "### Yardstick: the bare interpreter",
        "",
        f"`subprocess.run([{SANDBOX_PYTHON!r}, '-I', '-S', '-c', 'print(1)'])` from the "
        "benchmark process, no sandbox, no server.",
        "",
        "| runs | mean | p50 | p99 | max |",
        "|--:|--:|--:|--:|--:|",
        f"| {bare.n} | {_f(bare.mean_ms)} | {_f(bare.p50_ms)} | {_f(bare.p99_ms)} "
        f"| {_f(bare.max_ms)} |",
        "",
        "### Server memory (RSS of the `nox-api serve` process, MiB)",
        "",
        "| scenario | before | peak | after | growth | detail |",
        "|---|--:|--:|--:|--:|---|",
        f"| {rss.runs} warm runs of `/run_py` `print(1)`, concurrency 4 | {_f(rss.before_mib, 1)} "
        f"| {_f(max([rss.before_mib, *rss.samples_mib]), 1)} | {_f(rss.after_mib, 1)} "
        f"| {rss.growth_mib:+.2f} | {rss.failed} failed; after each {plan.rss_batch}: "
        f"{', '.join(f'{s:.1f}' for s in rss.samples_mib)} |",
        f"| one run printing {big.printed_mib} MiB (policy `output_hard_bytes: 2147483648`, "
        f"`timeout_s` 60) | {_f(big.before_mib, 1)} | {_f(big.peak_mib, 1)} "
        f"| {_f(big.after_mib, 1)} | {big.growth_mib:+.2f} | HTTP {big.http_status}, status "
        f"{big.run_status}, {big.client_s:.2f} s end to end (server `duration_ms` "
        f"{_f(big.server_duration_ms, 0)}), {big.stdout_chars} stdout characters kept, "
        f"truncated {big.stdout_truncated}{'; ' + big.error if big.error else ''} |",
        "",
        "### Multi-user cost (auth, policy, rate limit, quota, audit)",
        "",
        "`bench/overhead.py`: the same server (fake sandbox, uvicorn on 127.0.0.1 in the benchmark "
        f"process) answers {sec.requests} `/run_py` `print(1)` with everything on and "
        f"{sec.requests} with the caller's dependency overridden and quota and audit off, in "
        "alternating blocks of 100. `bench/audit_verify.py`: verify a log written by the module.",
        "",
        "| measure | value |",
        "|---|--:|",
        f"| `/run_py` p50, all on | {sec.on_p50_ms:.3f} ms |",
        f"| `/run_py` p50, all off | {sec.off_p50_ms:.3f} ms |",
        f"| cost | {sec.overhead_ms:.3f} ms |",
        f"| audit verify | {sec.verify_lines_per_s:,.0f} lines/s ({sec.audit_lines:,} lines) |",
        f"| audit append with fsync, p50 | {sec.append_p50_us:.0f} µs |",
        "",
        "### Observability cost",
        "",
        "`bench/observability.py`: the same kind of server answers `/run_py` with metrics and the "
        "access log on, then with the run and audit observers emptied and the metrics middleware "
        "(which writes the access line) a pass-through, in alternating blocks of 100 (each order "
        "in turn). `/metrics` is scraped from loopback with 10,000 history rows and 50 "
        "workspaces' storage rows in the database.",
        "",
        "| measure | value |",
        "|---|--:|",
        f"| `/run_py` p50, metrics and access log on | {sec.obs_on_p50_ms:.3f} ms |",
        f"| `/run_py` p50, off | {sec.obs_off_p50_ms:.3f} ms |",
        f"| cost | {sec.obs_cost_ms:+.3f} ms |",
        f"| `GET /metrics` p50 / p95 | {sec.scrape_p50_ms:.2f} / {sec.scrape_p95_ms:.2f} ms |",
        "",
        "### Files and backups",
        "",
        f"`bench/files.py`: {ops.listing_files:,} small files in 10 folders, "
        "`GET /api/files?recursive=true` from a uvicorn server on 127.0.0.1 in the benchmark "
        f"process (fake sandbox), {plan.listing_calls} calls after 2 warm-up calls, whole "
        f"answer ({ops.listing_answer_bytes:,} bytes) received and parsed. `bench/backup.py`: "
        f"{ops.backup_mib} MiB of workspace data ({ops.backup_files:,} files: 75 % in 4 files "
        "of random bytes, the rest 16 KiB text files), `BackupService.create` then `.restore` "
        "(the path of `nox-api backup`), fsync'ed, real zstd and AES-256-GCM; MB/s is 10^6 "
        "bytes of workspace data per second.",
        "",
        "| measure | value |",
        "|---|--:|",
        f"| listing p50 / p95 | {ops.listing_p50_ms:.1f} / {ops.listing_p95_ms:.1f} ms |",
        f"| backup | {ops.backup_mb_s:.0f} MB/s (file {ops.backup_ratio:.2f}x the data) |",
        f"| restore, whole (pre-restore backup included) | {ops.restore_mb_s:.0f} MB/s |",
        f"| restore, unpack + check + swap (beside the pre-restore backup) | "
        f"{ops.restore_unpack_mb_s:.0f} MB/s |",
        "",
        "### Targets",
        "",
        "| target | measured | limit | result |",
        "|---|---|---|---|",
    ]
    lines += [f"| {t.name} | {t.measured} | {t.limit} | {'PASS' if t.passed else '**FAIL**'} |"
              for t in r.targets]  # fmt: skip
    lines += ["", SECTION_END]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace the generated section of ``path`` (or add it; create the file if missing)."""
    if path.exists():
        text = path.read_text()
        start, end = text.find(SECTION_START), text.find(SECTION_END)
        if start != -1 and end > start:
            rest = text[end + len(SECTION_END) :].lstrip("\n")
            text = text[:start] + section + ("\n" + rest if rest else "")
        else:
            text = text.rstrip("\n") + "\n\n" + section
    else:
        text = (
            "# Benchmarks\n\n"
            "Measured by `bench/run.py` (see `bench/README.md`): it starts real Nox servers, "
            "measures them over HTTP and checks the performance targets.\n\n" + section
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# -- main ------------------------------------------------------------------------------------
WARM_ENV = {"NOX_POOL_SIZE": "4"}
COLD_ENV = {"NOX_POOL_SIZE": "0"}
BIG_ENV = {"NOX_POOL_SIZE": "1"}
BIG_POLICY = (
    "limits:\n  maxima:\n    output_hard_bytes: 2147483648\n    timeout_s: 120\n    cpu_s: 120\n"
)
# Every run of the benchmark is one runner at full speed: the shipped rate limits would refuse it.
BENCH_POLICY = "rate_limits:\n  roles:\n    admin: 1000000/minute\n    runner: 1000000/minute\n"


def _policy_file(folder: Path, name: str, text: str) -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


def _latency_cells(server: Server, plan: Plan) -> Iterator[Cell]:
    yield measure_cell(server, PY, 1, plan.requests_c1, plan, pace_s=PACE_S)
    for concurrency, requests in ((1, plan.requests_c1), (4, plan.requests_c4)):
        for work in (PY, SH):
            yield measure_cell(server, work, concurrency, requests, plan)


def run(
    plan: Plan, policies: Path
) -> tuple[list[Cell], Stats, RssRuns, BigPrint, Security, Operations]:
    bench_policy = _policy_file(policies, "bench.yaml", BENCH_POLICY)
    warm_env = {**WARM_ENV, "NOX_POLICY_FILE": bench_policy}
    cold_env = {**COLD_ENV, "NOX_POLICY_FILE": bench_policy}
    big_env = {**BIG_ENV, "NOX_POLICY_FILE": _policy_file(policies, "big.yaml", BIG_POLICY)}
    print("yardstick", file=sys.stderr)
    bare = measure_bare(plan.bare_runs, plan.warmup)
    print("warm server (NOX_POOL_SIZE=4)", file=sys.stderr)
    with Server("warm", warm_env) as warm:
        cells = list(_latency_cells(warm, plan))
        rss = measure_rss_runs(warm, plan)
    print("cold server (NOX_POOL_SIZE=0)", file=sys.stderr)
    with Server("cold", cold_env) as cold:
        cells += list(_latency_cells(cold, plan))
    print("big-output server (policy output_hard_bytes 2 GiB)", file=sys.stderr)
    with Server("big", big_env) as big_server:
        big = measure_big_print(big_server, plan)
    print("multi-user cost, audit verify, observability cost", file=sys.stderr)
    security = measure_security(plan)
    print(f"  overhead {security.overhead_ms:.3f} ms, verify "
          f"{security.verify_lines_per_s:,.0f} lines/s, observability {security.obs_cost_ms:+.3f} "
          f"ms, /metrics p50 {security.scrape_p50_ms:.2f} ms", file=sys.stderr)  # fmt: skip
    print("files and backups", file=sys.stderr)
    operations = measure_operations(plan)
    return cells, bare, rss, big, security, operations


def _finite(value: Any) -> Any:
    """``value`` with NaN replaced by None, so that the JSON is strict."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwind through the servers' `with` blocks, which stop them


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer requests: a smoke test")
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="markdown file whose results section is (re)written (default docs/benchmarks.md)",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in background

    started = datetime.now(UTC)
    clock = time.monotonic()
    load_start = os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory(prefix="nox-bench-policy-") as policies:
            cells, bare, rss, big, security, operations = run(plan, Path(policies))
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    report = Report(
        started_utc=started.strftime("%Y-%m-%d %H:%M"),
        duration_s=time.monotonic() - clock,
        command=_command_line(),
        plan=plan,
        load_start=load_start,
        load_end=os.getloadavg()[0],
        machine=machine_info(),
        bare=bare,
        cells=cells,
        rss_runs=rss,
        big_print=big,
        security=security,
        operations=operations,
        targets=evaluate(cells, bare, rss, big, security, operations),
    )
    write_section(args.output, render_markdown(report))
    raw = asdict(report) | {"started_utc": started.isoformat(), "all_passed": report.all_passed}
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(_finite(raw), indent=2) + "\n")

    print("\ntargets:")
    for t in report.targets:
        print(f"  {'PASS' if t.passed else 'FAIL'}  {t.name}: {t.measured} (limit {t.limit})")
    print(f"\nwrote {args.output} and {RESULTS_JSON.relative_to(ROOT)}")
    return 0 if report.all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
