"""Start a sandbox process, give it its orders, and supervise it to the end.

A sandbox starts as an interpreter running ``_bootstrap.py`` that blocks on a control pipe, so
it can be started ahead of time (see :mod:`.pool`). :func:`supervise` then writes the orders and
standard input, reads standard output and error up to their caps, and stops the run at its wall
time or when the output passes the hard cap. Everything goes through one ``select`` loop over
non-blocking pipes and a pidfd, so a run costs no extra threads and the server's memory is bounded
by the caps whatever the program prints.
"""

from __future__ import annotations

import contextlib
import logging
import marshal
import os
import queue
import selectors
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Protocol

from nox_api.engine import seccomp
from nox_api.engine.base import MIB, Limits, Result, RunSpec
from nox_api.engine.cgroups import Cgroup, CgroupManager
from nox_api.engine.quiet import QuietGate
from noxsdk.models import ExecutionStatus

__all__ = [
    "BASE_ENV", "Launcher", "SandboxProcess", "Stem", "bootstrap_source", "grow", "spawn",
    "spawn_stem", "supervise", "tree_cpu_ms",
]  # fmt: skip

_CHUNK = 65536

BASE_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TMPDIR": "/tmp",
    "PYTHONIOENCODING": "utf-8",
}
log = logging.getLogger("nox.engine")

_STRAGGLER_GRACE_S = 0.2  # after the main process exits, how long leftover writers may hold a pipe


def bootstrap_source() -> str:
    return resources.files("nox_api.engine").joinpath("_bootstrap.py").read_text()


class Launcher(Protocol):
    """Builds the command line that starts one sandbox around the bootstrap."""

    uses_seccomp: bool
    memory_by_rlimit: bool  # no cgroup: the memory limit is RLIMIT_AS inside the sandbox
    supports_stems: bool  # can start a sandbox before its workspace is known (see Stem)

    @property
    def inherited_fds(self) -> tuple[int, ...]:
        """Descriptors every sandbox inherits (the bootstrap image)."""

    def command(
        self, workspace: Path, bootstrap_fds: Sequence[int], seccomp_fd: int | None, limits: Limits
    ) -> list[str]:
        """``bootstrap_fds`` (the control and status pipes) are the bootstrap's arguments."""

    def stem_command(
        self, bootstrap_fds: Sequence[int], seccomp_fd: int | None, args_fd: int
    ) -> list[str]:
        """Like :meth:`command`, with the options of :meth:`stem_args` read from ``args_fd``
        later (only called when ``supports_stems``)."""

    def stem_args(self, workspace: Path, limits: Limits) -> list[str]: ...

    def environment(self) -> dict[str, str]: ...

    def close(self) -> None:
        """Release what the launcher holds for its sandboxes."""

    def prepare_workspace(self, workspace: Path) -> None:
        """Make a new workspace folder usable by the sandbox's user."""

    def hint(self, detail: str) -> str:
        """A sentence that tells how to fix a failed start, given what the launcher printed."""


@dataclass
class SandboxProcess:
    """A started sandbox that waits for its orders on ``control``."""

    proc: subprocess.Popen[bytes]
    control: int
    status: int  # the bootstrap's report: "<exit code> <cpu ms>\n" when Python code is done
    workspace: Path
    cgroup: Cgroup | None
    cgroups: CgroupManager | None = None
    created: float = field(default_factory=time.monotonic)

    def release_cgroup(self) -> None:
        if self.cgroup is not None and self.cgroups is not None:
            self.cgroups.release(self.cgroup)
        elif self.cgroup is not None:
            self.cgroup.remove()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def discard(self) -> None:
        """Stop it unused (pool expiry, shutdown) and release everything it holds."""
        os.close(self.control)
        os.close(self.status)
        _kill(self)
        _reap(self.proc)
        _close_pipes(self.proc)
        self.release_cgroup()


# Joins the sandbox's cgroups, then becomes the sandbox. A shell of a few hundred microseconds
# instead of Popen(preexec_fn=...): a preexec function forces a full fork() of the server
# (8-13 ms here, with every server thread frozen meanwhile) where vfork() takes about one.
# The process joins before exec, so nothing of the sandbox ever runs outside its group.
_JOIN_SCRIPT = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); '
    'done; exec "$@"'
)


def _join_cgroup_argv(files: list[str]) -> list[str]:
    return ["/bin/sh", "-c", _JOIN_SCRIPT, "nox-join", str(len(files)), *files]


def spawn(
    launcher: Launcher,
    workspace: Path,
    cgroups: CgroupManager | None,
    ceiling: Limits,
    *,
    nice: int = 0,
) -> SandboxProcess:
    """Start a sandbox for ``workspace``; its limits start at ``ceiling`` and are narrowed
    to the run's own when it is used. A ``nice`` start (the warm pool's) yields the CPU to
    running requests; the bootstrap takes the normal priority back when it gets its orders."""
    return _start(
        lambda fds, seccomp_fd: launcher.command(workspace, fds, seccomp_fd, ceiling),
        launcher, workspace, cgroups, ceiling, nice=nice,
    )  # fmt: skip


@dataclass
class Stem:
    """A sandbox started as far as it goes without its workspace: its cgroup made and joined,
    its user switched, bwrap waiting for the rest of its options on the ``args`` pipe. Joining
    a cgroup v1 waits for an RCU grace period in the kernel (10-15 ms on this kind of VM), which
    is most of what a cold start costs beyond the namespaces and the interpreter; a stem pays
    it ahead of time, for whichever workspace needs a sandbox next. Used once, by :func:`grow`.
    """

    sp: SandboxProcess  # its workspace is a placeholder until grown
    args: int

    def alive(self) -> bool:
        return self.sp.alive()

    def discard(self) -> None:
        """Kill it before its options pipe closes: an empty one would let bwrap go on."""
        try:
            self.sp.discard()
        finally:
            with contextlib.suppress(OSError):
                os.close(self.args)


def spawn_stem(launcher: Launcher, cgroups: CgroupManager | None, ceiling: Limits) -> Stem:
    """Start a :class:`Stem` (the launcher must support them)."""
    args_r, args_w = os.pipe()
    try:
        sp = _start(
            lambda fds, seccomp_fd: launcher.stem_command(fds, seccomp_fd, args_r),
            launcher, Path("/nonexistent"), cgroups, ceiling, extra_fds=(args_r,),
        )  # fmt: skip
    except BaseException:
        os.close(args_w)
        raise
    finally:
        os.close(args_r)
    return Stem(sp, args_w)


def grow(stem: Stem, launcher: Launcher, workspace: Path, ceiling: Limits) -> SandboxProcess:
    """Give ``stem`` the options that bind ``workspace``: it becomes a started sandbox, as
    :func:`spawn` would have made it. Raises OSError (the stem is discarded) when it died."""
    data = b"".join(os.fsencode(arg) + b"\0" for arg in launcher.stem_args(workspace, ceiling))
    try:
        view = memoryview(data)
        while view:  # a few hundred bytes into an empty pipe: one write
            view = view[os.write(stem.args, view) :]
    except OSError:
        stem.discard()
        raise
    os.close(stem.args)
    stem.sp.workspace = workspace
    return stem.sp


def _start(
    build: Callable[[Sequence[int], int | None], list[str]],
    launcher: Launcher,
    workspace: Path,
    cgroups: CgroupManager | None,
    ceiling: Limits,
    *,
    nice: int = 0,
    extra_fds: Sequence[int] = (),
) -> SandboxProcess:
    control_r, control_w = os.pipe()
    status_r, status_w = os.pipe()
    seccomp_fd = seccomp.filter_fd() if launcher.uses_seccomp else None
    group = cgroups.create(uuid.uuid4().hex[:16]) if cgroups is not None else None
    try:
        if group is not None:
            group.set_limits(ceiling.memory_mib * MIB, ceiling.processes)
        argv = build((control_r, status_w), seccomp_fd)
        pass_fds = [control_r, status_w, *extra_fds, *launcher.inherited_fds]
        if seccomp_fd is not None:
            pass_fds.append(seccomp_fd)
        if nice:
            argv = ["/usr/bin/nice", "-n", str(nice), *argv]
        if group is not None:
            argv = [*_join_cgroup_argv(group.join_files()), *argv]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            pass_fds=pass_fds,
            start_new_session=True,
            env=launcher.environment(),
            cwd="/",
        )
    except BaseException:
        os.close(control_w)
        os.close(status_r)
        if group is not None:
            group.remove()
        raise
    finally:
        os.close(control_r)
        os.close(status_w)
        if seccomp_fd is not None:
            os.close(seccomp_fd)
    return SandboxProcess(proc, control_w, status_r, workspace, group, cgroups)


def _orders(spec: RunSpec, memory_by_rlimit: bool) -> bytes:
    lim = spec.limits
    rlimits = {
        "RLIMIT_CPU": lim.cpu_s,
        "RLIMIT_FSIZE": lim.file_size_mib * MIB,
        "RLIMIT_NOFILE": lim.open_files,
        "RLIMIT_CORE": 0,
    }
    if memory_by_rlimit:
        rlimits["RLIMIT_AS"] = lim.memory_mib * MIB
        rlimits["RLIMIT_NPROC"] = lim.processes
    env = {**BASE_ENV, **spec.env}  # Nox's minimal base, then the caller's additions
    doc = {"kind": spec.kind, "source": spec.source, "env": env, "rlimits": rlimits}
    return marshal.dumps(doc, 4)  # read by _bootstrap.py; version 4 is read by Python >= 3.4


class _Stream:
    __slots__ = ("cap", "data", "truncated")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        room = self.cap - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        self.data += chunk


def _kill(sp: SandboxProcess, *, wait: bool = True) -> None:
    """Kill the whole tree: the session (launcher and, without namespaces, the program), then
    the cgroup. With bwrap, killing the monitor takes the pid namespace down with it
    (``--die-with-parent``)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sp.proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        sp.proc.kill()
    if sp.cgroup is not None:
        sp.cgroup.kill_all(wait=wait)


class _Reaper:
    """Finishes sandboxes off the request path: after Python code reported its end, the answer
    need not wait for the sandbox's processes and namespaces to be torn down (about 4 ms)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[SandboxProcess, QuietGate | None]] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, sp: SandboxProcess, quiet: QuietGate | None = None) -> None:
        """Tear ``sp`` down once ``quiet`` lets (runs being answered go first)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="nox-reaper", daemon=True)
                self._thread.start()
        self._queue.put((sp, quiet))

    def _loop(self) -> None:
        while True:
            sp, quiet = self._queue.get()
            if quiet is not None:
                quiet.wait()
            try:
                _kill(sp)
                _reap(sp.proc)
                sp.release_cgroup()
            except Exception:  # one stuck sandbox must not stop the others being reaped
                log.exception("reaping sandbox %s failed", sp.proc.pid)


_reaper = _Reaper()


def _reap(proc: subprocess.Popen[bytes]) -> tuple[int, float | None]:
    """Wait for the process; returns (shell-style exit code, CPU ms from rusage or None)."""
    if proc.returncode is not None:
        return _shell_code(proc.returncode), None
    try:
        _pid, status, usage = os.wait4(proc.pid, 0)
    except ChildProcessError:  # reaped elsewhere (Popen.poll during a liveness check)
        return _shell_code(proc.wait()), None
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    return _shell_code(code), (usage.ru_utime + usage.ru_stime) * 1000.0


def tree_cpu_ms(root: int) -> float | None:
    """CPU time used so far by process ``root`` and every live descendant (their own and
    their reaped children's), from ``/proc``; None when ``root`` is gone. It is what the
    kernel counted, so a program cannot lower it; the clock tick (10 ms) is its resolution."""
    total_ticks = 0
    pending = [root]
    seen: set[int] = set()
    while pending:
        pid = pending.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                fields = fh.read().rpartition(b")")[2].split()
            # after the name: state(3) ... utime(14) stime(15) cutime(16) cstime(17)
            total_ticks += sum(int(v) for v in fields[11:15])
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children", "rb") as fh:
                    pending.extend(int(child) for child in fh.read().split())
        except (OSError, ValueError):
            if pid == root:
                return None
    return total_ticks * 1000.0 / _CLOCK_TICKS


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _shell_code(code: int) -> int:
    return 128 - code if code < 0 else code


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


class _Pump:
    """The select loop of one run: feeds the orders and stdin, drains stdout and stderr, and
    notices the exit through a pidfd. Owns the descriptors it was given until :meth:`close`."""

    def __init__(self, sp: SandboxProcess, orders: bytes, stdin: bytes, lim: Limits) -> None:
        proc = sp.proc
        if proc.stdin is None or proc.stdout is None or proc.stderr is None:
            raise RuntimeError("a sandbox process must have all three standard pipes")
        self._sp = sp
        self._lim = lim
        self._stdin = proc.stdin
        self._control_open = True
        self.writers: dict[int, memoryview] = {sp.control: memoryview(orders)}
        if stdin:
            self.writers[proc.stdin.fileno()] = memoryview(stdin)
        else:
            proc.stdin.close()
        self.out = _Stream(lim.output_bytes)
        self.err = _Stream(lim.output_bytes)
        self.readers = {proc.stdout.fileno(): self.out, proc.stderr.fileno(): self.err}
        self.total_out = 0
        self.reported: tuple[int, float] | None = None  # (exit code, cpu ms) from the bootstrap
        self._status = bytearray()
        self.sel = selectors.DefaultSelector()
        self.pidfd = os.pidfd_open(proc.pid)
        self.sel.register(self.pidfd, selectors.EVENT_READ)
        os.set_blocking(sp.status, False)
        self.sel.register(sp.status, selectors.EVENT_READ)
        for fd in self.writers:
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_WRITE)
        for fd in self.readers:
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ)

    def run(self, deadline: float) -> str | None:
        """Pump until the program reported its end ("done"), or exited and its pipes closed
        (None), or was stopped early ("timeout", "output")."""
        exited_at: float | None = None
        while self.readers or exited_at is None:
            now = time.monotonic()
            if now >= deadline:
                return "timeout"
            wait = deadline - now
            if exited_at is not None:
                if now - exited_at >= _STRAGGLER_GRACE_S:
                    return None  # something outlived the program and holds its pipes
                wait = min(wait, _STRAGGLER_GRACE_S)
            for key, _mask in self.sel.select(wait):
                if key.fd == self.pidfd:
                    self.sel.unregister(self.pidfd)
                    exited_at = time.monotonic()
                elif key.fd == self._sp.status:
                    if self._read_status():
                        return self._drain()
                elif key.fd in self.writers:
                    self._write(key.fd)
                elif key.fd in self.readers and self._read(key.fd):
                    return "output"
        return None

    def _write(self, fd: int) -> None:
        view = self.writers[fd]
        try:
            sent = os.write(fd, view[:_CHUNK])
        except BlockingIOError:
            return
        except OSError:  # the program closed its end or died: stop feeding it
            sent = len(view)
        self.writers[fd] = view = view[sent:]
        if not view:
            del self.writers[fd]
            self.sel.unregister(fd)
            if fd == self._sp.control:
                os.close(fd)
                self._control_open = False
            else:
                self._stdin.close()

    def _read_status(self) -> bool:
        """Read the bootstrap's report; True once a whole, sane one arrived. Anything else
        (the shell replaced the bootstrap, a program scribbling on the pipe) leaves the run to
        end the ordinary way."""
        try:
            chunk = os.read(self._sp.status, 64)
        except BlockingIOError:
            return False
        if not chunk or len(self._status) > 64:
            self.sel.unregister(self._sp.status)
            return False
        self._status += chunk
        line, newline, _rest = bytes(self._status).partition(b"\n")
        if not newline:
            return False
        self.sel.unregister(self._sp.status)
        try:
            code_text, cpu_text = line.decode("ascii").split()
            self.reported = (int(code_text), float(cpu_text))
        except ValueError:
            return False
        return True

    def _drain(self) -> str:
        """After the report: everything the program wrote is already in the pipes."""
        for fd in list(self.readers):
            while fd in self.readers:
                try:
                    chunk = os.read(fd, _CHUNK)
                except BlockingIOError:
                    break
                if self._take(fd, chunk):
                    return "output"
        return "done"

    def _read(self, fd: int) -> bool:
        """Read a chunk; True when the output passed the hard cap."""
        try:
            chunk = os.read(fd, _CHUNK)
        except BlockingIOError:
            return False
        return self._take(fd, chunk)

    def _take(self, fd: int, chunk: bytes) -> bool:
        if not chunk:
            del self.readers[fd]
            self.sel.unregister(fd)
            return False
        self.total_out += len(chunk)
        self.readers[fd].add(chunk)
        return self.total_out > self._lim.output_hard_bytes

    def close(self) -> None:
        self.sel.close()
        os.close(self.pidfd)
        if self._control_open:
            os.close(self._sp.control)
        os.close(self._sp.status)
        _close_pipes(self._sp.proc)


def supervise(
    sp: SandboxProcess,
    spec: RunSpec,
    memory_by_rlimit: bool,
    warm: bool,
    quiet: QuietGate | None = None,
) -> Result:
    """Run ``spec`` in the started sandbox ``sp`` and return its :class:`Result`. A sandbox
    whose program reported its end is killed at once and torn down when ``quiet`` lets."""
    lim = spec.limits
    group = sp.cgroup
    cpu_base = oom_base = 0
    if group is not None:
        group.set_limits(lim.memory_mib * MIB, lim.processes)
        cpu_base = group.cpu_ns() or 0
        oom_base = group.oom_kills()

    pump = _Pump(sp, _orders(spec, memory_by_rlimit), spec.stdin, lim)
    reported = False  # the program reported its end: the sandbox is torn down off the path
    cpu_ms: float | None
    try:
        start = time.monotonic()
        stop_reason = pump.run(start + lim.timeout_s)
        duration_ms = (time.monotonic() - start) * 1000.0
        if stop_reason == "done" and pump.reported is not None:
            # The program is over: what it left behind is killed now, without waiting.
            reported = True
            exit_code, cpu_ms = pump.reported
            if group is None:  # no cgroup counts the CPU: do not take the program's word
                cpu_ms = max(cpu_ms, tree_cpu_ms(sp.proc.pid) or 0.0)
            stop_reason = None
            _kill(sp, wait=False)
        else:
            if stop_reason is not None or pump.readers:
                _kill(sp)
            exit_code, cpu_ms = _reap(sp.proc)
    finally:
        if sp.proc.returncode is None and not reported:  # never leave one running
            _kill(sp)
            _reap(sp.proc)
        pump.close()

    oom = False
    if group is not None:
        cpu_now = group.cpu_ns()
        if cpu_now is not None:
            cpu_ms = (cpu_now - cpu_base) / 1e6
        oom = group.oom_kills() > oom_base
    if reported:
        _reaper.submit(sp, quiet)  # kills, reaps and releases the cgroup
    else:
        sp.release_cgroup()

    stopped_for_output = stop_reason == "output"
    return Result(
        status=_status(
            stop_reason,
            exit_code,
            oom=oom,
            cpu_ms=cpu_ms,
            lim=lim,
            memory_by_rlimit=memory_by_rlimit,
            stderr=pump.err.data,
        ),
        exit_code=exit_code,
        stdout=bytes(pump.out.data),
        stderr=bytes(pump.err.data),
        stdout_truncated=pump.out.truncated or stopped_for_output,
        stderr_truncated=pump.err.truncated or stopped_for_output,
        duration_ms=round(duration_ms, 3),
        cpu_ms=None if cpu_ms is None else round(cpu_ms, 3),
        warm=warm,
    )


def _status(  # noqa: PLR0911 - one return per status reads best
    stop_reason: str | None,
    exit_code: int,
    *,
    oom: bool,
    cpu_ms: float | None,
    lim: Limits,
    memory_by_rlimit: bool,
    stderr: bytes | bytearray,
) -> ExecutionStatus:
    if stop_reason == "output":
        return ExecutionStatus.OUTPUT_LIMIT
    if stop_reason == "timeout":
        return ExecutionStatus.TIMEOUT
    if oom:
        return ExecutionStatus.MEMORY_LIMIT
    if exit_code == 128 + signal.SIGXCPU or (
        exit_code == 128 + signal.SIGKILL and cpu_ms is not None and cpu_ms >= lim.cpu_s * 1000
    ):
        return ExecutionStatus.TIMEOUT
    if exit_code == 0:
        return ExecutionStatus.OK
    if memory_by_rlimit and stderr.rstrip().endswith(b"MemoryError"):
        return ExecutionStatus.MEMORY_LIMIT
    if 128 < exit_code <= 128 + 64:
        return ExecutionStatus.KILLED
    return ExecutionStatus.ERROR
