"""The CPU this process may use: the CPUs it is pinned to and its cgroup's CPU quota.

A worker reports both in `Hello`, and the planner keys its profile cache on them: a device whose
share of the machine changed (a new cgroup quota, other pinning, a different board under the same
name) must be profiled again, not planned from timings of what it used to be.
"""

from __future__ import annotations

import os
from pathlib import Path

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpus() -> int:
    """CPUs this process may run on (its affinity mask; all of them where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _cgroup_paths() -> dict[str, str]:
    """controller -> this process's cgroup path, from /proc/self/cgroup ("" key: cgroup v2)."""
    out = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                out[c] = path
    except (OSError, ValueError):
        pass
    return out


def _v1_quota(path: str) -> float | None:
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        d = _CGROUP_ROOT / mount / path.lstrip("/")
        try:
            quota = int((d / "cpu.cfs_quota_us").read_text())
            period = int((d / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def _v2_quota(path: str) -> float | None:
    try:
        quota, period = (_CGROUP_ROOT / path.lstrip("/") / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def cpu_limit() -> float:
    """Cores this process can use at most: its cgroup's CPU quota, or its CPU count if lower."""
    paths = _cgroup_paths()
    quota = None
    if "cpu" in paths:
        quota = _v1_quota(paths["cpu"])
    elif "" in paths:
        quota = _v2_quota(paths[""])
    return min(float(cpus()), quota) if quota else float(cpus())


def host_cpus() -> int:
    """CPUs of the whole machine (not this process's affinity): what workers sharing it divide."""
    return os.cpu_count() or 0


def host_id() -> str:
    """The running kernel's boot id: the same for every worker on one machine (network namespaces and
    containers included), so a planner can tell which workers share its cores and memory bus."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
