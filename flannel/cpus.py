"""The CPU cores this process may actually use: affinity and container quota, not the machine's.

    python -m flannel.cpus

``os.cpu_count()`` counts the machine's cores. A process pinned by ``taskset``/``cpuset`` may run on
fewer, and a container limited by a CFS quota (``docker --cpus 2``, a Kubernetes CPU limit) gets
fewer cores' worth of time however many it can see. Thread pools sized by the machine then
oversubscribe the cores they really have and every worker slows down. The quota is read from
cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def affinity_cores() -> int:
    """Cores in this process's affinity mask (all of them where the OS has no affinity call)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def quota_cores(root: Path = CGROUP_ROOT) -> float | None:
    """Cores' worth of CPU time the cgroup quota allows, or None when there is no quota.

    Args:
        root: the cgroup mount (tests pass a folder with fake files).
    """
    v2 = _read(root / "cpu.max")  # "max 100000" or "200000 100000"
    if v2:
        quota, _, period = v2.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota, period = _read(root / "cpu" / "cpu.cfs_quota_us"), _read(root / "cpu" / "cpu.cfs_period_us")
    if quota and period and int(quota) > 0:
        return int(quota) / int(period)
    return None


def usable_cores(root: Path = CGROUP_ROOT) -> int:
    """Cores this process can use: its affinity mask, capped by the cgroup quota (rounded up,
    at least 1)."""
    cores = affinity_cores()
    quota = quota_cores(root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def threads_per_worker(workers: int, root: Path = CGROUP_ROOT) -> int:
    """Intra-op threads for each of ``workers`` model workers sharing this process's cores."""
    return max(1, usable_cores(root) // max(1, int(workers)))


if __name__ == "__main__":
    print(f"os.cpu_count() {os.cpu_count()}, affinity {affinity_cores()}, "
          f"cgroup quota {quota_cores()}, usable {usable_cores()}")
