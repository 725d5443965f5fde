"""A run the sweep never started is recorded pending, not interrupted (issue 36, a low)."""
from __future__ import annotations

import json

import yaml

from kdarena.experiments import local_engine
from kdarena.experiments.sweep import run_sweep

BASE = {"name": "idx", "models": ["convnet", "convnet"], "data": {"name": "digits", "val_size": 200, "batch_size": 128},
        "perturb": {"enabled": False}, "optim": {"epochs": 1}, "train": {"progress": False, "tensorboard": False, "threads": 1}}


def test_runs_never_started_stay_pending(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(BASE))
    calls = []

    def stopped(config, run_dir, stop_requested=None):  # the first run is stopped by a signal after its checkpoint
        calls.append(run_dir)
        return {"action": "trained", "node": "here", "interrupted": "stopped by signal 15 at step 3", "seconds": 1.0}

    monkeypatch.setattr(local_engine, "execute_run", stopped)
    try:
        run_sweep(config, [], "independent,dml,cd", "0", tmp_path / "exp")
    except KeyboardInterrupt:
        pass
    status = {r["label"]: r["status"] for r in json.loads((tmp_path / "exp" / "sweep.json").read_text())["runs"]}
    assert len(calls) == 1
    assert status == {"independent": "interrupted", "dml": "pending", "cd": "pending"}
