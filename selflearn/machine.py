"""What this process may use of the machine it runs on (shared by the trainer and serving)."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may use: affinity, capped by a cgroup v2 quota (a container's, a pod's
    CPU limit), which os.cpu_count() and torch's default thread count both ignore."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)
