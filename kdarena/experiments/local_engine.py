"""The sweep's default engine: its runs on this machine, one by one in this process or ``jobs`` at once in a process pool."""
from __future__ import annotations

import os
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

        with ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(execute_run, cfg.to_dict(config), str(run_dir)): name for name, config, run_dir in runs}
            for future in as_completed(futures):
                _done_or_stop(done, futures[future], future.result())


def _done_or_stop(done: Callable[[str, dict[str, Any]], None], name: str, outcome: dict[str, Any]) -> None:
    done(name, outcome)
    if "interrupted" in outcome:
        raise KeyboardInterrupt(outcome["interrupted"])
