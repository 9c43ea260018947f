"""Stems: sandboxes started ahead of time without a workspace (cgroup joined, user switched,
bwrap waiting for its options), grown into a sandbox by the first run the warm pool misses.

The isolation checks run on stems too (``test_isolation.START_PATHS``); these are about their
life: they serve any workspace, they are replaced when they die, and none survives its server."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nox_api.engine import cgroups as cgroups_mod
from nox_api.engine.base import Limits, RunSpec
from nox_api.engine.bwrap import BwrapLauncher
from nox_api.engine.process import spawn_stem
from nox_api.engine.sandbox import ProcessSandbox

from ._helpers import SANDBOX_UID

pytestmark = pytest.mark.sandbox

CEILING = Limits(timeout_s=30.0)


def _launcher() -> BwrapLauncher:
    return BwrapLauncher.create(python="/usr/bin/python3", uid=SANDBOX_UID, gid=SANDBOX_UID)


def _workspace(sandbox: ProcessSandbox, root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir()
    sandbox.prepare_workspace(folder)
    return folder


@pytest.fixture
def root(data_dir: Path) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o711)  # the sandbox user must reach the workspaces below
    return data_dir


def _stems_only(root: Path, stems: int) -> ProcessSandbox:
    """A real bwrap sandbox without a warm pool: every run grows a stem (or starts afresh)."""
    return ProcessSandbox(
        name="bwrap", isolation="namespaces+seccomp", launcher=_launcher(), ceiling=CEILING,
        pool_size=0, pool_idle_s=60, pool_max_workspaces=4, max_concurrent=4,
        use_cgroups=True, probe_dir=root / "probe", stems=stems,
    )  # fmt: skip


@pytest.fixture
def stems_only(root: Path) -> Iterator[ProcessSandbox]:
    sandbox = _stems_only(root, 2)
    if cgroups_mod.detect() is None:
        sandbox.close()
        pytest.skip("stems are used only where the server may create cgroups")
    try:
        yield sandbox
    finally:
        sandbox.close()


def _wait_ready(sandbox: ProcessSandbox, count: int) -> None:
    deadline = time.monotonic() + 10
    while sandbox.stem_stats().ready != count:
        assert time.monotonic() < deadline, f"stems ready: {sandbox.stem_stats()}"
        time.sleep(0.02)


def _run(sandbox: ProcessSandbox, workspace: Path, code: str) -> str:
    run_limits = Limits(timeout_s=10.0, memory_mib=64)
    result = sandbox.run(RunSpec("python", code, workspace, run_limits))
    assert result.status == "ok", result
    return result.stdout.decode()


def _stem_pids(sandbox: ProcessSandbox) -> list[int]:
    queue = sandbox._stems._queues.get(Path("/"))
    return [] if queue is None else [stem.sp.proc.pid for stem in queue.ready]


def test_stems_serve_any_workspace_with_its_own_files(
    stems_only: ProcessSandbox, root: Path
) -> None:
    first, second = _workspace(stems_only, root, "first"), _workspace(stems_only, root, "second")
    _wait_ready(stems_only, 2)
    _run(stems_only, first, "open('mine.txt', 'w').write('first')")
    _wait_ready(stems_only, 2)
    listing = _run(stems_only, second, "import os; print(sorted(os.listdir('.')))")
    assert listing == "[]\n"  # the second workspace's stem did not see the first's file
    assert (first / "mine.txt").read_text() == "first"
    assert stems_only.stem_stats().hits == 2


def test_a_dead_stem_is_replaced_and_the_run_still_works(
    stems_only: ProcessSandbox, root: Path
) -> None:
    workspace = _workspace(stems_only, root, "ws")
    _wait_ready(stems_only, 2)
    dead = _stem_pids(stems_only)
    for pid in dead:
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not all(_zombie(pid) for pid in dead):  # dead, not yet reaped: what take() meets
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert _run(stems_only, workspace, "print(6 * 7)") == "42\n"
    _wait_ready(stems_only, 2)  # the dead ones were thrown away and new ones started
    assert set(dead).isdisjoint(_stem_pids(stems_only))


def test_closing_leaves_no_stem_process_or_cgroup(root: Path) -> None:
    manager = cgroups_mod.detect()
    if manager is None:
        pytest.skip("stems are used only where the server may create cgroups")
    sandbox = _stems_only(root, 3)
    _wait_ready(sandbox, 3)
    pids = _stem_pids(sandbox)
    assert len(pids) == 3
    mine = f"nox-sb-{os.getpid()}-"
    groups = [p for p in manager._memory_root.iterdir() if p.name.startswith(mine)]
    assert len(groups) >= 3
    sandbox.close()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"stem {pid} survived close()"
    deadline = time.monotonic() + 10
    while any(g.exists() for g in groups):
        assert time.monotonic() < deadline, "stem cgroups were not removed"
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def test_a_stem_whose_server_went_away_exits_without_running_anything(root: Path) -> None:
    """The server dies: the options pipe closes empty and bwrap goes on with its static
    options only (no workspace, no /proc, nothing writable but its own tmpfs root). The
    interpreter cannot even open the bootstrap image (/proc/self/fd is not mounted), or, run
    with -c, finds its control pipe closed: it ends at once either way, having run nothing."""
    launcher = _launcher()
    stem = spawn_stem(launcher, None, CEILING)
    sp = stem.sp
    os.close(stem.args)
    os.close(sp.control)
    assert sp.proc.wait(timeout=10) in (0, 2)  # exit(0) from the bootstrap, 2: no image
    assert sp.proc.stdout is not None
    assert sp.proc.stdout.read() == b""
    launcher.close()
    os.close(sp.status)
    for pipe in (sp.proc.stdin, sp.proc.stdout, sp.proc.stderr):
        if pipe is not None:
            pipe.close()


def test_new_maxima_replace_the_stems(stems_only: ProcessSandbox, root: Path) -> None:
    _wait_ready(stems_only, 2)
    before = set(_stem_pids(stems_only))
    stems_only.set_ceiling(Limits(timeout_s=30.0, memory_mib=CEILING.memory_mib // 2))
    _wait_ready(stems_only, 2)
    assert before.isdisjoint(_stem_pids(stems_only))
    workspace = _workspace(stems_only, root, "ws")
    assert _run(stems_only, workspace, "print('ok')") == "ok\n"


# -- the compiled bootstrap image ------------------------------------------------------------
def test_sandboxes_run_the_sealed_image_and_the_program_never_holds_it(
    stems_only: ProcessSandbox, root: Path
) -> None:
    launcher = stems_only._launcher
    assert isinstance(launcher, BwrapLauncher)
    image = launcher._bootstrap.image
    assert image is not None, "the bootstrap image must build on this machine"
    workspace = _workspace(stems_only, root, "ws")
    code = (
        "import os, sys\n"
        f"fd = {image.fd}\n"
        "try:\n    os.fstat(fd); print('open')\nexcept OSError:\n    print('closed')\n"
        "print(sys.argv)\n"
        "print(*sorted(int(n) for n in os.listdir('/proc/self/fd')))\n"
    )
    out = _run(stems_only, workspace, code).splitlines()
    assert out[:2] == ["closed", "['-c']"]
    # stdio, the listing's own descriptor and the bootstrap's status pipe: not the image
    assert image.fd not in map(int, out[2].split())
    assert len(out[2].split()) == 5
    # Sealed: nobody, root included, can write it, even through a new descriptor.
    writable = os.open(f"/proc/self/fd/{image.fd}", os.O_WRONLY)
    try:
        with pytest.raises(PermissionError):
            os.write(writable, b"import os; os.system('evil')\n")
        with pytest.raises(PermissionError):
            os.ftruncate(writable, 0)
    finally:
        os.close(writable)


def test_no_image_falls_back_to_compiling_the_source(root: Path) -> None:
    from nox_api.engine.image import build_image

    assert build_image("/nonexistent/python3", "print(1)") is None
    assert build_image("/usr/bin/false", "print(1)") is None
