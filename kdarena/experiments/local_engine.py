"""The sweep's default engine: its runs on this machine, one by one in this process or ``jobs`` at once in a process pool."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import config as cfg
from .engines import SweepError
from .run_task import execute_run


class LocalEngine:
    """``jobs == 1``: each run in this process (a torchrun launch runs the sweep on every rank); ``jobs > 1``:
    that many runs at once in spawned processes (several small runs fill a GPU, or a CPU's cores, better than one)."""

    name = "local"

    def __init__(self, jobs: int = 1):
        self.jobs = jobs

    @classmethod
    def from_options(cls, jobs: int, address: str | None, gpus_per_run: float | None) -> "LocalEngine":
        if address is not None or gpus_per_run is not None:
            raise SweepError("--address and --gpus-per-run are the Ray engine's; add --engine ray")
        if jobs < 1:
            raise SweepError(f"--jobs must be >= 1, got {jobs}")
        return cls(jobs)

    def prepare(self, config: cfg.Config) -> None:
        """Parallel runs share the cores: unless the config says otherwise, each gets cores // jobs threads
        (two processes spinning two OpenMP threads each on two cores run many times slower, not twice)."""
        if self.jobs > 1 and config.train.threads is None:
            config.train.threads = max(1, (os.cpu_count() or 1) // self.jobs)

    def run(self, exp_dir: Path, runs: Sequence[tuple[str, cfg.Config, Path]], done: Callable[[str, dict[str, Any]], None]) -> None:
        """Train ``(name, config, run_dir)`` each; ``done(name, outcome)`` as each finishes (see :func:`execute_run`).
        A run interrupted here was stopped by Ctrl-C (or SIGTERM), which was meant for the whole sweep: it stops."""
        if self.jobs == 1:
            for name, config, run_dir in runs:
                _done_or_stop(done, name, execute_run(cfg.to_dict(config), str(run_dir)))
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=watch_parent, initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(run_in_worker, cfg.to_dict(config), str(run_dir)): name for name, config, run_dir in runs}
            for future in as_completed(futures):
                _done_or_stop(done, futures[future], future.result())


# A pool worker whose sweep process died (SIGKILL or SIGTERM) was orphaned: it trained even the queued
# runs, never exited (~480 MB each) and held the run folders' locks, so an immediate rerun marked those
# runs failed. Now a watcher thread in each worker sees the parent go, the run in progress checkpoints
# after its step and stops (as on Ctrl-C), a queued run returns at once, and the worker exits.
_PARENT_GONE = threading.Event()
_RUN_STOPS: list[threading.Event] = []  # each run's own stop (the stop-early file sets it for that run only)
_RUNNING = threading.Lock()
PARENT_POLL_S = 0.5


def watch_parent(parent: int) -> None:
    """Pool initializer: start the watcher of the sweep's process (``parent``)."""
    threading.Thread(target=_watch, args=(parent,), daemon=True, name="kdarena-parent-watch").start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    _PARENT_GONE.set()
    for stop in list(_RUN_STOPS):
        stop.set()
    with _RUNNING:  # the run in progress has checkpointed and returned
        os._exit(0)


def run_in_worker(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """:func:`execute_run` in a pool worker, stopped (checkpointed) when the sweep's process is gone."""
    stop = threading.Event()
    _RUN_STOPS.append(stop)
    if _PARENT_GONE.is_set():
        stop.set()
    try:
        with _RUNNING:
            return execute_run(config, run_dir, stop_requested=stop)
    finally:
        _RUN_STOPS.remove(stop)


def _done_or_stop(done: Callable[[str, dict[str, Any]], None], name: str, outcome: dict[str, Any]) -> None:
    done(name, outcome)
    if "interrupted" in outcome:
        raise KeyboardInterrupt(outcome["interrupted"])
