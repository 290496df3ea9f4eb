"""``GET /metrics``: a snapshot of the guest's resource use, in envd's field names.

Besides envd's fields, ``cpu_ticks_total`` and ``cpu_ticks_idle`` are the raw counters of the
first line of ``/proc/stat`` (USER_HZ ticks of all CPUs since the guest booted): the host's
sampler (``trenvx.sandbox.metrics_sampler``) computes CPU use between its own samples from them,
so that other callers of ``/metrics`` (each of which moves ``cpu_used_pct``'s window) do not
disturb its figures.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any


class Metrics:
    """CPU use is measured between two calls (the first call reports 0)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[int, int] | None = None

    @staticmethod
    def _cpu_times() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    @staticmethod
    def _memory() -> tuple[int, int, int]:
        info: dict[str, int] = {}
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        total = info.get("MemTotal", 0)
        cache = max(0, info.get("Cached", 0) - info.get("Shmem", 0))  # what dropping caches would free
        return total, total - info.get("MemAvailable", info.get("MemFree", 0)), cache

    def snapshot(self) -> dict[str, Any]:
        cpu_pct = 0.0
        total = idle = 0
        try:
            total, idle = self._cpu_times()
            with self._lock:
                if self._last is not None and total > self._last[0]:
                    busy = (total - self._last[0]) - (idle - self._last[1])
                    cpu_pct = round(100.0 * busy / (total - self._last[0]), 2)
                self._last = (total, idle)
        except (OSError, ValueError, IndexError):
            pass
        try:
            mem_total, mem_used, mem_cache = self._memory()
        except (OSError, ValueError):
            mem_total = mem_used = mem_cache = 0
        try:
            vfs = os.statvfs("/")
            disk_total, disk_used = vfs.f_blocks * vfs.f_frsize, (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize
        except OSError:
            disk_total = disk_used = 0
        return {
            "ts": int(time.time()),
            "cpu_count": os.cpu_count() or 1,
            "cpu_used_pct": cpu_pct,
            "cpu_ticks_total": total,
            "cpu_ticks_idle": idle,
            "mem_total": mem_total,
            "mem_used": mem_used,
            "mem_cache": mem_cache,
            "disk_total": disk_total,
            "disk_used": disk_used,
        }
