"""Fault injection, round two (issue #13): untrusted checkpoints, shared run directories, resume
overrides, a real full disk, a wrong ``data.root``, tracebacks that should be one line, and
checks that were looser than documented.

Every test failed on the code before its fix. The counts in RELIABILITY.md come from this file
and from ``tests/test_runs_survive_faults.py``.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kdarena import config as cfg
from kdarena.engine import checkpoint as ckpt
from kdarena.records.folder import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_runs_survive_faults import (  # noqa: E402  (registers the faultnet model; _isolate is an autouse fixture)
    FAULT, SLEEP_ENV, TINY, _isolate, assert_one_line_error, cli, launch, stopped_run,
    wait_for_training, write_cifar10, write_config, write_fashion,
)

__all__ = ["_isolate"]


# ============================================================================== 1. code in checkpoints
class Payload:
    """Unpickling this creates ``target``: what a hostile checkpoint does instead of loading weights."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def hostile_checkpoint(path: Path, marker: Path, base: dict | None = None) -> Path:
    state = dict(base or {"format": ckpt.FORMAT, "group": {}, "config": {}, "epoch": 0})
    state["payload"] = Payload(marker)
    torch.save(state, path)
    return path


def test_checkpoint_with_code_is_not_run_by_eval(tmp_path, capsys):
    marker = tmp_path / "pwned"
    run_dir = stopped_run(tmp_path, capsys, 2)
    good = ckpt.load(run_dir / "checkpoints" / "last.pt")
    evil = hostile_checkpoint(tmp_path / "evil.pt", marker, good)
    code, err = cli(capsys, "eval", str(evil))
    assert_one_line_error(code, err, str(evil), "holds code", "not loaded")
    assert not marker.exists()


def test_checkpoint_with_code_is_not_run_by_resume(tmp_path, capsys):
    marker = tmp_path / "pwned"
    run_dir = stopped_run(tmp_path, capsys, 2)
    last = run_dir / "checkpoints" / "last.pt"
    hostile_checkpoint(last, marker, ckpt.load(last))
    # not even with a good last.prev.pt beside it: a planted file is a reason to stop, not to fall back
    code, err = cli(capsys, "train", "--resume", str(run_dir))
    assert_one_line_error(code, err, str(last), "holds code")
    assert not marker.exists()


def test_checkpoint_with_code_is_not_run_as_a_kd_teacher(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "teacher.pt"
    torch.save({"fc.weight": torch.zeros(2), "payload": Payload(marker)}, evil)
    config = write_config(tmp_path / "c.yaml")
    code, err = cli(capsys, "train", str(config), "models=[faultnet]", "method.name=kd", "method.teacher_model=faultnet",
                    f"method.teacher_checkpoint={evil}", "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, str(evil), "holds code")
    assert not marker.exists()
    assert not (tmp_path / "run").exists()  # refused while building: nothing left behind


def test_checkpoints_kdarena_writes_load_with_weights_only(tmp_path, capsys):
    """The allow-list covers everything a run saves (perturbation, mutation, cd's EMA, RNG states)."""
    run_dir = stopped_run(tmp_path, capsys, 2, "perturb.parameters.enabled=true", "method.selection=smoothed")
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["global_step"] == 2 and state["mutation"] is not None


# ============================================================================== 3. shared run directories
def _sleepy_run(tmp_path: Path, run_dir: Path) -> subprocess.Popen:
    (tmp_path / "run.yaml").write_text((tmp_path / "c.yaml").read_text())
    proc = launch(run_dir, resume=False, env_extra={SLEEP_ENV: "0.5"})
    wait_for_training(proc, run_dir / "config.yaml", None)
    return proc


def test_second_run_on_a_busy_run_directory_names_the_holder(tmp_path, capsys):
    write_config(tmp_path / "c.yaml", "optim.epochs=50")
    run_dir = tmp_path / "run"
    proc = _sleepy_run(tmp_path, run_dir)
    try:
        for args in (["train", str(tmp_path / "c.yaml"), "--out", str(run_dir), "--force"],
                     ["train", "--resume", str(run_dir), "train.stop_after_steps=1"],
                     ["train", str(tmp_path / "c.yaml"), "--out", str(run_dir)]):
            code, err = cli(capsys, *args)
            assert_one_line_error(code, err, str(run_dir), f"PID {proc.pid}")
        assert proc.poll() is None  # the first run was left alone
        assert not list(tmp_path.glob("run.old-*"))  # and not moved aside under its feet
    finally:
        proc.kill()
        proc.communicate()
    # the holder died (kill -9): its lock went with it, so the run can be resumed
    code, err = cli(capsys, "train", "--resume", str(run_dir), "train.stop_after_steps=1")
    assert code == 0, err


def test_two_trainers_in_one_process_cannot_share_a_run_directory(tmp_path):
    from kdarena.records.folder import RunDirError
    from kdarena.trainer import Trainer

    first = Trainer(cfg.load(None, TINY + ["optim.epochs=1"]), tmp_path / "run")
    with pytest.raises(RunDirError, match=f"PID {os.getpid()}"):
        Trainer(cfg.load(None, TINY + ["optim.epochs=1"]), tmp_path / "run", resume=True)
    first.fit()  # the run ends: the directory is free again
    Trainer(cfg.load(None, TINY + ["optim.epochs=1"]), tmp_path / "run", resume=True).fit()


def test_save_atomic_removes_only_its_own_stale_temporaries(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        others = tmp_path / f"last.pt.{alive.pid}.abc.tmp"  # another process, writing right now
        stale = tmp_path / f"last.pt.{dead.pid}.abc.tmp"  # left by a process killed mid-write
        others.write_bytes(b"x")
        stale.write_bytes(b"x")
        ckpt.save_atomic({"a": torch.zeros(1)}, tmp_path / "last.pt")
        assert others.exists() and not stale.exists()
    finally:
        alive.kill()
        alive.wait()


# ============================================================================== 4. overrides on resume
def test_resume_refuses_overrides_that_change_the_run(tmp_path, capsys):
    run_dir = stopped_run(tmp_path, capsys, 2)
    before = (run_dir / "config.yaml").read_text()
    for override, key in (("data.val_size=32", "data.val_size"), ("optim.momentum=0.5", "optim.momentum"),
                          ("method.alpha=2", "method.alpha"), ("perturb.every=3", "perturb.every"), ("seed=5", "seed")):
        code, err = cli(capsys, "train", "--resume", str(run_dir), override)
        assert_one_line_error(code, err, key, "--out")
    assert (run_dir / "config.yaml").read_text() == before  # nothing recorded


def test_resume_applies_and_records_resumable_overrides(tmp_path, capsys):
    from kdarena.trainer import Trainer

    run_dir = stopped_run(tmp_path, capsys, 3)
    config = cfg.load(run_dir / "config.yaml", ["optim.lr=0.5", "optim.epochs=4", "train.nonfinite=stop",
                                                "train.checkpoint_every=2", "train.stop_after_steps=null"])
    trainer = Trainer(config, run_dir, resume=True)
    factor = trainer.parts.scheduler.lr_lambdas[0](trainer.parts.scheduler.last_epoch)
    assert trainer.parts.scheduler.base_lrs == [0.5] * len(trainer.parts.optimizer.param_groups)
    assert all(g["lr"] == 0.5 * factor and g["initial_lr"] == 0.5 for g in trainer.parts.optimizer.param_groups)
    history = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 3 and history[-1]["time"]
    assert history[-1]["changed"]["optim.lr"] == [0.05, 0.5] and history[-1]["changed"]["optim.epochs"] == [2, 4]
    assert history[-1]["changed"]["train.nonfinite"] == ["skip", "stop"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 0.5
    trainer.fit()
    assert read_metrics(run_dir)[-1]["epoch"] == 3
    assert ckpt.load(run_dir / "checkpoints" / "last.pt")["global_step"] == 24


# ============================================================================== 5. a real full disk
@pytest.fixture
def small_tmpfs(mount_tmpfs):
    return mount_tmpfs("4m")


def fill_up(folder: Path, leave: int) -> Path:
    """Fill the file system of ``folder`` to the last byte, then free ``leave`` bytes (page-rounded by tmpfs)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(fd)
    os.truncate(filler, max(filler.stat().st_size - leave, 0))
    return filler


# How much room is left decides where the write fails: in torch's zip writer (it then raised
# RuntimeError "unexpected pos" with the OSError only as context) or in a plain write or flush.
@pytest.mark.parametrize("free", [0.1, 0.3, 0.6, 0.9])
def test_real_full_disk_during_a_checkpoint_write_keeps_the_last_one(tmp_path, capsys, small_tmpfs, free):
    original = stopped_run(tmp_path, capsys, 2)
    run_dir = small_tmpfs / "run"
    shutil.copytree(original, run_dir)
    folder = run_dir / "checkpoints"
    filler = fill_up(small_tmpfs, int((folder / "last.pt").stat().st_size * free))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, err = cli(capsys, "train", "--resume", str(run_dir), "train.stop_after_steps=3")
    assert_one_line_error(code, err, "No space left on device")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # intact, and no temporary file left
    assert ckpt.load(folder / "last.pt")["global_step"] == 2
    filler.unlink()  # space freed: the run goes on
    code, err = cli(capsys, "train", "--resume", str(run_dir), "train.stop_after_steps=3")
    assert code == 0, err
    assert ckpt.load(folder / "last.pt")["global_step"] == 3


# ============================================================================== 6. a wrong data.root
def test_data_root_without_the_data_is_an_error_not_a_fallback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KDARENA_DATA", str(write_fashion(tmp_path / "elsewhere")))  # a copy it could fall back to
    config = write_config(tmp_path / "c.yaml", "data.val_size=0", "data.batch_size=8", "data.train_subset=null", "optim.epochs=1")
    missing = tmp_path / "nonexistent"
    code, err = cli(capsys, "train", str(config), "data.name=fashion_mnist", f"data.root={missing}", "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "Fashion-MNIST not found", str(missing))
    assert str(tmp_path / "elsewhere") not in err.splitlines()[-1]  # searched only data.root
    assert not (tmp_path / "run").exists()


# ============================================================================== 7. one line, not a traceback
def test_eval_with_models_or_data_that_do_not_match_is_one_line(tmp_path, capsys):
    run_dir = stopped_run(tmp_path, capsys, 2)
    last = run_dir / "checkpoints" / "last.pt"
    code, err = cli(capsys, "eval", str(last), "models=[convnet,convnet]")
    assert_one_line_error(code, err, str(last), "does not fit")
    write_cifar10(tmp_path / "c10")  # three channels where the checkpoint's networks take one
    code, err = cli(capsys, "eval", str(last), "data.name=cifar10", f"data.root={tmp_path / 'c10'}", "data.val_size=0")
    assert_one_line_error(code, err, str(last), "does not fit")


def test_checkpoint_dict_lacking_keys_is_one_line(tmp_path, capsys):
    run_dir = stopped_run(tmp_path, capsys, 2)
    last = run_dir / "checkpoints" / "last.pt"
    state = ckpt.load(last)
    del state["optimizer"]
    torch.save(state, last)
    (run_dir / "checkpoints" / "last.prev.pt").unlink()
    code, err = cli(capsys, "train", "--resume", str(run_dir))
    assert_one_line_error(code, err, str(last), "optimizer")
    del state["config"]
    torch.save(state, tmp_path / "noconfig.pt")
    code, err = cli(capsys, "eval", str(tmp_path / "noconfig.pt"))
    assert_one_line_error(code, err, "noconfig.pt", "config")


def test_corrupt_teacher_checkpoint_is_one_line(tmp_path, capsys):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"PK\x03\x04 not a checkpoint")
    config = write_config(tmp_path / "c.yaml")
    code, err = cli(capsys, "train", str(config), "models=[faultnet]", "method.name=kd", "method.teacher_model=faultnet",
                    f"method.teacher_checkpoint={teacher}", "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, str(teacher), "unreadable")


def test_absurd_thread_count_is_one_line_not_a_segfault(tmp_path):
    config = write_config(tmp_path / "c.yaml")
    code = f"import sys; from kdarena.cli import main; sys.exit(main(['train', {str(config)!r}, 'train.threads=99999999', '--out', {str(tmp_path / 'run')!r}]))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_one_line_error(proc.returncode, proc.stderr.strip(), "train.threads", "99999999")


@pytest.mark.parametrize("override,key", [("seed=100000000000000000000", "seed"), ("seed=-1", "seed")])
def test_seed_out_of_range_is_one_line(tmp_path, capsys, override, key):
    config = write_config(tmp_path / "c.yaml")
    code, err = cli(capsys, "train", str(config), override, "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, f"'{key}'")


def test_metrics_line_of_a_wrong_type_on_resume_is_one_line(tmp_path, capsys):
    run_dir = stopped_run(tmp_path, capsys, 8)  # past the first epoch: metrics.jsonl has a record
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": "one", "step": 7}\n')
    code, err = cli(capsys, "train", "--resume", str(run_dir))
    assert_one_line_error(code, err, "metrics.jsonl", "line 2", "epoch")


# ============================================================================== 8. stricter than before
@pytest.mark.parametrize("override,key", [
    ("optim.lr=true", "optim.lr"), ("optim.epochs=false", "optim.epochs"), ("data.val_size=true", "data.val_size"),
    ("seed=true", "seed"), ("method.alpha=true", "method.alpha"), ("optim.betas=[true,0.9]", "optim.betas"),
])
def test_booleans_are_not_numbers(tmp_path, capsys, override, key):
    config = write_config(tmp_path / "c.yaml")
    code, err = cli(capsys, "train", str(config), override, "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, f"'{key}'", "not a boolean")
    assert cfg.load(None, ["optim.lr=1"]).optim.lr == 1.0  # an integer is still a number


def test_section_override_merges_into_the_section():
    config = cfg.load(None, ["optim.epochs=7", "optim={lr: 2}"])
    assert config.optim.lr == 2 and config.optim.epochs == 7
    config = cfg.load(None, ["method.alpha=3", "method={name: dml}"])
    assert config.method.name == "dml" and config.method.alpha == 3


def test_errors_found_while_building_leave_nothing_behind(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    run_dir = tmp_path / "run"
    code, err = cli(capsys, "train", str(config), "data.batch_size=5000", "--out", str(run_dir))
    assert_one_line_error(code, err, "data.batch_size=5000")
    assert not run_dir.exists()
    assert cli(capsys, "train", str(config), "optim.epochs=1", "--out", str(run_dir))[0] == 0
    before = sorted(p.name for p in run_dir.iterdir())
    code, err = cli(capsys, "train", str(config), "data.batch_size=5000", "--out", str(run_dir), "--force")
    assert_one_line_error(code, err, "data.batch_size=5000")
    assert sorted(p.name for p in run_dir.iterdir()) == before  # not moved aside
    assert not list(tmp_path.glob("run.old-*"))


def test_force_backups_within_one_second_do_not_nest(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path / "c.yaml", "optim.epochs=1", "data.train_subset=64", "data.val_size=0")
    run_dir = tmp_path / "run"
    monkeypatch.setattr(time, "strftime", lambda *args: "20261129-120000")
    for _ in range(3):
        assert cli(capsys, "train", str(config), "--out", str(run_dir), "--force")[0] == 0
    backups = sorted(tmp_path.glob("run.old-*"))
    assert len(backups) == 2 and all((b / "config.yaml").is_file() and not list(b.glob("run.old-*")) for b in backups)


def test_nonfinite_stop_before_any_checkpoint_does_not_point_at_one(tmp_path, capsys):
    FAULT.update(network=0, after=2, created=0)
    config = write_config(tmp_path / "c.yaml", "train.nonfinite=stop")
    code, err = cli(capsys, "train", str(config), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "no checkpoint has been written yet")
    assert "last checkpoint is in" not in err


def test_config_path_that_is_not_a_regular_file(capsys):
    code, err = cli(capsys, "train", "/dev/null")
    assert_one_line_error(code, err, "/dev/null", "not a regular file")
    assert "does not exist" not in err
