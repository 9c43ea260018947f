"""Per-sandbox control groups: memory, process count and CPU accounting.

Used when the server may create cgroups (root, or a delegated cgroup v2 subtree); otherwise the
engine falls back to rlimits and :func:`detect` returns ``None``. Each sandbox gets its own group
below the server's own, named ``nox-sb-<id>``, so that a memory limit and a process limit hold for
the whole process tree of one run, not for a single process, and so that a kill reaches every
process of the run.

cgroup v1 (one hierarchy per controller, "hybrid" hosts) and v2 (one unified hierarchy) are both
handled. A sandbox joins its group before it execs (see ``process.spawn``), so no process of
a sandbox ever runs outside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Cgroup", "CgroupManager", "detect"]

_PREFIX = "nox-sb-"

log = logging.getLogger("nox.engine.cgroups")


def _own_paths() -> dict[str, str]:
    """Controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _hier, controllers, path = line.split(":", 2)
        if controllers == "":
            paths[""] = path
        for ctrl in controllers.split(","):
            if ctrl:
                paths[ctrl] = path
    return paths


def _mounts() -> dict[str, Path]:
    """Controller (or "" for the v2 hierarchy) -> mount point, from /proc/self/mountinfo."""
    found: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        mount_point, fstype, options = Path(fields[4]), rfields[0], rfields[2]
        if fstype == "cgroup2":
            found.setdefault("", mount_point)
        elif fstype == "cgroup":
            for opt in options.split(","):
                if opt in ("memory", "pids", "cpuacct"):
                    found.setdefault(opt, mount_point)
    return found


def _write(path: Path, value: str) -> None:
    with path.open("w") as fh:
        fh.write(value)


@dataclass
class Cgroup:
    """One sandbox's group; in v1 a folder per controller, in v2 one folder."""

    version: str
    memory: Path
    pids: Path
    cpu: Path | None  # cpuacct (v1) or the v2 folder

    @property
    def folders(self) -> list[Path]:
        seen: list[Path] = []
        for folder in (self.memory, self.pids, self.cpu):
            if folder is not None and folder not in seen:
                seen.append(folder)
        return seen

    def join_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes its pid into to join the group."""
        return [str(folder / "cgroup.procs") for folder in self.folders]

    def set_limits(self, memory_bytes: int, processes: int) -> None:
        if self.version == "v1":
            memsw = self.memory / "memory.memsw.limit_in_bytes"
            if not memsw.exists():
                _write(self.memory / "memory.limit_in_bytes", str(memory_bytes))
            else:  # swap accounting on: memory + swap capped at the same figure; the kernel
                # wants memory <= memory+swap at every step, so the order depends on the way
                try:
                    _write(self.memory / "memory.limit_in_bytes", str(memory_bytes))
                    _write(memsw, str(memory_bytes))
                except OSError:  # raising: memory+swap first
                    _write(memsw, str(memory_bytes))
                    _write(self.memory / "memory.limit_in_bytes", str(memory_bytes))
        else:
            _write(self.memory / "memory.max", str(memory_bytes))
            swap = self.memory / "memory.swap.max"
            if swap.exists():
                _write(swap, "0")
        _write(self.pids / "pids.max", str(processes))

    def oom_kills(self) -> int:
        """How many processes of this group the kernel's OOM killer has ended."""
        name = "memory.oom_control" if self.version == "v1" else "memory.events"
        try:
            text = (self.memory / name).read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def cpu_ns(self) -> int | None:
        """CPU time used by the group so far, in nanoseconds."""
        if self.cpu is None:
            return None
        try:
            if self.version == "v1":
                return int((self.cpu / "cpuacct.usage").read_text())
            for line in (self.cpu / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) * 1000
        except (OSError, ValueError):
            return None
        return None

    def pids_in(self) -> list[int]:
        try:
            text = (self.pids / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def kill_all(self, *, wait: bool = True) -> None:
        """SIGKILL every process of the group, including ones forked while we kill; with
        ``wait=False`` one pass only, without waiting for them to go."""
        kill_file = self.pids / "cgroup.kill"
        if self.version == "v2" and kill_file.exists():
            with contextlib.suppress(OSError):
                _write(kill_file, "1")
            return
        for _ in range(20):
            pids = self.pids_in()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if not wait:
                return
            time.sleep(0.005)

    def remove(self) -> None:
        """Delete the group's folders; a group with processes left is killed first."""
        for attempt in range(50):
            busy = False
            for folder in self.folders:
                try:
                    folder.rmdir()
                except FileNotFoundError:
                    continue
                except OSError:
                    busy = True
            if not busy:
                return
            if attempt == 0:
                self.kill_all()
            time.sleep(0.01)


class CgroupManager:
    """Creates sandbox groups below the server's own group, and removes them off the request
    path: deleting a memory cgroup takes several milliseconds, a run's answer need not wait."""

    def __init__(self, version: str, memory_root: Path, pids_root: Path, cpu_root: Path | None):
        self.version = version
        self._memory_root = memory_root
        self._pids_root = pids_root
        self._cpu_root = cpu_root
        self._doomed: queue.SimpleQueue[Cgroup] = queue.SimpleQueue()
        self._janitor: threading.Thread | None = None
        self._janitor_lock = threading.Lock()

    def release(self, group: Cgroup) -> None:
        """Kill what is left in ``group`` and remove it in the background."""
        with self._janitor_lock:
            if self._janitor is None:
                self._janitor = threading.Thread(
                    target=self._remove_forever, name="nox-cgroup-janitor", daemon=True
                )
                self._janitor.start()
        self._doomed.put(group)

    def _remove_forever(self) -> None:
        while True:
            group = self._doomed.get()
            try:
                group.remove()
            except Exception:  # never let one stuck group stop the janitor
                log.exception("removing cgroup %s failed", group.memory)

    def create(self, sandbox_id: str) -> Cgroup:
        # The server's pid in the name tells whose group it is: several servers (blue and
        # green during a release, say) may share a parent group.
        name = f"{_PREFIX}{os.getpid()}-{sandbox_id}"
        memory = self._memory_root / name
        pids = self._pids_root / name
        cpu = self._cpu_root / name if self._cpu_root is not None else None
        group = Cgroup(self.version, memory, pids, cpu)
        for folder in group.folders:
            folder.mkdir()
        return group

    def cleanup_stale(self) -> int:
        """Kill and remove groups left by servers that died; returns how many. Groups of a
        server that is still running are left alone."""
        roots = {self._memory_root, self._pids_root}
        if self._cpu_root is not None:
            roots.add(self._cpu_root)
        names: set[str] = set()
        for root in roots:
            with contextlib.suppress(OSError):
                names.update(
                    p.name
                    for p in root.iterdir()
                    if p.name.startswith(_PREFIX) and not _owner_alive(p.name)
                )
        for name in names:
            cpu = self._cpu_root / name if self._cpu_root is not None else None
            Cgroup(self.version, self._memory_root / name, self._pids_root / name, cpu).remove()
        return len(names)


def _owner_alive(name: str) -> bool:
    """Is the server that created group ``name`` (``nox-sb-<pid>-<id>``) still running?"""
    pid_text = name.removeprefix(_PREFIX).partition("-")[0]
    if not pid_text.isdigit():
        return False  # an older naming scheme or garbage: nobody owns it
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _probe(folder: Path) -> bool:
    """Can we create (and remove) a group here?"""
    test = folder / f"{_PREFIX}probe-{os.getpid()}"
    try:
        test.mkdir()
    except OSError:
        return False
    with contextlib.suppress(OSError):
        test.rmdir()
    return True


def _detect_v1(mounts: dict[str, Path], own: dict[str, str]) -> CgroupManager | None:
    if "memory" not in mounts or "pids" not in mounts:
        return None
    memory_root = mounts["memory"] / own.get("memory", "/").lstrip("/")
    pids_root = mounts["pids"] / own.get("pids", "/").lstrip("/")
    if not (_probe(memory_root) and _probe(pids_root)):
        return None
    cpu_root: Path | None = None
    if "cpuacct" in mounts:
        candidate = mounts["cpuacct"] / own.get("cpuacct", "/").lstrip("/")
        cpu_root = candidate if _probe(candidate) else None
    return CgroupManager("v1", memory_root, pids_root, cpu_root)


def _detect_v2(mounts: dict[str, Path], own: dict[str, str]) -> CgroupManager | None:
    if "" not in mounts or "" not in own:
        return None
    base = mounts[""] / own[""].lstrip("/")
    try:
        available = (base / "cgroup.controllers").read_text().split()
    except OSError:
        return None
    if "memory" not in available or "pids" not in available:
        return None
    try:
        enabled = (base / "cgroup.subtree_control").read_text().split()
        if "memory" not in enabled or "pids" not in enabled:
            # "No internal processes": move the server into a leaf of its own first, as a
            # service with systemd's Delegate=yes does, then enable the controllers below.
            leaf = base / "nox-server"
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", str(os.getpid()))
            _write(base / "cgroup.subtree_control", "+memory +pids")
            with contextlib.suppress(OSError):  # CPU accounting is a bonus, not a need
                _write(base / "cgroup.subtree_control", "+cpu")
    except OSError:
        return None
    if not _probe(base):
        return None
    return CgroupManager("v2", base, base, base)


def detect() -> CgroupManager | None:
    """A manager when this process may create cgroups with memory and pids control, else None."""
    try:
        mounts = _mounts()
        own = _own_paths()
    except OSError:
        return None
    v1 = _detect_v1(mounts, own)
    if v1 is not None:
        return v1
    return _detect_v2(mounts, own)
