"""The arena's methods through kdarena.train on digits: end to end, evaluated temporal means, exact resume."""
from __future__ import annotations

import json

import pytest
import torch

import kdarena
from kdarena.config import load
from kdarena.engine import checkpoint as ckpt
from kdarena.records.folder import read_metrics
from kdarena.experiments.report import write_report
from kdarena.experiments.sweep import presets, run_sweep
from kdarena.trainer import Trainer

TINY = [
    "models=[convnet,convnet]",
    "data.name=digits",
    "data.train_subset=256",
    "data.val_size=64",
    "data.batch_size=32",
    "optim.epochs=1",
    "optim.lr=0.05",
    "train.device=cpu",
    "train.progress=false",
    "train.tensorboard=false",
    "train.threads=1",
]
METHODS = {
    "kdcl": ["method.name=kdcl", "method.temperature=4"],
    "kdcl-minlogit": ["method.name=kdcl", "method.ensemble=minlogit"],
    "pcl": ["method.name=pcl", "method.rampup_epochs=2"],
    "pskd": ["method.name=pskd"],
}



def tiny(*overrides: str):
    return load(None, TINY + list(overrides))


@pytest.mark.parametrize("label", list(METHODS))
def test_each_method_trains_end_to_end(tmp_path, label):
    summary = kdarena.train(tiny(*METHODS[label]), run_dir=tmp_path / label)
    assert len(summary["networks"]) == 2 and summary["perturbed_steps"] == 0
    record = read_metrics(tmp_path / label)[-1]
    for i in range(2):
        assert 0.0 <= record[f"net{i}/test_top1"] <= 100.0
        assert record[f"net{i}/train_loss"] == pytest.approx(record[f"net{i}/train_loss"])  # finite, not NaN
    if label == "pcl":  # the temporal means are evaluated next to the online networks
        for i in range(2):
            assert 0.0 <= record[f"mean{i}/test_top1"] <= 100.0 and 0.0 <= record[f"mean{i}/val_top1"] <= 100.0


def test_pskd_runs_a_single_network_and_uses_its_stored_predictions(tmp_path):
    trainer = Trainer(tiny("models=[convnet]", "method.name=pskd", "method.epochs=2", "optim.epochs=2"), tmp_path / "one")
    assert trainer.method.train_size == 192  # 256 - 64 held out for validation
    trainer.fit()
    method = trainer.method
    assert method.predictions.shape == (1, 192, 10) and bool(method.seen.all())
    assert torch.allclose(method.predictions.sum(dim=2), torch.ones(1, 192))
    first, second = read_metrics(tmp_path / "one")
    assert abs(first["net0/kd"]) < 1e-5  # epoch 1: a_0 = 0, one-hot targets
    assert abs(second["net0/kd"]) > 1e-3  # epoch 2: a_1 = 0.4 mixes in the stored predictions


def group_state(run_dir):
    return ckpt.load(run_dir / "checkpoints" / "last.pt")


def assert_same(a, b, what):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), what
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_same(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}[{k}]")
    else:
        assert a == b, what


# 192 training samples / batch 32 = 6 steps per epoch, 12 in all: stop mid-epoch 2 (its targets come from epoch 1)
@pytest.mark.parametrize("label", ["pskd", "pcl", "kdcl"])
def test_resume_mid_epoch_is_bitwise_exact(tmp_path, label):
    common = (*METHODS[label], "optim.epochs=2", "train.deterministic=true", "train.precision=fp32")
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    Trainer(tiny(*common), full_dir).fit()
    assert Trainer(tiny(*common, "train.stop_after_steps=8"), split_dir).fit() == {"stopped_at_step": 8}
    resumed = Trainer(tiny(*common), split_dir, resume=True)
    assert resumed.loop.global_step == 8
    resumed.fit()
    full, split = group_state(full_dir), group_state(split_dir)
    assert_same(full["group"], split["group"], "group")
    assert_same(full["method"], split["method"], "method")  # PS-KD's store, PCL's temporal means
    if label == "pskd":
        assert full["method"]["predictions"].shape == (2, 192, 10) and bool(full["method"]["seen"].all())
    losses = [[r[f"net{i}/train_loss"] for i in range(2)] for r in read_metrics(full_dir)]
    assert losses == [[r[f"net{i}/train_loss"] for i in range(2)] for r in read_metrics(split_dir)]


def test_arena_presets_sweep_and_report(tmp_path):
    for label in ("kdcl", "kdcl-minlogit", "pcl", "pskd"):
        assert label in presets()
    config = tmp_path / "tiny.yaml"
    from kdarena.config import dump

    config.write_text(dump(tiny(f"output={tmp_path}", "data.train_subset=160")))
    runs = run_sweep(config, [], "independent,kdcl,pcl,pskd", "0", tmp_path / "exp")
    assert [(r["label"], r["status"]) for r in runs] == [(m, "trained") for m in ("independent", "kdcl", "pcl", "pskd")]
    report = write_report([str(tmp_path / "exp")])
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    order = [next(i for i, line in enumerate(rows) if line.startswith(f"| {m} ")) for m in ("independent", "kdcl", "pcl", "pskd")]
    assert order == sorted(order)  # registration order
    assert "naive ensemble" in report and "EMA 0.999" in report and "α_T 0.8" in report
    # PCL's temporal means are reported beside the online networks, with their own best-val selection
    summary = json.loads((tmp_path / "exp" / "pcl-seed0" / "summary.json").read_text())
    assert set(summary["extra"]) == {"mean0", "mean1"} and "test_at_best_val_top1" in summary["extra"]["mean0"]
    mean_rows = [line for line in rows if line.startswith("| pcl ") and "mean0" in line]
    assert mean_rows and f"{summary['extra']['mean0']['last_test_top1']:.2f}" in mean_rows[0]


def test_kdcl_peers_get_their_own_augmented_views(tmp_path):
    trainer = Trainer(tiny("method.name=kdcl", "data.crop_padding=4"), tmp_path / "views")
    x, y, index, views = next(trainer._batches())
    assert len(views) == 1 and views[0].shape == x.shape and not torch.equal(views[0], x)
    trainer = Trainer(tiny("method.name=kdcl", "method.own_views=false", "data.crop_padding=4"), tmp_path / "shared")
    assert next(trainer._batches())[3] is None
