"""Sweep engines are a registry (kdarena.experiments.engines): a new engine is one class and one entry; the sweep
and the command line take the names from the registry, and each engine refuses the options that are not its own."""
from __future__ import annotations

import json

import pytest

from kdarena.cli import _parser
from kdarena.experiments import engines
from kdarena.experiments.run_task import execute_run
from kdarena.experiments.sweep import SweepError, run_sweep
from kdarena.records.folder import sweep_index_path

OVERRIDES = ["models=[convnet,convnet]", "data.name=digits", "data.train_subset=128", "data.val_size=64", "data.batch_size=64",
             "perturb.enabled=false", "optim.epochs=1", "train.progress=false", "train.tensorboard=false", "train.threads=1"]


class InlineEngine:
    """A third engine, for the test: the runs in this process, newest plan last."""

    name = "inline"
    made: list["InlineEngine"] = []

    def __init__(self, jobs: int):
        self.jobs, self.ran = jobs, []
        InlineEngine.made.append(self)

    @classmethod
    def from_options(cls, jobs, address, gpus_per_run):
        if address is not None:
            raise SweepError("--address is the Ray engine's")
        return cls(jobs)

    def prepare(self, config) -> None:
        pass

    def run(self, exp_dir, runs, done) -> None:
        for name, config, run_dir in reversed(list(runs)):
            self.ran.append(name)
            done(name, execute_run(config.model_dump(), str(run_dir)))


def test_a_registered_engine_runs_a_sweep_and_is_a_command_line_choice(tmp_path, monkeypatch):
    monkeypatch.setitem(engines.ENGINES, "inline", (__name__, "InlineEngine"))
    config = tmp_path / "tiny.yaml"
    config.write_text("name: tiny\n")
    records = run_sweep(config, OVERRIDES, methods="independent", seeds="0,1", out=tmp_path / "exp", engine="inline")
    assert InlineEngine.made[-1].ran == ["independent-seed1", "independent-seed0"]
    assert [r["status"] for r in records] == ["trained", "trained"]
    assert json.loads(sweep_index_path(tmp_path / "exp").read_text())["runs"][0]["status"] == "trained"
    args = _parser().parse_args(["sweep", str(config), "--engine", "inline"])
    assert args.engine == "inline"


def test_each_engine_refuses_the_options_of_another():
    with pytest.raises(SweepError, match="--address and --gpus-per-run are the Ray engine's"):
        engines.make_engine("local", address="auto")
    with pytest.raises(SweepError, match="--jobs must be >= 1, got 0"):
        engines.make_engine("local", jobs=0)
    with pytest.raises(SweepError, match="--jobs is the local engine's"):
        engines.make_engine("ray", jobs=2)
    with pytest.raises(SweepError, match="unknown engine 'slurm'; choose one of local, ray"):
        engines.make_engine("slurm")
    assert engines.names()[:2] == ["local", "ray"]
