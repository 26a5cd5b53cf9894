"""CPU threads for torch: how many a command may use without oversubscribing a shared node.

torch starts with one intra-op thread per physical core. On a node where other processes
already keep some cores busy, those threads wait on each other at every parallel region
(OpenMP threads spin, then sleep, at each barrier), and a fit can run several times slower
than with one thread (``benchmarks/threads.py`` measures it). ``threads="auto"`` therefore
uses the cores that are free *now*: the cores this process may run on (its affinity mask, and
a cgroup CPU quota where one is set), less the cores that other processes are using over a
short sample of ``/proc/stat`` (this process's own use is not counted), never more than
torch's current setting (so ``OMP_NUM_THREADS`` or a prior ``torch.set_num_threads`` still
caps it) and never fewer than one.

The MLE fitter gives the same bytes at any thread count; a network's predictions can differ
in the last bit of float32 between thread counts (the sums of a matrix product are split over
the threads), so a rerun that must match byte for byte passes the same ``threads=N``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

__all__ = ["usable_cores", "busy_cores", "free_cores", "resolve_threads", "torch_threads"]

#: the CPU-time columns of a ``/proc/stat`` cpu line that count as busy (user, nice, system,
#: irq, softirq, steal; not idle or iowait)
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


def _cgroup_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """Cores allowed by a cgroup v2 CPU quota (``"max"`` or no file: none)."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return float(quota) / float(period)
    except (ValueError, ZeroDivisionError):
        return None


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask where the OS has one, capped by a
    cgroup CPU quota (containers, batch schedulers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _cpu_busy_ticks(cpus: set[int] | None) -> tuple[int, int] | None:
    """(busy, total) clock ticks summed over ``cpus`` (all when None) from ``/proc/stat``."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *columns = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        ticks = [int(c) for c in columns]
        busy += sum(ticks[i] for i in _BUSY_COLUMNS if i < len(ticks))
        total += sum(ticks[:8])
    return (busy, total) if total else None


def _own_ticks() -> int | None:
    """Clock ticks this process (all its threads) has used, from ``/proc/self/stat``."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime


def busy_cores(interval: float = 0.2) -> float:
    """Cores that other processes keep busy, averaged over ``interval`` seconds.

    Linux: the busy share of ``/proc/stat`` over the cores of this process's affinity mask,
    less this process's own use. Elsewhere: the one-minute load average (which counts this
    process too, when it has been running), or 0 where there is none.
    """
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        cpus = None
    before, own_before = _cpu_busy_ticks(cpus), _own_ticks()
    if before is None or own_before is None:
        try:
            return float(os.getloadavg()[0])
        except (AttributeError, OSError):
            return 0.0
    time.sleep(interval)
    after, own_after = _cpu_busy_ticks(cpus), _own_ticks()
    if after is None or own_after is None or after[1] <= before[1]:
        return 0.0
    cores = len(cpus) if cpus is not None else (os.cpu_count() or 1)
    elapsed = (after[1] - before[1]) / cores  # ticks per core over the sample
    others = (after[0] - before[0]) - (own_after - own_before)
    return max(0.0, others / elapsed)


def free_cores(busy: float | None = None) -> int:
    """The usable cores less those other processes keep busy (rounded to the nearest core), at
    least 1. ``busy`` replaces the measurement (:func:`busy_cores`)."""
    if busy is None:
        busy = busy_cores()
    return max(1, usable_cores() - int(math.floor(float(busy) + 0.5)))


def resolve_threads(threads="auto", *, busy: float | None = None) -> int:
    """The torch thread count for ``threads``: a positive integer as given, or ``"auto"``.

    ``"auto"``: the usable cores less those other processes keep busy (rounded to the nearest
    core), at most torch's current thread count, at least 1. ``busy`` replaces the measurement
    (tests; a caller that has measured already).
    """
    if isinstance(threads, str):
        if threads != "auto":
            raise ValueError(f"threads must be a positive integer or 'auto', got {threads!r}")
        import torch

        return max(1, min(torch.get_num_threads(), free_cores(busy)))
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer or 'auto', got {threads!r}")
    return threads


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch threads (None: leave the count as it is), then restore it.

    The float sums of a CPU matrix product are split over the threads, so the same weights
    and inputs give the same bytes only at the same thread count.
    """
    import torch  # imported when used: the thread helpers serve commands that may not need torch

    if n is None:
        yield
        return
    if int(n) < 1:
        raise ValueError(f"num_threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
