"""The one task executor: a list of picklable tasks, a module-level runner ``runner(task) -> outcome dict``, run in
this process, on a local spawn process pool, or on a Ray cluster, yielding each task's outcome as it finishes.

Probe jobs (``workbench.probes.jobs``) and batches of attribution graphs run on it. The caller stays the only writer of
results: workers only compute. Pool workers exit when the calling process dies, kill -9 included
(``PR_SET_PDEATHSIG`` on Linux, and a watchdog thread polling the parent pid everywhere), so a resumed job never
runs beside stale workers. A worker that dies breaks the pool: the tasks that may have been running are re-run one
at a time in a one-worker pool (the one that crashes alone is failed, and a fresh one-worker pool takes the tasks
after it), the rest in a fresh pool. Every worker runs torch with cores / ``workers`` threads, so a task's result
does not depend on which pool ran it.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import torch

BACKENDS = ("local", "ray")
PARENT_POLL_SECONDS = 0.5  # how often a pool worker checks that the calling process is still alive
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
Task = TypeVar("Task")
Runner = Callable[[Any], dict[str, Any]]


def task_outcome(
    status: str, start: float, rows: list | None = None, error: BaseException | str | None = None
) -> dict:
    """A task's outcome: {"status", "rows", "error" (one line), "seconds" since ``start``, "threads"}."""
    if isinstance(error, BaseException):
        error = traceback.format_exception_only(error)[-1].strip()
    return {
        "status": status,
        "rows": rows or [],
        "error": error,
        "seconds": time.perf_counter() - start,
        "threads": None,
    }


def execute(
    tasks: list[Task], backend: str, workers: int, address: str | None, runner: Runner
) -> Iterator[tuple[Task, dict[str, Any]]]:
    """(task, outcome) for each of ``tasks`` as it finishes: ``runner(task)`` run in this process (``workers=1``),
    on a spawn process pool of ``workers`` (``backend="local"``), or as Ray tasks (``backend="ray"``, the cluster
    at ``address`` or a local one with ``workers`` CPUs). A runner that raises, a worker that dies, or a Ray task
    that fails gives that task a failed :func:`outcome`; the other tasks still run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not known; use one of {BACKENDS}")
    if not tasks:
        return
    if backend == "ray":
        yield from _execute_ray(tasks, workers, address, runner)
    elif workers == 1:
        for task in tasks:
            yield task, _guarded(runner, task)
    else:
        yield from _execute_pool(tasks, workers, runner)


def _guarded(runner, task: Task) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        return runner(task)
    except Exception as err:  # noqa: BLE001 — a custom runner's error fails its task only
        return task_outcome("failed", start, error=err)


def _execute_pool(tasks: list[Task], workers: int, runner) -> Iterator[tuple[Task, dict[str, Any]]]:
    """Run ``tasks`` on a spawn process pool. When a worker dies the pool breaks and every unfinished task gets
    BrokenProcessPool; the tasks that may have been running then (the first ``workers + 1`` unfinished, as the
    pool hands them out in order) are re-run one at a time (:func:`_one_at_a_time`) — the task that crashes alone
    is marked failed — and the rest go to a fresh pool. Every worker, the lone ones too, runs torch with
    cores / ``workers`` threads, so a task's results do not depend on which pool ran it."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    queue = list(tasks)
    while queue:
        batch, queue = queue, []
        suspects = []
        for task, outcome in _pool_round(batch, workers, threads, runner):
            if outcome is not None:
                yield task, outcome
            else:
                suspects.append(task)
        if suspects:
            queue = suspects[workers + 1 :]
            yield from _one_at_a_time(suspects[: workers + 1], threads, runner)


def _spawn_pool(workers: int, threads: int) -> ProcessPoolExecutor:
    """A spawn pool of ``workers`` whose workers die with this process and run torch with ``threads`` threads."""
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(threads, os.getpid())
    )


def _one_at_a_time(tasks: list[Task], threads: int, runner) -> Iterator[tuple[Task, dict[str, Any]]]:
    """(task, outcome) for ``tasks`` run one after another on a one-worker pool, so a worker that dies was running
    that one task: it is failed, and a fresh one-worker pool takes the tasks after it (a pool start-up, seconds of
    imports, per crash rather than per task)."""
    left = list(tasks)
    while left:
        with _spawn_pool(1, threads) as pool:
            while left:
                task = left.pop(0)
                start = time.perf_counter()
                try:
                    outcome = pool.submit(runner, task).result()
                except BrokenProcessPool as err:
                    yield task, task_outcome("failed", start, error=f"worker process died: {err}")
                    break
                except Exception as err:  # noqa: BLE001 — e.g. a runner raising or an unpicklable result
                    outcome = task_outcome("failed", start, error=err)
                yield task, outcome


def _pool_round(batch: list[Task], workers: int, threads: int, runner):
    """(task, outcome) for each task of one pool's life; outcome None for a task the broken pool left
    unfinished."""
    start = time.perf_counter()
    results = []
    with _spawn_pool(workers, threads) as pool:
        pending = {pool.submit(runner, task): task for task in batch}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(finished, key=lambda f: batch.index(pending[f])):
                task = pending.pop(future)
                try:
                    outcome = future.result()
                except BrokenProcessPool:
                    outcome = None
                except Exception as err:  # noqa: BLE001 — e.g. a runner raising or an unpicklable result
                    outcome = task_outcome("failed", start, error=err)
                if outcome is None:
                    results.append((task, None))
                else:
                    yield task, outcome
    yield from results


def _init_worker(threads: int, parent: int) -> None:
    """Pool worker start-up: die with the job process ``parent``, then cap torch's threads."""
    die_with_parent(parent)
    torch.set_num_threads(threads)


def die_with_parent(parent: int, interval: float = PARENT_POLL_SECONDS) -> None:
    """Make this process exit as soon as the process ``parent`` (the one that started it) dies, even by SIGKILL.

    Linux: the kernel sends SIGKILL on the parent's death (``prctl(PR_SET_PDEATHSIG)``); everywhere: a daemon
    thread exits the process once ``os.getppid()`` is no longer ``parent`` (orphans are re-parented). A parent
    already gone by the time this runs ends the process at once (a worker killed while still importing its
    modules, before its initializer runs, exits when that start-up finishes)."""
    if sys.platform.startswith("linux"):
        # without prctl (another libc) the watchdog below still ends the process
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(
        target=_watch_parent, args=(parent, interval), name="parent-watchdog", daemon=True
    ).start()


def _watch_parent(parent: int, interval: float) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)


def _ray_task(runner, task: Task, threads: int) -> dict[str, Any]:
    """What a Ray worker runs: cap torch's threads to the CPUs the task reserved, then run the task."""
    torch.set_num_threads(threads)
    return runner(task)


def _execute_ray(
    tasks: list[Task], workers: int, address: str | None, runner
) -> Iterator[tuple[Task, dict[str, Any]]]:
    import ray  # optional: ray

    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        remote: Any = ray.remote(num_cpus=1)(_ray_task)
        start = time.perf_counter()
        pending = {remote.remote(runner, task, 1): task for task in tasks}
        while pending:
            finished, _ = ray.wait(list(pending), num_returns=1)
            for reference in finished:
                task = pending.pop(reference)
                try:
                    outcome = ray.get(reference)
                except Exception as err:  # noqa: BLE001 — RayTaskError, WorkerCrashedError: this task fails
                    outcome = task_outcome("failed", start, error=_ray_error(err))
                yield task, outcome
    finally:
        if started:
            ray.shutdown()


def _ray_error(err: Exception) -> str:
    """The cause of a Ray task error in one line (RayTaskError wraps the task's own exception)."""
    cause = getattr(err, "cause", None)
    shown: BaseException = cause if isinstance(cause, BaseException) else err
    return traceback.format_exception_only(shown)[-1].strip().splitlines()[0]
