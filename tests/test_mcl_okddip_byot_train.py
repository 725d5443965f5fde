"""MCL, OKDDip and BYOT through kdarena.train on digits: the heads the trainer attaches for Needs.heads, end to
end with evaluation from the checkpoint, and bad input (options, models, group size) as one-line errors, exit 2."""
from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

import kdarena
from kdarena.cli import main
from kdarena.config import load
from kdarena.records.folder import read_metrics
from kdarena.errors import ConfigError
from kdarena.methods import registry
from kdarena.models.heads import heads_of
from kdarena.trainer import Trainer

TINY = [
    "data.name=digits", "data.train_subset=192", "data.val_size=64", "data.batch_size=32", "optim.epochs=1",
    "optim.lr=0.05", "train.device=cpu", "train.progress=false", "train.tensorboard=false", "train.threads=1",
    "perturb.enabled=false",
]
RUNS = {
    "mcl": ["method.name=mcl", "models=[convnet,convnet]"],
    "mcl-code": ["method.name=mcl", "method.icl=code", "models=[resnet8,convnet]"],
    "mcl-pairs": ["method.name=mcl", "models=[convnet,convnet]", "data.samples_per_class=2"],  # the code's sampler
    "okddip": ["method.name=okddip", "models=[convnet,convnet,convnet]"],
    "okddip-branched": ["method.name=okddip", "models=[branched:resnet8,branched:resnet8,branched:resnet8]"],
    "byot": ["method.name=byot", "models=[resnet8]"],
}
KIND = {"mcl": "embedding", "okddip": "attention", "byot": "exits"}
PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"


def tiny(*overrides: str):
    return load(None, TINY + list(overrides))


def test_kdarena_methods_lists_the_three_with_presets():
    assert {"mcl", "okddip", "byot"} <= set(registry.names())
    assert {"mcl", "okddip", "byot"} <= set(registry.presets())


@pytest.mark.parametrize("label", list(RUNS))
def test_each_method_trains_end_to_end_with_its_heads(tmp_path, capsys, label):
    run_dir = tmp_path / label
    trainer = Trainer(tiny(*RUNS[label]), run_dir)
    kind = KIND[label.split("-")[0]]
    heads = [heads_of(net) for net in trainer.group.networks]
    assert all(h is not None and h.kinds() == [kind] for h in heads)
    optimized = {id(p) for g in trainer.parts.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in optimized for h in heads for p in h.parameters())  # the heads train with the networks
    before = [p.detach().clone() for h in heads for p in h.parameters()]
    trainer.fit()
    after = [p.detach() for h in heads for p in h.parameters()]
    assert any((a != b).any() for a, b in zip(after, before))
    record = read_metrics(run_dir)[-1]
    for i in range(len(trainer.group.networks)):
        assert 0.0 <= record[f"net{i}/test_top1"] <= 100.0
        assert record[f"net{i}/train_loss"] == pytest.approx(record[f"net{i}/train_loss"])  # finite
    capsys.readouterr()
    assert main(["eval", str(run_dir / "checkpoints" / "last.pt")]) == 0  # the heads are rebuilt and loaded
    assert "net0/top1" in capsys.readouterr().out
    # the exported network is the plain classifier: its heads are training-time parts
    out = tmp_path / "net.safetensors"
    assert main(["export", str(run_dir), "--out", str(out), "--network", "0"]) == 0
    assert not any("aux_heads" in k for k in safetensors.torch.load_file(out))


@pytest.mark.parametrize("label", ["mcl", "okddip", "byot"])
def test_resume_mid_epoch_is_bitwise_exact(tmp_path, label):
    common = (*RUNS[label], "optim.epochs=2", "train.deterministic=true", "train.precision=fp32")
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    Trainer(tiny(*common), full_dir).fit()
    assert Trainer(tiny(*common, "train.stop_after_steps=7"), split_dir).fit() == {"stopped_at_step": 7}
    resumed = Trainer(tiny(*common), split_dir, resume=True)
    resumed.fit()
    full, split = (torch.load(d / "checkpoints" / "last.pt", weights_only=True)["group"] for d in (full_dir, split_dir))
    assert full.keys() == split.keys() and any(".aux_heads." in k for k in full)
    assert all(torch.equal(full[k], split[k]) for k in full)


def _cli_train(tmp_path, overrides: list[str], capsys) -> tuple[int, str]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"name": "round2"}))
    code = main(["train", str(path), *TINY, *overrides, "--out", str(tmp_path / "run")])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("overrides,words", [
    (["method.name=mcl", "models=[convnet]"], ["mcl", "models", "at least 2"]),
    (["method.name=okddip", "models=[convnet,convnet]"], ["okddip", "models", "at least 3"]),
    (["method.name=byot", "models=[convnet]"], ["byot", "models[0] = convnet", "stage_layers", "resnet"]),
    (["method.name=byot", "models=[branched:resnet8,branched:resnet8]"], ["byot", "shared trunk", "models: [resnet32]"]),
    (["method.name=byot", "models=[resnet8]", "method.alpha=1.5"], ["method.alpha", "1"]),
    (["method.name=mcl", "models=[convnet,convnet]", "method.tau=0"], ["method.tau", "0"]),
    (["method.name=mcl", "models=[convnet,convnet]", "method.icl=both"], ["method.icl", "paper", "code"]),
    (["method.name=okddip", "models=[convnet,convnet,convnet]", "method.rampup=2"], ["method.rampup", "1"]),
    (["method.name=okddip", "models=[convnet,convnet,convnet]", "method.attention_factor=0"], ["method.attention_factor"]),
    (["method.name=mcl", "models=[convnet,convnet]", "train.fused=true"], ["mcl", "train.fused=false"]),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, overrides, words):
    code, err = _cli_train(tmp_path, overrides, capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)


def test_bad_models_are_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="method byot cannot run on models"):
        Trainer(tiny("method.name=byot", "models=[convnet]"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("path,method,count,target", [
    ("cifar100_resnet32x2_mcl.yaml", "mcl", 2, "72.96"),
    ("cifar100_resnet32x4_okddip.yaml", "okddip", 4, "73.25"),
    ("cifar100_resnet18_byot.yaml", "byot", 1, "78.64"),
])
def test_paper_configs_build_the_published_setting(path, method, count, target):
    from kdarena.engine.build import build_group

    file = PAPER / path
    config = load(file)
    assert config.method.name == method and len(config.models) == count and not config.perturb.enabled
    target_lines = [line for line in file.read_text().splitlines() if line.startswith("#") and "Target" in line]
    assert target_lines and target in target_lines[0]  # the number the run must reach, stated where the config is
    group = build_group(config, 100, 3, registry.build(config.method).needs)
    assert all(heads_of(net) is not None for net in group.networks)
