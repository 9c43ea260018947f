"""The memory limit and CPU quota of the control group the server runs in.

The group comes from ``/proc/self/cgroup``, where its folder is from ``/proc/self/mountinfo``
(a mount may show only a part of the hierarchy, as in a container). A limit may sit on the
server's own group or on one above it (a server that moved itself into a leaf group, a systemd
slice), so the answer is the tightest limit of the group and every group above it up to the
mount. cgroup v2: ``memory.max`` and ``cpu.max``; v1: ``memory.limit_in_bytes`` and
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``. Unlimited is ``"none"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from noxsdk.models import CgroupLimits

__all__ = ["read_cgroup_limits"]

# v1 reports "no limit" as the largest page-aligned counter (9223372036854771712 with 4 KiB
# pages); anything this large is no limit.
_V1_UNLIMITED = 1 << 62


@dataclass(frozen=True, slots=True)
class _Mount:
    root: str  # the part of the hierarchy the mount shows
    point: Path


def _own_groups(text: str) -> tuple[dict[str, str], str | None]:
    """v1 controller -> group path, and the v2 group path (or None), from /proc/self/cgroup."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
            continue
        for controller in controllers.split(","):
            if controller:
                v1[controller] = path
    return v1, v2


def _mounts(text: str) -> tuple[dict[str, _Mount], _Mount | None]:
    """v1 controller -> mount, and the v2 mount (or None), from /proc/self/mountinfo."""
    v1: dict[str, _Mount] = {}
    v2: _Mount | None = None
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if not sep or len(fields) < 5 or len(rfields) < 3:
            continue
        mount = _Mount(root=fields[3], point=Path(fields[4]))
        if rfields[0] == "cgroup2" and v2 is None:
            v2 = mount
        elif rfields[0] == "cgroup":
            for option in rfields[2].split(","):
                v1.setdefault(option, mount)
    return v1, v2


def _chain(mount: _Mount, group: str) -> list[Path]:
    """The group's folder and every folder above it up to the mount point, innermost first."""
    path = PurePosixPath(group)
    root = PurePosixPath(mount.root)
    if mount.root != "/" and (path == root or root in path.parents):
        path = PurePosixPath("/") / path.relative_to(root)
    folder = mount.point / str(path).lstrip("/")
    if not folder.is_dir():  # a namespaced view that /proc/self/cgroup does not match
        folder = mount.point
    chain = [folder]
    while folder != mount.point and mount.point in folder.parents:
        folder = folder.parent
        chain.append(folder)
    return chain


def _read(folder: Path, name: str) -> str | None:
    try:
        return (folder / name).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _memory_v1(chain: list[Path]) -> float:
    limit = math.inf
    for folder in chain:
        text = _read(folder, "memory.limit_in_bytes")
        if text is not None and text.lstrip("-").isdigit() and 0 <= int(text) < _V1_UNLIMITED:
            limit = min(limit, int(text))
    return limit


def _memory_v2(chain: list[Path]) -> float:
    limit = math.inf
    for folder in chain:
        text = _read(folder, "memory.max")
        if text is not None and text.isdigit():
            limit = min(limit, int(text))
    return limit


def _cpu_v1(chain: list[Path]) -> float:
    cores = math.inf
    for folder in chain:
        quota, period = _read(folder, "cpu.cfs_quota_us"), _read(folder, "cpu.cfs_period_us")
        if quota and period and quota.isdigit() and period.isdigit() and int(period) > 0:
            cores = min(cores, int(quota) / int(period))
    return cores


def _cpu_v2(chain: list[Path]) -> float:
    cores = math.inf
    for folder in chain:
        text = _read(folder, "cpu.max")
        if text is None:
            continue
        quota, _, period = text.partition(" ")
        if quota.isdigit() and period.isdigit() and int(period) > 0:
            cores = min(cores, int(quota) / int(period))
    return cores


def read_cgroup_limits(
    proc_cgroup: Path = Path("/proc/self/cgroup"),
    mountinfo: Path = Path("/proc/self/mountinfo"),
) -> CgroupLimits | None:
    """The limits of this process's control group; None when there is none to read."""
    try:
        own_v1, own_v2 = _own_groups(proc_cgroup.read_text())
        mounts_v1, mount_v2 = _mounts(mountinfo.read_text())
    except (OSError, UnicodeDecodeError):
        return None
    memory = cpu = math.inf
    used_v1 = found = False
    # On a hybrid host the controllers sit in v1 hierarchies and the v2 one has none: each
    # controller is read where it is attached.
    if "memory" in own_v1 and "memory" in mounts_v1:
        memory, used_v1, found = (
            _memory_v1(_chain(mounts_v1["memory"], own_v1["memory"])),
            True,
            True,
        )
    elif own_v2 is not None and mount_v2 is not None:
        memory, found = _memory_v2(_chain(mount_v2, own_v2)), True
    if "cpu" in own_v1 and "cpu" in mounts_v1:
        cpu, used_v1, found = _cpu_v1(_chain(mounts_v1["cpu"], own_v1["cpu"])), True, True
    elif own_v2 is not None and mount_v2 is not None:
        cpu, found = _cpu_v2(_chain(mount_v2, own_v2)), True
    if not found:
        return None
    return CgroupLimits(
        version="v1" if used_v1 else "v2",
        memory_limit_bytes="none" if math.isinf(memory) else int(memory),
        cpu_quota_cores="none" if math.isinf(cpu) else round(cpu, 3),
    )
