"""One run of a sweep (kdarena/experiments/run_task.py) stopped from outside: the stop request the Ray
engine's tasks receive when the driver is interrupted on another machine (no signal reaches them there)."""
from __future__ import annotations

import threading
import time

import pytest

from kdarena import config as cfg
from kdarena.engine import checkpoint
from kdarena.experiments.ray_engine import STOP_POLL_S, _watch_for_stop
from kdarena.experiments.run_task import execute_run
from kdarena.trainer import Interrupted, train

OVERRIDES = ["models=[convnet,convnet]", "data.name=digits", "data.val_size=200", "data.batch_size=128", "perturb.enabled=false",
             "optim.epochs=2", "train.progress=false", "train.tensorboard=false", "train.threads=1"]


def test_a_stop_request_checkpoints_after_the_step_then_resume_finishes(tmp_path):
    run_dir = tmp_path / "run"
    stop = threading.Event()
    stop.set()  # asked before the first step: the run stops after it
    with pytest.raises(Interrupted, match=rf"stopped by signal 2 at step 1; resume with --resume {run_dir}"):
        train(cfg.load(None, OVERRIDES), run_dir=run_dir, stop_requested=stop)
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["global_step"] == 1
    outcome = execute_run(cfg.to_dict(cfg.load(None, OVERRIDES)), str(run_dir), stop_requested=threading.Event())
    assert outcome["action"] == "resumed" and len(outcome["summary"]["networks"]) == 2
    assert (run_dir / "resumes.jsonl").read_text().count('"step": 1') == 1


def test_a_run_asked_to_stop_before_it_starts_writes_nothing(tmp_path):
    stop = threading.Event()
    stop.set()
    outcome = execute_run(cfg.to_dict(cfg.load(None, OVERRIDES)), str(tmp_path / "run"), stop_requested=stop)
    assert outcome["interrupted"] == "the sweep was interrupted before this run started" and outcome["action"] == "trained"
    assert not (tmp_path / "run").exists()


def test_the_task_sees_the_drivers_stop_file(tmp_path):
    stop_file, stop, finished = tmp_path / ".stop-x", threading.Event(), threading.Event()
    watcher = threading.Thread(target=_watch_for_stop, args=(stop_file, stop, finished), daemon=True)
    watcher.start()
    time.sleep(2 * STOP_POLL_S)
    assert not stop.is_set()  # no file, no stop
    stop_file.write_text("stop\n")
    assert stop.wait(10 * STOP_POLL_S)
    watcher.join(5)
    assert not watcher.is_alive()


def _a_bug_of_ours(*args, **kwargs):
    return {}["no such key"]


def test_a_bug_inside_a_sweeps_run_shows_its_traceback_in_the_sweeps_log(tmp_path, monkeypatch, caplog, capsys):
    from kdarena.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text("name: tiny\n")
    monkeypatch.setattr("kdarena.trainer.train", _a_bug_of_ours)
    code = main(["sweep", str(config), *OVERRIDES, "--methods", "independent", "--seeds", "0", "--out", str(tmp_path / "exp")])
    assert code == 2  # the sweep ends as before: one line, and the index says which run failed and why
    assert "KeyError: 'no such key'" in capsys.readouterr().err.splitlines()[-1]
    (failure,) = [r for r in caplog.records if r.levelname == "ERROR"]
    text = failure.getMessage()
    assert text.startswith("independent-seed0 failed: KeyError: 'no such key'\nTraceback (most recent call last):")
    assert "in _a_bug_of_ours" in text and text.endswith("KeyError: 'no such key'")


def test_a_users_mistake_inside_a_sweeps_run_stays_one_line(tmp_path, monkeypatch):
    from kdarena.errors import UserError

    def refuse(*args, **kwargs):
        raise UserError("data.root /nowhere does not exist; give the folder of the images")

    monkeypatch.setattr("kdarena.trainer.train", refuse)
    outcome = execute_run(cfg.to_dict(cfg.load(None, OVERRIDES)), str(tmp_path / "run"))
    assert outcome["error"] == "UserError: data.root /nowhere does not exist; give the folder of the images"
    assert "traceback" not in outcome
