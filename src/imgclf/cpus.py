"""How many CPU cores this process may really use: its affinity mask, capped by a container's CPU quota.

Decoding workers, DataLoader workers, compute threads and env.json all ask here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["usable_cpus"]


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPU cores this process may run on: its affinity mask, capped by a cgroup CPU quota (a container started
    with `--cpus 2` on a 64-core host sees 64 cores, and 64 compute threads there run far slower than 2).

    Example:
        >>> usable_cpus() >= 1
        True
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_cpu_quota(cgroup: Path) -> float | None:
    """CPUs' worth of time the cgroup allows (v2 `cpu.max`, or v1's cfs files); None when unlimited or unknown."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        return int(quota) / int(period) if int(quota) > 0 else None
    except (ValueError, ZeroDivisionError):
        return None  # "max": no quota
