"""A study's independent training jobs, run in order or spread over worker processes.

A label study trains many networks that do not depend on each other (every label's tuning
search, every design at every seed). Each job seeds everything it draws (weights, batch order,
dropout masks, Optuna's sampler) and runs with the study's torch thread count, so what it
returns does not depend on which process ran it, on what ran before it, or on the order in
which jobs finish: a study gives the same bytes with any number of workers
(``tests/workflows/test_study_workers.py``).

``workers="auto"`` uses the CPU cores this process may run on and that other processes do not
keep busy (:mod:`qmri_labels.threads`), divided by the torch threads of one job; on a GPU it is
1 (jobs would share one device).
Worker processes are *spawned*, not forked: a fork of a process whose OpenMP threads have run
can hang, and spawning behaves the same on Linux, macOS and Windows.
"""

from __future__ import annotations

import collections
import multiprocessing
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Callable, Hashable, Iterator

from qmri_labels.threads import free_cores


def resolve_workers(workers, device: str, num_threads: int | None, *, busy: float | None = None) -> int:
    """Worker processes for ``workers`` (a positive integer or ``"auto"``).

    ``"auto"`` on the CPU: the cores that are free now (:func:`qmri_labels.threads.free_cores`:
    usable cores less those other processes keep busy; ``busy`` replaces the measurement)
    divided by the threads of one job. Raises ``ValueError`` for anything else, and for
    several workers on a GPU.
    """
    on_cpu = str(device) == "cpu"
    if workers == "auto":
        if not on_cpu:
            return 1
        return max(1, free_cores(busy) // max(1, int(num_threads or 1)))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer or 'auto', got {workers!r}")
    if workers > 1 and not on_cpu:
        raise ValueError(f"workers = {workers} runs several trainings at once on the CPU only; with "
                         f"device {device!r} use workers 1 (or 'auto')")
    if workers > 1 and num_threads is None:
        raise ValueError("workers > 1 needs num_threads set (threads per job), or the jobs would "
                         "oversubscribe the cores")
    return workers


def _timed(fn: Callable, args: tuple) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


class JobProgress:
    """How far a batch of jobs is, and about how long the rest will take: the wall time so far
    per finished job, times the jobs left (with several workers, wall time per job already
    counts them working side by side).

    Parameters
    ----------
    total : int
        Jobs in the batch.
    clock : callable
        Seconds now (``time.perf_counter``; tests pass their own).
    then : (str, float) or None
        What the study does after these jobs and about how many seconds it takes
        (``("evaluation", 40.0)``), added to each line so that it estimates the time left in the
        whole study; None when there is no estimate.
    """

    def __init__(self, total: int, clock: Callable[[], float] = time.perf_counter,
                 then: tuple[str, float] | None = None):
        if int(total) != total or total < 1:
            raise ValueError(f"total must be a positive integer, got {total!r}")
        self.total, self.done, self._clock, self._then = int(total), 0, clock, then
        self._start = clock()

    def finished(self) -> str:
        """Count one more finished job; ``"12 s elapsed, ~36 s left"`` (``"..., none left"`` at the
        end), with ``"; then evaluation ~40 s, ~76 s left in all"`` when ``then`` was given."""
        self.done = min(self.done + 1, self.total)
        elapsed = self._clock() - self._start
        left = elapsed / self.done * (self.total - self.done)
        text = f"{elapsed:.0f} s elapsed, " + (f"~{left:.0f} s left" if self.done < self.total else "none left")
        if self._then is not None:
            what, seconds = self._then
            text += f"; then {what} ~{seconds:.0f} s, ~{left + seconds:.0f} s left in all"
        return text


class JobRunner:
    """Run submitted jobs ``fn(*args)`` in this process (``workers=1``) or in a pool.

    Jobs may be submitted while others run (a tuning job's result defines the trainings that
    follow it). :meth:`completed` yields ``(key, result, seconds)`` as jobs finish, until
    none is left. With one worker, jobs run in submission order in this process, so nothing
    has to be picklable; with several, ``fn`` must be a module-level function and its
    arguments and result picklable.
    """

    def __init__(self, workers: int = 1):
        if int(workers) != workers or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        self.workers = int(workers)
        self._queue: collections.deque = collections.deque()
        self._running: dict[Future, Hashable] = {}
        self._pool: ProcessPoolExecutor | None = None
        if self.workers > 1:
            self._pool = ProcessPoolExecutor(max_workers=self.workers,
                                             mp_context=multiprocessing.get_context("spawn"))

    def __enter__(self) -> "JobRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            # a failed job must not leave the others training in the background
            for future in self._running:
                future.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def submit(self, key: Hashable, fn: Callable, *args) -> None:
        if self._pool is None:
            self._queue.append((key, fn, args))
        else:
            self._running[self._pool.submit(_timed, fn, args)] = key

    def completed(self) -> Iterator[tuple[Hashable, Any, float]]:
        """Yield ``(key, result, seconds)`` per job as it finishes; a job's exception is raised."""
        while self._queue or self._running:
            if self._pool is None:
                key, fn, args = self._queue.popleft()
                result, seconds = _timed(fn, args)
                yield key, result, seconds
                continue
            done, _ = wait(list(self._running), return_when=FIRST_COMPLETED)
            # several may finish together: yield them in submission order, for a stable log
            for future in [f for f in self._running if f in done]:
                key = self._running.pop(future)
                result, seconds = future.result()
                yield key, result, seconds
