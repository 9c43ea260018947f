"""Engine pieces without a sandbox: status mapping, path checks, seccomp, the pool's logic."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from nox_api.engine.base import Limits
from nox_api.engine.pool import WarmPool
from nox_api.engine.process import _status
from nox_api.engine.seccomp import compile_filter
from nox_api.errors import InvalidPath
from nox_api.services.files import split_path
from noxsdk.models import ExecutionStatus

LIM = Limits(cpu_s=2)


@pytest.mark.parametrize(
    ("stop", "code", "oom", "cpu_ms", "by_rlimit", "stderr", "expected"),
    [
        (None, 0, False, 5.0, False, b"", ExecutionStatus.OK),
        (None, 1, False, 5.0, False, b"", ExecutionStatus.ERROR),
        (None, 2, False, 5.0, False, b"", ExecutionStatus.ERROR),
        ("timeout", 137, False, 5.0, False, b"", ExecutionStatus.TIMEOUT),
        ("output", 137, False, 5.0, False, b"", ExecutionStatus.OUTPUT_LIMIT),
        (None, 137, True, 5.0, False, b"", ExecutionStatus.MEMORY_LIMIT),
        (None, 152, False, 2000.0, False, b"", ExecutionStatus.TIMEOUT),  # SIGXCPU
        (None, 137, False, 3000.0, False, b"", ExecutionStatus.TIMEOUT),  # SIGKILL at hard
        (None, 137, False, 5.0, False, b"", ExecutionStatus.KILLED),
        (None, 139, False, 5.0, False, b"", ExecutionStatus.KILLED),  # SIGSEGV
        (None, 1, False, 5.0, True, b"Traceback...\nMemoryError\n", ExecutionStatus.MEMORY_LIMIT),
        (None, 1, False, 5.0, False, b"Traceback...\nMemoryError\n", ExecutionStatus.ERROR),
    ],
)
def test_status_mapping(  # noqa: PLR0917 - one argument per parameter column
    stop: str | None,
    code: int,
    oom: bool,
    cpu_ms: float,
    by_rlimit: bool,
    stderr: bytes,
    expected: ExecutionStatus,
) -> None:
    got = _status(
        stop, code, oom=oom, cpu_ms=cpu_ms, lim=LIM, memory_by_rlimit=by_rlimit, stderr=stderr
    )
    assert got == expected


@pytest.mark.parametrize(
    ("path", "parts"),
    [
        ("a", ["a"]),
        ("a/b/c.txt", ["a", "b", "c.txt"]),
        ("./a//b/", ["a", "b"]),
        ("a/../b", ["b"]),
        ("a b/ü.txt", ["a b", "ü.txt"]),
        ("%2e%2e", ["%2e%2e"]),
    ],
)
def test_split_path_accepts(path: str, parts: list[str]) -> None:
    assert split_path(path) == parts


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("..", "leaves the workspace"),
        ("a/../../b", "leaves the workspace"),
        ("a\x00b", "NUL"),
        ("x" * 256, "255 bytes"),
        ("é" * 128, "255 bytes"),
        ("a/" * 2100, "4096"),
        ("a/..", "names the workspace"),
    ],
)
def test_split_path_refuses(path: str, fragment: str) -> None:
    with pytest.raises(InvalidPath, match=fragment):
        split_path(path)


def test_seccomp_filter_compiles_to_bpf() -> None:
    program = compile_filter()
    assert len(program) % 8 == 0  # struct sock_filter is 8 bytes
    assert len(program) > 8 * 40  # dozens of rules, not an empty allow-all


class _FakeProcess:
    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace
        self.discarded = False
        self.dead = False

    def alive(self) -> bool:
        return not self.dead

    def discard(self) -> None:
        self.discarded = True


def _wait_for(predicate: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


def test_pool_misses_then_hits_and_refills(tmp_path: Path) -> None:
    spawned: list[_FakeProcess] = []
    lock = threading.Lock()

    def spawn(ws: Path) -> Any:
        with lock:
            spawned.append(_FakeProcess(ws))
            return spawned[-1]

    pool = WarmPool(spawn, size=2, idle_s=60, max_workspaces=4)
    try:
        assert pool.take(tmp_path) is None  # a miss starts the queue
        _wait_for(lambda: pool.stats().ready == 2)
        got = pool.take(tmp_path)
        assert got is spawned[0]
        _wait_for(lambda: pool.stats().ready == 2)
        assert (pool.stats().hits, pool.stats().misses) == (1, 1)
        spawned[1].dead = True  # died while waiting: thrown away, never handed out
        assert pool.take(tmp_path) is spawned[2]
        assert spawned[1].discarded
    finally:
        pool.close()
    assert all(p.discarded for p in spawned[3:])


def test_pool_drops_idle_and_least_recent_workspaces(tmp_path: Path) -> None:
    made: list[_FakeProcess] = []
    pool = WarmPool(
        lambda ws: made.append(_FakeProcess(ws)) or made[-1], size=1, idle_s=0.3, max_workspaces=2
    )
    try:
        for name in ("a", "b", "c"):
            pool.prewarm(tmp_path / name)
        _wait_for(lambda: pool.stats().workspaces <= 2 and pool.stats().ready == 2)
        assert any(p.workspace.name == "a" and p.discarded for p in made) or not any(
            p.workspace.name == "a" for p in made
        )
        _wait_for(lambda: pool.stats().workspaces == 0, timeout=10)  # idle expiry
        assert all(p.discarded for p in made)
    finally:
        pool.close()


def test_pool_of_size_zero_never_spawns(tmp_path: Path) -> None:
    pool = WarmPool(lambda ws: pytest.fail("must not spawn"), size=0, idle_s=1, max_workspaces=1)
    assert pool.take(tmp_path) is None
    pool.prewarm(tmp_path)
    pool.close()


def test_cgroups_of_live_servers_are_not_stale() -> None:
    import os
    import subprocess

    from nox_api.engine.cgroups import _owner_alive

    dead = subprocess.Popen(["true"])
    dead.wait()
    assert _owner_alive(f"nox-sb-{os.getpid()}-abc")
    assert _owner_alive("nox-sb-1-abc")  # pid 1 always runs
    assert not _owner_alive(f"nox-sb-{dead.pid}-abc")
    assert not _owner_alive("nox-sb-0123abcd")  # not of this naming scheme


def test_quiet_gate_waits_for_runs_then_a_grace() -> None:
    from nox_api.engine.quiet import QuietGate

    gate = QuietGate(grace_s=0.05, max_wait_s=2.0)
    began = time.monotonic()
    gate.wait()  # nothing ever ran: no wait at all
    assert time.monotonic() - began < 0.05

    released = threading.Event()
    waited: list[float] = []

    def housekeeping() -> None:
        start = time.monotonic()
        gate.wait()
        waited.append(time.monotonic() - start)
        released.set()

    with gate.busy():
        worker = threading.Thread(target=housekeeping)
        worker.start()
        assert not released.wait(0.2)  # held while a run is going
        run_end = time.monotonic()
    assert released.wait(2.0)
    worker.join()
    after_end = time.monotonic() - run_end
    assert 0.03 <= after_end < 1.0  # the grace after the run, not the 2 s ceiling
    assert waited[0] >= 0.2


def test_quiet_gate_never_starves_housekeeping() -> None:
    from nox_api.engine.quiet import QuietGate

    gate = QuietGate(grace_s=0.05, max_wait_s=0.2)
    with gate.busy():
        began = time.monotonic()
        gate.wait()
        took = time.monotonic() - began
    assert 0.15 <= took < 1.0


def test_a_pool_emptied_by_runs_back_to_back_refills_without_waiting_for_quiet(
    tmp_path: Path,
) -> None:
    """While runs go on, a refill waits for a quiet moment (at most max_wait_s); a queue that
    runs empty is refilled at once, or its next run starts a sandbox on its own path."""
    from nox_api.engine.quiet import QuietGate

    gate = QuietGate(grace_s=0.05, max_wait_s=5.0)
    pool = WarmPool(_FakeProcess, size=2, idle_s=60, max_workspaces=4, quiet=gate)
    try:
        pool.prewarm(tmp_path)
        _wait_for(lambda: pool.stats().ready == 2)
        with gate.busy():  # a run that never ends: the gate is never quiet
            assert pool.take(tmp_path) is not None  # one left: the refill waits for quiet
            time.sleep(0.3)
            assert pool.stats().ready == 1
            with gate.busy():  # the next run takes the last one
                assert pool.take(tmp_path) is not None
                began = time.monotonic()
                _wait_for(lambda: pool.stats().ready >= 1, timeout=2.0)
                assert time.monotonic() - began < 1.0  # not the gate's 5 s
    finally:
        pool.close()


def test_quiet_gate_returns_when_the_wait_turns_urgent() -> None:
    from nox_api.engine.quiet import QuietGate

    gate = QuietGate(grace_s=0.05, max_wait_s=5.0)
    urgent = threading.Event()

    def another_run_starts() -> None:
        urgent.set()
        with gate.busy():  # a run starting is when the gate looks again
            pass

    with gate.busy():
        threading.Timer(0.2, another_run_starts).start()
        began = time.monotonic()
        gate.wait(urgent=urgent.is_set)
        took = time.monotonic() - began
    assert 0.15 <= took < 2.0
