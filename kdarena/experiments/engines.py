"""Where a sweep's runs train, chosen by name: a registry, as methods, models and data sets have.

An entry names the module and class of an engine; the module is imported only when the engine is
chosen (listing the names must not import Ray). An engine class has ``from_options(jobs, address,
gpus_per_run)``, which refuses the options that are not its own, ``prepare(config)`` and
``run(exp_dir, runs, done)`` (see :class:`~kdarena.experiments.local_engine.LocalEngine`).
"""
from __future__ import annotations

import importlib

from ..errors import UserError

ENGINES = {
    "local": ("kdarena.experiments.local_engine", "LocalEngine"),
    "ray": ("kdarena.experiments.ray_engine", "RayEngine"),
}


class SweepError(UserError):
    """A sweep cannot run as asked, or some of its runs failed; the message says which."""


def names() -> list[str]:
    return list(ENGINES)


def make_engine(engine: str = "local", jobs: int = 1, address: str | None = None, gpus_per_run: float | None = None):
    """The engine named ``engine``, set up with the options the command line gave."""
    if engine not in ENGINES:
        raise SweepError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    module, name = ENGINES[engine]
    return getattr(importlib.import_module(module), name).from_options(jobs, address, gpus_per_run)
