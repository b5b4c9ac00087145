"""Where the plan's proxy students train: worker processes of one compute thread each.

A proxy is a small network trained for a few hundred steps on small batches; on a CPU its
kernels are too short for several threads to share well, and threads that wait for each
other spin. Two threads in one process gave 1.3x one thread's speed on a quiet 2-core
machine, and beside a second busy process the spinning made the same run 5.6x slower
(benchmarks/RESULTS.md, "Test suite"). So on a CPU the plan trains one proxy per core,
each in its own process with one thread: about twice one thread's throughput when the
machine is quiet, and no spinning when it is not. Workers are spawned (they inherit no
thread pools), ignore Ctrl-C (the plan's own process answers it and stops them), and get
the validation images once. With CUDA, or one worker, proxies train in this process;
and so do they until one run takes :data:`WORKER_START_SECONDS`, about what starting the
workers costs, so that a plan of short proxies (a test's, a quick look) never pays it.

A proxy's accuracy does not depend on where it ran: every run has one compute thread and
its own seed.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from sender.selection.deployment import Validation

MAX_WORKERS = 8  # each holds its own torch (about 300 MB); proxies are short
IN_FLIGHT_PER_WORKER = 2  # jobs queued per worker: its next one is ready when it finishes
WORKER_START_SECONDS = 1.0  # a spawned worker imports torch: about a second of one core

ProxyJob = tuple[np.ndarray, np.ndarray, Any]  # (images, labels, ProxyRun)
Train = Callable[[np.ndarray, np.ndarray, Validation, Any], float]


def default_workers() -> int:
    """One per core this process may use (at most :data:`MAX_WORKERS`); one with CUDA,
    where the proxies share the GPU from this process."""
    import torch

    if torch.cuda.is_available():
        return 1
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


class ProxyPool:
    """Runs proxy jobs, results in the order given; ``workers`` 1 runs them here, and so
    does any number until one run has taken ``start_after`` seconds (``worth_starting``
    says it has, or that another pool's runs of the same length did)."""

    def __init__(
        self,
        train: Train,
        validation: Validation,
        workers: int,
        start_after: float = WORKER_START_SECONDS,
    ) -> None:
        self.train, self.validation, self.workers = train, validation, workers
        self.start_after = start_after
        self._pool: Any = None
        self.worth_starting = False

    def run(self, jobs: Iterable[ProxyJob]) -> Iterator[float]:
        """Each job's validation accuracy, in order; at most a few jobs built ahead."""
        jobs = iter(jobs)
        while self.workers > 1 and not self.worth_starting:
            job = next(jobs, None)
            if job is None:
                return
            started = time.perf_counter()
            yield self._here(job)
            self.worth_starting = time.perf_counter() - started >= self.start_after
        if self.workers <= 1:
            yield from map(self._here, jobs)
            return
        pool = self._started()
        waiting: deque[Any] = deque()
        for job in jobs:
            waiting.append(pool.apply_async(_run_job, job))
            if len(waiting) >= IN_FLIGHT_PER_WORKER * self.workers:
                yield waiting.popleft().get()
        while waiting:
            yield waiting.popleft().get()

    def _here(self, job: ProxyJob) -> float:
        images, labels, run = job
        return one_thread(self.train, images, labels, self.validation, run)

    def close(self, wait: bool = True) -> None:
        """Stop the workers: let them finish (``wait``), or end them at once."""
        if self._pool is None:
            return
        if wait:
            self._pool.close()
        else:
            self._pool.terminate()
        self._pool.join()
        self._pool = None

    def __enter__(self) -> ProxyPool:
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        self.close(wait=error is None)

    def _started(self) -> Any:
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            self._pool = context.Pool(self.workers, _start_worker, (self.train, self.validation))
        return self._pool


def one_thread(
    train: Train, images: np.ndarray, labels: np.ndarray, validation: Validation, run: Any
) -> float:
    """``train`` with one compute thread (the thread count is restored after)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(images, labels, validation, run)
    finally:
        torch.set_num_threads(threads)


_WORKER: dict[str, Any] = {}  # in a worker process: its train function and validation


def _start_worker(train: Train, validation: Validation) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(1)
    _WORKER.update(train=train, validation=validation)


def _run_job(images: np.ndarray, labels: np.ndarray, run: Any) -> float:
    return _WORKER["train"](images, labels, _WORKER["validation"], run)
