"""Resource limits of real sandboxes: wall and CPU time, memory, processes (fork bombs, with no
process left behind on the host), output (capped, with the server's memory flat), tmpfs sizes."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
from fastapi.testclient import TestClient

from nox_api.services.policy import Policy

from ._helpers import SANDBOX_UID, own_server, run_py, run_sh

pytestmark = pytest.mark.sandbox

MIB = 1024 * 1024


def run(client: TestClient, kind: str, source: str, **fields: Any) -> dict[str, Any]:
    return (run_py if kind == "python" else run_sh)(client, source, **fields)


def wait_until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step_s)


# -- time ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "source", "timeout_s"),
    [
        ("python", "while True:\n    pass", 2),
        ("python", "import time\ntime.sleep(30)", 1),
        ("shell", "sleep 30", 1),
        ("shell", "while :; do :; done", 1),
    ],
    ids=["py-busy", "py-sleep", "sh-sleep", "sh-busy"],
)
def test_stopped_at_timeout(
    bwrap_client: TestClient, kind: str, source: str, timeout_s: float
) -> None:
    started = time.monotonic()
    answer = run(bwrap_client, kind, source, timeout_s=timeout_s)
    elapsed = time.monotonic() - started
    assert answer["status"] == "timeout", answer
    assert answer["exit_code"] != 0
    assert timeout_s * 1000 * 0.8 <= answer["duration_ms"] <= timeout_s * 1000 + 1500
    assert elapsed < timeout_s + 3, "the request outlived its timeout"


def test_timeout_kills_children_too(bwrap_client: TestClient) -> None:
    code = "import subprocess, time\nsubprocess.Popen(['sleep', '30'])\ntime.sleep(30)"
    started = time.monotonic()
    answer = run_py(bwrap_client, code, timeout_s=1)
    assert answer["status"] == "timeout"
    assert time.monotonic() - started < 4


# -- memory ----------------------------------------------------------------------------------
_HOG = """
b = bytearray({mib} * 1024 * 1024)
for i in range(0, len(b), 4096):
    b[i] = 1
print('survived')
"""


def test_memory_hog_stopped_on_a_warm_sandbox(bwrap_client: TestClient) -> None:
    sandbox = bwrap_client.app.state.nox.sandbox  # type: ignore[attr-defined]
    assert wait_until(lambda: sandbox.pool_stats().ready >= 1, 10)
    hits = sandbox.pool_stats().hits
    answer = run_py(bwrap_client, _HOG.format(mib=600), memory_mib=128, timeout_s=10)
    assert sandbox.pool_stats().hits == hits + 1  # the limit was narrowed on a warm sandbox
    assert answer["status"] == "memory_limit", answer
    assert "survived" not in answer["stdout"]
    assert answer["limits"]["memory_mib"] == 128
    assert answer["duration_ms"] < 8000


def test_memory_within_limit_works(bwrap_client: TestClient) -> None:
    answer = run_py(bwrap_client, _HOG.format(mib=64), memory_mib=256)
    assert answer["status"] == "ok", answer["stderr"]
    assert answer["stdout"] == "survived\n"


def test_memory_limit_holds_for_the_whole_tree(bwrap_client: TestClient) -> None:
    """Three children of 100 MiB each under a 128 MiB limit: one process at a time fits,
    all of them together do not."""
    code = f"""
import subprocess, sys
child = {_HOG.format(mib=100)!r} + "import time\\ntime.sleep(1.5)"
procs = [subprocess.Popen([sys.executable, '-I', '-S', '-c', child]) for _ in range(3)]
print([p.wait() for p in procs])
"""
    answer = run_py(bwrap_client, code, memory_mib=128, timeout_s=8)
    assert answer["status"] == "memory_limit", answer
    assert "-9" in answer["stdout"], answer["stdout"]


# -- processes -------------------------------------------------------------------------------
def sandbox_processes(marker: str) -> set[int]:
    """Live host processes of the sandbox user that belong to this test's server.

    Matched by this test's data folder (``marker``): bubblewrap's command line names the
    workspace it binds, and every process inside has that bind in its mount table. Processes
    of other servers (a developer's tests running beside these) do not match; a process that
    escaped its sandbox's process tree still does.
    """
    found: set[int] = set()
    needle = marker.encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as fh:
                status = fh.read()
            fields = dict(line.split(b":", 1) for line in status.splitlines() if b":" in line)
            if int(fields[b"Uid"].split()[0]) != SANDBOX_UID:
                continue
            if fields[b"State"].strip().startswith(b"Z"):
                continue  # a zombie holds nothing but its pid
            with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                cmdline = fh.read()
            with open(f"/proc/{entry.name}/mountinfo", "rb") as fh:
                mountinfo = fh.read()
        except (OSError, KeyError, ValueError):
            continue  # gone meanwhile
        if needle in cmdline or needle in mountinfo:
            found.add(int(entry.name))
    return found


def settled_baseline(client: TestClient, marker: str) -> int:
    """How many sandbox processes an idle server keeps (its warm sandboxes), once stable."""
    sandbox = client.app.state.nox.sandbox  # type: ignore[attr-defined]
    size = client.app.state.nox.settings.pool_size  # type: ignore[attr-defined]
    assert wait_until(lambda: sandbox.pool_stats().ready >= size, 10)
    last = -1
    for _ in range(40):
        count = len(sandbox_processes(marker))
        if count == last:
            return count
        last = count
        time.sleep(0.1)
    raise AssertionError("the number of sandbox processes never settled")


@pytest.mark.parametrize(
    ("kind", "source"),
    [
        ("shell", "f(){ f|f& };f"),
        ("shell", "f(){ f|f& };f; sleep 30"),
        (
            "python",
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
            "        pass",
        ),
    ],
    ids=["sh-bomb", "sh-bomb-held", "py-fork-loop"],
)
def test_fork_bomb_contained(
    bwrap_client: TestClient, data_dir: Path, kind: str, source: str
) -> None:
    marker = data_dir.name
    warm = run_sh(bwrap_client, "echo warm")
    assert warm["stdout"] == "warm\n"
    baseline = settled_baseline(bwrap_client, marker)
    assert baseline >= 1, "the marker does not find this server's warm sandbox"

    peak = 0
    timeout_s = 2
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        future = pool.submit(run, bwrap_client, kind, source, timeout_s=timeout_s)
        while not future.done() and time.monotonic() - started < timeout_s + 10:
            peak = max(peak, len(sandbox_processes(marker)))
            time.sleep(0.05)
        answer = future.result(timeout=15)
        elapsed = time.monotonic() - started
    assert elapsed < timeout_s + 3, f"the fork bomb held the request for {elapsed:.1f} s"
    if source.endswith(("sleep 30", "pass")):
        assert answer["status"] == "timeout", answer
    processes = answer["limits"]["processes"]
    assert peak <= baseline + processes, f"{peak} sandbox processes at once"

    left = wait_until(lambda: len(sandbox_processes(marker)) <= baseline, 10, 0.1)
    assert left, f"processes left behind: {sorted(sandbox_processes(marker))} (baseline {baseline})"

    after = run_py(bwrap_client, "print('healthy')", timeout_s=5)
    assert (after["status"], after["stdout"]) == ("ok", "healthy\n")
    health = bwrap_client.get("/health")
    assert health.status_code == 200


# -- output ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "source", "stream"),
    [
        ("shell", "yes", "stdout"),
        ("python", "while True:\n    print('spam' * 100)", "stdout"),
        ("shell", "yes >&2", "stderr"),
    ],
    ids=["sh-yes", "py-loop", "sh-yes-stderr"],
)
def test_output_flood_stopped(data_dir: Path, kind: str, source: str, stream: str) -> None:
    kept, hard = 64 * 1024, 256 * 1024
    with own_server(
        data_dir, {"output_bytes": kept, "output_hard_bytes": hard}, pool_size=0
    ) as client:
        started = time.monotonic()
        answer = run(client, kind, source, timeout_s=10)
        elapsed = time.monotonic() - started
    assert answer["status"] == "output_limit", answer["status"]
    assert answer[f"{stream}_truncated"] is True
    assert 0 < len(answer[stream].encode()) <= kept
    assert answer["limits"]["output_bytes"] == kept
    assert elapsed < 5, "the flood ran until the timeout instead of being stopped"


def test_server_memory_flat_while_a_run_prints_a_gib(data_dir: Path) -> None:
    me = psutil.Process()
    kept = 1 * MIB
    maxima = {"output_hard_bytes": 2 * 1024**3, "output_bytes": kept}
    code = "import os\nblock = b'x' * (1 << 20)\nfor _ in range({n}):\n    os.write(1, block)"
    with own_server(data_dir, maxima, pool_size=0) as client:
        warm = run_py(client, code.format(n=8), timeout_s=10)  # allocate the usual buffers
        assert warm["stdout_truncated"] is True
        gc.collect()
        before = me.memory_info().rss
        peak = before
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, me.memory_info().rss)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            answer = run_py(client, code.format(n=1024), timeout_s=40)
        finally:
            done.set()
            sampler.join(timeout=5)
        gc.collect()
        after = me.memory_info().rss
    assert answer["status"] == "ok", (answer["status"], answer["stderr"])
    assert answer["stdout_truncated"] is True
    assert len(answer["stdout"]) == kept
    assert (after - before) < 20 * MIB, f"RSS grew by {(after - before) / MIB:.1f} MiB"
    assert (peak - before) < 20 * MIB, f"RSS peaked {(peak - before) / MIB:.1f} MiB higher"


# -- tmpfs sizes -----------------------------------------------------------------------------
_FILL = """
import errno, os
block = b'x' * (1 << 20)
total, failure, i = 0, None, 0
try:
    os.makedirs({folder!r}, exist_ok=True)
    while total < {limit} << 20:
        fd = os.open(os.path.join({folder!r}, f'fill{{i}}'), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for _ in range(4):
                total += os.write(fd, block)
        finally:
            os.close(fd)
        i += 1
except OSError as exc:
    failure = errno.errorcode[exc.errno]
print(total >> 20, failure)
"""


@pytest.mark.parametrize("folder", ["/tmp", "/dev/shm", "/dev"])
def test_writable_tmpfs_is_size_capped_without_cgroups(data_dir: Path, folder: str) -> None:
    """Without a cgroup nothing charges a tmpfs to the run: every folder a program may fill
    must have its own cap, or one run can fill the host's memory."""
    tmp_mib = 8
    with own_server(
        data_dir, {"tmp_size_mib": tmp_mib}, pool_size=0, sandbox_cgroups=False
    ) as client:
        answer = run_py(client, _FILL.format(folder=folder, limit=4 * tmp_mib), timeout_s=10)
    assert answer["status"] == "ok", answer["stderr"]
    written_mib, failure = answer["stdout"].split()
    assert failure != "None", f"{written_mib} MiB written to {folder} without any limit"
    assert int(written_mib) <= tmp_mib


def test_file_size_limit(data_dir: Path) -> None:
    code = """
import errno, os
total = 0
try:
    with open('big.bin', 'wb', buffering=0) as fh:
        for _ in range(4):
            total += fh.write(b'x' * (1 << 20))
except OSError as exc:
    print(total, errno.errorcode[exc.errno])
else:
    print(total, None)
"""
    with own_server(data_dir, {"file_size_mib": 1}, pool_size=0) as client:
        answer = run_py(client, code)
    assert answer["status"] == "ok", answer["stderr"]
    assert answer["limits"]["file_size_mib"] == 1
    assert answer["stdout"].split() == [str(1 * MIB), "EFBIG"]


def test_open_files_limit(bwrap_client: TestClient) -> None:
    code = """
import errno, os
fds = []
try:
    for _ in range(5000):
        fds.append(os.open('/dev/null', os.O_RDONLY))
except OSError as exc:
    print(len(fds), errno.errorcode[exc.errno])
"""
    answer = run_py(bwrap_client, code)
    opened, failure = answer["stdout"].split()
    assert failure == "EMFILE"
    assert int(opened) < answer["limits"]["open_files"]


def test_the_policy_reaches_the_limits(bwrap_client: TestClient) -> None:
    maxima = Policy().limits.maxima
    answer = run_py(bwrap_client, "print(1)", timeout_s=3, memory_mib=64)
    assert answer["limits"]["timeout_s"] == 3
    assert answer["limits"]["memory_mib"] == 64
    assert answer["limits"]["tmp_size_mib"] == Policy().limits.maxima.tmp_size_mib
    too_much = bwrap_client.post(
        "/run_py", json={"code": "print(1)", "memory_mib": maxima.memory_mib + 1}
    )
    assert too_much.status_code == 400
    too_long = bwrap_client.post(
        "/run_py", json={"code": "print(1)", "timeout_s": maxima.timeout_s + 1}
    )
    assert too_long.status_code == 400


# Burns CPU, then writes a report of its own ("exit 0, no CPU") to the bootstrap's status pipe,
# the one writable pipe it holds beside its standard streams.
_FAKE_REPORT = """
import os, stat, fcntl, time
end = time.process_time() + 0.4
while time.process_time() < end:
    pass
for fd in range(3, 64):
    try:
        mode = os.fstat(fd).st_mode
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        continue
    if stat.S_ISFIFO(mode) and flags & os.O_ACCMODE == os.O_WRONLY:
        os.write(fd, b"0 0.000\\n")
time.sleep(5)
"""


def test_a_fake_report_cannot_hide_cpu_time_without_cgroups(data_dir: Path) -> None:
    """Without a cgroup the bootstrap reports the CPU time; a program can write that report
    itself. The server then counts what the kernel counted for the sandbox's processes."""
    with own_server(data_dir, pool_size=0, sandbox_cgroups=False) as client:
        answer = run_py(client, _FAKE_REPORT, timeout_s=10)
    assert answer["exit_code"] == 0  # its own run's exit code is all the report may choose
    assert answer["duration_ms"] < 3000  # the report ended the run (no 5 s sleep)
    assert answer["cpu_ms"] >= 350, answer
