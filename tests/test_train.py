"""End-to-end training: exact resume, data sets on disk, the CLI, offline KD and run records.

Every run is tiny (a few hundred 8x8 digits or generated images, 1-2 epochs, one thread).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from kdarena import __version__
from kdarena.engine import checkpoint as ckpt
from kdarena.cli import main
from kdarena.config import ConfigError, dump, load
from kdarena.records.folder import read_metrics
from kdarena.trainer import Trainer, train

TINY = [
    "models=[convnet,convnet]",
    "data.name=digits",
    "data.train_subset=256",
    "data.val_size=64",
    "data.batch_size=32",
    "optim.epochs=2",
    "optim.lr=0.05",
    "train.device=cpu",
    "train.progress=false",
    "train.tensorboard=false",
    "train.threads=1",
]



def tiny(*overrides: str):
    return load(None, TINY + list(overrides))


def write_yaml(path: Path, *overrides: str) -> Path:
    from kdarena.config import dump

    path.write_text(dump(tiny(*overrides)))
    return path


def group_state(run_dir: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return ckpt.load(run_dir / "checkpoints" / name)["group"]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]
    assert not different, f"tensors differ after resume: {different[:5]}"


def train_losses(run_dir: Path) -> list[list[float]]:
    records = read_metrics(run_dir)
    return [[r[f"net{i}/train_loss"] for i in range(2)] for r in records]


# ---------------------------------------------------------------------------------- a. resume
# 256 - 64 val = 192 training samples / batch 32 = 6 steps per epoch, 12 in all:
# stop at 4 (mid-epoch 1), 6 (end of epoch 1, before its record is written) or 9 (mid-epoch 2).
@pytest.mark.parametrize("precision,stop_at,selection", [
    ("fp32", 9, "own-batch"), ("bf16", 9, "own-batch"), ("fp32", 6, "own-batch"), ("bf16", 4, "smoothed"),
])
def test_resume_is_bitwise_exact(tmp_path, precision, stop_at, selection):
    common = ("method.name=cd", "perturb.enabled=true", "perturb.ops=paper", "perturb.every=1",
              f"method.selection={selection}", "train.deterministic=true", f"train.precision={precision}")
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    full = Trainer(tiny(*common), full_dir)
    assert full.steps_per_epoch == 6
    full.fit()

    first = Trainer(tiny(*common, f"train.stop_after_steps={stop_at}"), split_dir).fit()
    assert first == {"stopped_at_step": stop_at}
    assert (split_dir / "checkpoints" / "last.pt").is_file()
    resumed = Trainer(tiny(*common), split_dir, resume=True)
    assert resumed.loop.global_step == stop_at
    resumed.fit()

    assert_same_tensors(group_state(full_dir), group_state(split_dir))
    assert train_losses(full_dir) == train_losses(split_dir)
    assert len(read_metrics(split_dir)) == 2
    full_state, split_state = ckpt.load(full_dir / "checkpoints" / "last.pt"), ckpt.load(split_dir / "checkpoints" / "last.pt")
    assert full_state["global_step"] == split_state["global_step"] == 12
    for key, value in full_state["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], split_state["optimizer"]["state"][key]["momentum_buffer"])
    ema_full, ema_split = full_state["method"]["ema"], split_state["method"]["ema"]
    assert (ema_full is None) == (ema_split is None) == (selection != "smoothed")
    assert ema_full is None or torch.equal(ema_full, ema_split)


# ---------------------------------------------------------------------------------- b. data on disk
def make_cifar100(root: Path, n_train: int = 300, n_test: int = 100) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"fine_labels": rng.integers(0, 100, n).tolist(),
                 b"coarse_labels": rng.integers(0, 20, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    meta = {b"fine_label_names": [f"class{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=4))
    return root


def make_image_folder(root: Path, classes=("cat", "dog", "owl"), per_class: int = 10, size: int = 20) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 4)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
                pixels[..., c] = 255  # a learnable colour cue per class
                Image.fromarray(pixels).save(folder / f"{k}.png")
    return root


def check_run_dir(run_dir: Path, n: int = 2) -> dict:
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run_dir / name).is_file(), name
    records = read_metrics(run_dir)
    assert len(records) == 1
    for i in range(n):
        for split in ("val", "test"):
            assert 0.0 <= records[0][f"net{i}/{split}_top1"] <= 100.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["networks"]) == n
    return summary


def eval_prints_top1(run_dir: Path, capsys, n: int = 2) -> None:
    capsys.readouterr()
    assert main(["eval", str(run_dir / "checkpoints" / "last.pt")]) == 0
    out = capsys.readouterr().out
    for key in [f"net{i}/top1" for i in range(n)] + ["ensemble/top1"]:
        assert key in out


def test_cifar100_folder_end_to_end(tmp_path, capsys):
    root = make_cifar100(tmp_path / "data")
    run_dir = tmp_path / "run"
    cfg = tiny("data.name=cifar100", f"data.root={root}", "data.train_subset=null", "data.val_size=50",
               "data.batch_size=50", "optim.epochs=1", "models=[convnet,resnet20]", "train.precision=bf16")
    summary = train(cfg, run_dir)
    check_run_dir(run_dir)
    assert summary["networks"][1]["last_test_top1"] == read_metrics(run_dir)[0]["net1/test_top1"]
    eval_prints_top1(run_dir, capsys)


def test_image_folder_end_to_end(tmp_path, capsys):
    root = make_image_folder(tmp_path / "images")
    run_dir = tmp_path / "run"
    cfg = tiny("data.name=imagefolder", f"data.root={root}", "data.train_subset=null", "data.val_size=6",
               "data.image_size=16", "data.num_workers=0", "data.batch_size=8", "optim.epochs=1")
    trainer = Trainer(cfg, run_dir)
    assert trainer.data.num_classes == 3
    x, _ = next(iter(trainer.data.train.iterate(0, 0)))
    assert tuple(x.shape[1:]) == (3, 16, 16)
    trainer.fit()
    check_run_dir(run_dir)
    eval_prints_top1(run_dir, capsys)


# ---------------------------------------------------------------------------------- c. CLI
def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_cli_models(capsys):
    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert "resnet20" in names and "convnet" in names
    assert "timm:NAME" in names


def test_cli_unknown_key(tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml")
    assert main(["train", str(config), "optim.learning_rate=0.1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown key 'optim.learning_rate'" in err
    assert "valid keys in optim:" in err and ", lr," in err and "momentum" in err
    assert not (tmp_path / "run").exists()


def test_cli_missing_config(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml" in err and "does not exist" in err


def test_cli_existing_run_dir_refused_then_forced(tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", "optim.epochs=1")
    run_dir = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run_dir)]) == 0
    first_metrics = (run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()

    assert main(["train", str(config), "--out", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--force" in err
    assert (run_dir / "metrics.jsonl").read_text() == first_metrics  # untouched

    assert main(["train", str(config), "--out", str(run_dir), "--force"]) == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1
    assert (moved[0] / "metrics.jsonl").read_text() == first_metrics
    assert (moved[0] / "checkpoints" / "last.pt").is_file()
    assert len(read_metrics(run_dir)) == 1


def test_cli_resume_empty_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert "holds no run" in capsys.readouterr().err


def test_cli_resume_continues_a_stopped_run(tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", "optim.epochs=1", "train.stop_after_steps=3")
    run_dir = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run_dir)]) == 0
    assert not (run_dir / "summary.json").exists()
    assert main(["train", "--resume", str(run_dir), "train.stop_after_steps=null"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 1


def test_cli_debug_reraises(tmp_path):
    with pytest.raises(ConfigError):
        main(["train", str(tmp_path / "nope.yaml"), "--debug"])
    with pytest.raises(ConfigError):
        main(["--debug", "train", str(tmp_path / "nope.yaml")])


# ---------------------------------------------------------------------------------- d. offline KD
def test_offline_kd_from_a_trained_group(tmp_path):
    group_dir, kd_dir = tmp_path / "group", tmp_path / "kd"
    train(tiny("optim.epochs=1"), group_dir)
    teacher_ckpt = group_dir / "checkpoints" / "last.pt"
    before = {k: v.clone() for k, v in group_state(group_dir).items()}

    cfg = tiny("optim.epochs=1", "method.name=kd", "method.teacher_model=convnet",
               f"method.teacher_checkpoint={teacher_ckpt}", "method.teacher_index=1", "models=[convnet]")
    trainer = Trainer(cfg, kd_dir)
    teacher_before = {k: v.clone() for k, v in trainer.method.teacher.state_dict().items()}
    expected = {k[len("networks.1."):]: v for k, v in before.items() if k.startswith("networks.1.")}
    assert_same_tensors(teacher_before, expected)
    summary = trainer.fit()

    assert_same_tensors(trainer.method.teacher.state_dict(), teacher_before)  # frozen, incl. BN statistics
    assert not trainer.method.teacher.training
    assert_same_tensors(group_state(group_dir), before)  # the first run's checkpoint is untouched
    record = read_metrics(kd_dir)[0]
    assert record["net0/kd"] > 0 and "net1/train_loss" not in record
    assert len(summary["networks"]) == 1
    student = group_state(kd_dir)
    assert not all(torch.equal(student[f"networks.0.{k}"], v) for k, v in expected.items())


# ---------------------------------------------------------------------------------- e. CD records
def test_cd_run_records(tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny("method.name=cd", "perturb.every=1", "perturb.ops=paper", "train.precision=fp32")
    summary = train(cfg, run_dir)
    records = read_metrics(run_dir)
    assert len(records) == 2
    steps_per_epoch = 6
    for epoch, r in enumerate(records):
        assert r["epoch"] == epoch and r["step"] == steps_per_epoch * (epoch + 1)
        assert all(r[f"net{i}/skipped_steps"] == 0 for i in range(2))
        assert sum(r[f"net{i}/teacher_share"] for i in range(2)) == pytest.approx(1.0)
        assert r["perturbed_steps"] == steps_per_epoch
        op_counts = {k: v for k, v in r.items() if k.startswith("perturb/") and k.endswith("/count")}
        assert op_counts and sum(op_counts.values()) == steps_per_epoch
        assert {k.split("/")[1] for k in op_counts} <= {"mixup", "cutmix", "noise", "warp", "crop"}
        assert 0 <= r["perturbed_won"] <= r["perturbed_steps"]
        assert r["lr"] >= 0 and r["images_per_s"] > 0
        assert 0 <= r["teacher_switches"] < steps_per_epoch
    assert records[0]["lr"] > records[1]["lr"]  # cosine decays
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["networks"] == summary["networks"]
    assert on_disk["selection_split"] == "val"
    for i, entry in enumerate(on_disk["networks"]):
        best = max(records, key=lambda r: r[f"net{i}/val_top1"])
        assert entry["test_at_best_val_top1"] == best[f"net{i}/test_top1"]
    assert "test_at_best_val_top1" in on_disk["ensemble"]
    assert on_disk["perturbed_steps"] == 2 * steps_per_epoch
    assert sum(e["teacher_share"] for e in on_disk["networks"]) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------- f. selection
@pytest.mark.parametrize("selection", ["clean", "smoothed"])
def test_teacher_selection_variants(tmp_path, selection):
    cfg = tiny(f"method.selection={selection}", "optim.epochs=1", "train.precision=fp32")
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.step_log = []
    trainer.fit()
    assert len(trainer.step_log) == 6
    assert all(0 <= s["teacher"] < 2 for s in trainer.step_log)
    record = read_metrics(tmp_path / "run")[0]
    assert sum(record[f"net{i}/teacher_share"] for i in range(2)) == pytest.approx(1.0)
    assert all(np.isfinite(record[f"net{i}/val_top1"]) for i in range(2))
    state = ckpt.load(tmp_path / "run" / "checkpoints" / "last.pt")
    if selection == "smoothed":
        assert state["method"]["ema"] is not None and state["method"]["ema"].shape == (2,)
    else:
        assert state["method"]["ema"] is None


def test_overrides_after_options_are_still_overrides(tmp_path, capsys):
    from kdarena.cli import main

    code = main(["train", "configs/quickstart.yaml", "--out", str(tmp_path / "run"), "optim.lrr=0.1"])
    assert code == 2
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err


def test_frozen_bn_stats_normalises_with_batch_statistics_but_keeps_running_ones():
    import torch
    from torch import nn

    from kdarena.perturb import frozen_bn_stats

    torch.manual_seed(0)
    frozen, reference = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(8, 3, 4, 4) * 3 + 2
    with frozen_bn_stats(frozen):
        out = frozen(x)
    assert torch.equal(out, reference(x))  # same training-mode forward
    assert torch.equal(frozen.running_mean, torch.zeros(3)) and torch.equal(frozen.running_var, torch.ones(3))
    assert int(frozen.num_batches_tracked) == 0 and frozen.momentum == 0.1
    assert not torch.equal(reference.running_mean, torch.zeros(3))  # the test would see an update


def test_independent_training_is_never_perturbed(tmp_path):
    """No competition filters a perturbed batch: independent means plain training even with perturb.enabled."""
    summary = train(tiny("optim.epochs=1", "method.name=independent", "perturb.enabled=true", "perturb.every=1"), tmp_path / "r")
    assert summary["perturbed_steps"] == 0


@pytest.mark.parametrize("method, teacher", [("dml", False), ("cd", True)])
def test_teacher_share_is_shown_only_for_methods_that_pick_a_teacher(tmp_path, capsys, caplog, method, teacher):
    # DML printed "teacher share [0.00 0.00]" each epoch and a column of 0.00 at the end (issue 37): it has no teacher
    config = tmp_path / "c.yaml"
    config.write_text(dump(load(None, TINY + [f"method.name={method}", "optim.epochs=1"])))
    with caplog.at_level("INFO", logger="kdarena"):
        assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 0
    epoch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1:")]
    assert len(epoch_lines) == 1 and ("teacher share [" in epoch_lines[0]) == teacher, epoch_lines
    table = capsys.readouterr().out
    assert ("teacher share" in table) == teacher, table
    assert ("net0/teacher_share" in read_metrics(tmp_path / "run")[0]) == teacher
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert ("teacher_share" in on_disk["networks"][0]) == teacher


def test_summary_and_report_give_train_evaluation_and_total_seconds(tmp_path, capsys):
    # summary.json's wall_seconds and the report's "wall time" left evaluation out: a cd-mean pair trained
    # 147 s and took 454 s (issue 37)
    from kdarena.experiments.report import write_report

    summary = train(tiny("method.name=dml", "train.eval_every=1"), tmp_path / "dml-seed0")
    records = read_metrics(tmp_path / "dml-seed0")
    assert all(r["eval_seconds"] > 0 for r in records)
    assert summary["train_seconds"] == summary["wall_seconds"] == records[-1]["wall_seconds"]
    assert summary["eval_seconds"] == pytest.approx(sum(r["eval_seconds"] for r in records), abs=1e-12)
    assert summary["total_seconds"] == pytest.approx(summary["train_seconds"] + summary["eval_seconds"], abs=1e-12)
    on_disk = json.loads((tmp_path / "dml-seed0" / "summary.json").read_text())
    assert {k: on_disk[k] for k in ("train_seconds", "eval_seconds", "total_seconds")} == \
        {k: summary[k] for k in ("train_seconds", "eval_seconds", "total_seconds")}
    text = write_report(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| dml ") and "=" in line)
    expected = f"{summary['train_seconds']:.1f} + {summary['eval_seconds']:.1f} = {summary['total_seconds']:.1f}"
    assert expected in row, row
    assert "seconds: train + eval = total" in text
    from kdarena.records.summary import Summary

    assert f"seconds: {summary['train_seconds']:.1f} train + {summary['eval_seconds']:.1f} evaluation" in Summary.model_validate(summary).table()
