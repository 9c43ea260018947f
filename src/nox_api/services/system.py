"""The machine as the server sees it (``GET /api/system/resources``): CPU use, load average,
memory, the disk of the data folder and the limits of the server's control group.

CPU use is the share of busy time over all CPUs since the previous sample, from the kernel's
counters (``psutil.cpu_times``), with a baseline of its own taken at start: a request never
sleeps to measure it, except the very first ones within ``cpu_min_interval_s`` of start, which
wait out the rest of that interval. Requests closer together than ``cpu_min_interval_s`` share
one sample (a shorter window would be noise).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from nox_api.services.cgroup_limits import read_cgroup_limits
from noxsdk.models import CgroupLimits, DiskUsage, MemoryUsage, SystemResources

__all__ = ["SystemMonitor", "busy_percent"]


def _busy_and_total(times: Any) -> tuple[float, float]:
    """Busy and total CPU seconds of a ``psutil.cpu_times()`` sample. Guest time is already
    counted in user time on Linux; idle and I/O wait are not busy."""
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    idle = times.idle + getattr(times, "iowait", 0.0)
    return total - idle, total


def busy_percent(before: Any, after: Any) -> float:
    """Busy share of all CPUs between two ``psutil.cpu_times()`` samples, 0 to 100."""
    busy0, total0 = _busy_and_total(before)
    busy1, total1 = _busy_and_total(after)
    elapsed = total1 - total0
    if elapsed <= 0:
        return 0.0
    return round(min(100.0, max(0.0, (busy1 - busy0) / elapsed * 100.0)), 1)


class SystemMonitor:
    def __init__(
        self,
        data_path: Path,
        *,
        cpu_min_interval_s: float = 0.25,
        cgroup_limits: Callable[[], CgroupLimits | None] = read_cgroup_limits,
    ) -> None:
        self._data_path = data_path
        self._min_interval_s = cpu_min_interval_s
        self._cgroup_limits = cgroup_limits
        self._lock = threading.Lock()
        self._baseline = psutil.cpu_times()
        self._baseline_at = time.monotonic()
        self._last: float | None = None

    def cpu_percent(self) -> float:
        with self._lock:
            waited = time.monotonic() - self._baseline_at
            if waited < self._min_interval_s:
                if self._last is not None:
                    return self._last
                time.sleep(self._min_interval_s - waited)  # only right after start
            now = psutil.cpu_times()
            self._last = busy_percent(self._baseline, now)
            self._baseline, self._baseline_at = now, time.monotonic()
            return self._last

    def resources(self) -> SystemResources:
        memory = psutil.virtual_memory()
        disk = psutil.disk_usage(str(self._data_path))
        return SystemResources(
            cpu_percent=self.cpu_percent(),
            cpu_count=psutil.cpu_count() or os.cpu_count() or 1,
            load_average=[round(x, 2) for x in psutil.getloadavg()],
            memory=MemoryUsage(
                total_bytes=memory.total,
                available_bytes=memory.available,
                used_percent=memory.percent,
            ),
            disk=DiskUsage(
                total_bytes=disk.total,
                used_bytes=disk.used,
                free_bytes=disk.free,
                used_percent=disk.percent,
            ),
            cgroup=self._cgroup_limits(),
        )
