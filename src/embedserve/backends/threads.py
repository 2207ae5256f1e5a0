"""How a CPU backend spreads over the cores: how many forward passes run at once (workers, one batcher
thread each) and how many threads each pass uses (design note 28)."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's cpuset, `taskset`)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_workers(cores: int) -> int:
    """Two workers from 2 cores up, then one per 4 cores (so 2 x 1 thread on 2 cores, 2 x 4 on 8, 4 x 4
    on 16): a pass keeps at most 4 threads, where its ops still split well."""
    return 1 if cores < 2 else max(2, cores // 4)


def threads_per_worker(cores: int, workers: int) -> int:
    return max(1, cores // workers)
