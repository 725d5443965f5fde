"""Starting a run from weights (``models: [{name, weights, network, reinit_head}]``) and fine-tuning on other classes.

The source run trains two ResNet-8s for one epoch on three classes of image files the test writes;
its exported network then starts runs on two classes (a new classifier) and on the same classes.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kdarena import config as cfg, models, train
from kdarena.cli import main
from kdarena.engine import checkpoint as ckpt
from kdarena.engine.build import build_parts
from kdarena.engine.weights import WeightsError, read_weights
from test_deploy import env, run_config, write_images  # noqa: F401  (env: a private decoded-image cache)


@pytest.fixture(scope="module")
def source(env):
    train(run_config(write_images(env / "three")), run_dir=env / "source-run")
    assert main(["export", str(env / "source-run"), "--out", str(env / "net1.safetensors"), "--network", "1"]) == 0
    assert main(["export", str(env / "source-run"), "--out", str(env / "net1.pt"), "--network", "1"]) == 0  # TorchScript
    write_images(env / "two", classes=("left", "right"), seed=1)
    return env


def network_tensors(run: Path, index: int) -> dict[str, torch.Tensor]:
    group = ckpt.load(run / "checkpoints" / "best.pt", required=ckpt.EVAL_KEYS)["group"]
    prefix = f"networks.{index}."
    return {k[len(prefix):]: v for k, v in group.items() if k.startswith(prefix)}


def built(config: cfg.Config):
    return build_parts(config, torch.device("cpu")).group


def test_an_exported_network_initialises_a_run_on_another_number_of_classes(source, tmp_path):
    weights = {"name": "resnet8", "weights": str(source / "net1.safetensors"), "reinit_head": True}
    config = run_config(source / "two", models=[weights])
    assert config.models == ["resnet8"] and config.weights[0].reinit_head
    net = built(config).networks[0]
    wanted = network_tensors(source / "source-run", 1)
    state = net.state_dict()
    assert set(state) == set(wanted)
    for key, value in state.items():
        if key.startswith("fc."):  # the new classifier: two classes, freshly initialised
            assert value.shape[0] == 2 and wanted[key].shape[0] == 3
        else:
            assert torch.equal(value, wanted[key]), key
    summary = train(config, run_dir=tmp_path / "fine")  # and the run trains to the end
    assert summary["epochs"] == 1 and len(summary["networks"]) == 1
    saved = cfg.read_yaml(tmp_path / "fine" / "config.yaml")
    assert saved["models"] == ["resnet8"] and saved["weights"][0]["path"] == str(source / "net1.safetensors")
    assert cfg.validate(saved).weights == config.weights  # config.yaml's form loads back the same


def test_weights_from_a_checkpoint_network_and_from_a_plain_state_dict(source, tmp_path):
    checkpoint = str(source / "source-run" / "checkpoints" / "best.pt")
    config = run_config(source / "three", models=[{"name": "resnet8", "weights": checkpoint, "network": 1}, "resnet8"])
    group = built(config)
    assert all(torch.equal(v, network_tensors(source / "source-run", 1)[k]) for k, v in group.networks[0].state_dict().items())
    fresh = models.create("resnet8", 3, 3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in fresh.state_dict().items()}, "epoch": 3}, tmp_path / "plain.pt")
    config = run_config(source / "three", models=["resnet8", "resnet8"], weights=[None, {"path": str(tmp_path / "plain.pt")}])
    group = built(config)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in group.networks[1].state_dict().items())


def test_the_same_classes_need_no_new_head(source):
    config = run_config(source / "three", models=[{"name": "resnet8", "weights": str(source / "net1.safetensors")}])
    net = built(config).networks[0]
    assert all(torch.equal(v, network_tensors(source / "source-run", 1)[k]) for k, v in net.state_dict().items())


def train_cli(source, tmp_path, models_value: str, root: str = "two") -> tuple[int, str]:
    return main(["train", "configs/quickstart.yaml", f"models={models_value}", "method.name=independent",
                 "data.name=imagefolder", f"data.root={source / root}", "data.val_size=12", "data.batch_size=16",
                 "optim.epochs=1", "train.threads=1", "train.device=cpu", "train.progress=false",
                 "train.tensorboard=false", "--out", str(tmp_path / "run")])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("kdarena: error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize("case", ["head", "architecture", "missing", "torchscript", "network", "hostile", "folder"])
def test_weights_that_do_not_fit_are_a_one_line_error(source, tmp_path, capsys, case):
    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"fc.weight": Hostile()}, tmp_path / "hostile.pt")  # a .pt whose unpickling would run a command
    entry, root = {
        "head": ("{name: resnet8, weights: %s}" % (source / "net1.safetensors"), "two"),
        "architecture": ("{name: resnet14, weights: %s}" % (source / "net1.safetensors"), "three"),
        "missing": ("{name: resnet8, weights: %s}" % (tmp_path / "nothing.pt"), "three"),
        "torchscript": ("{name: resnet8, weights: %s}" % (source / "net1.pt"), "three"),
        "network": ("{name: resnet8, weights: %s, network: 5}" % (source / "source-run" / "checkpoints" / "best.pt"), "three"),
        "hostile": ("{name: resnet8, weights: %s}" % (tmp_path / "hostile.pt"), "three"),
        "folder": ("{name: resnet8, weights: %s}" % (source / "source-run"), "three"),
    }[case]
    assert train_cli(source, tmp_path, f"[{entry}]", root) == 2
    line = one_line_error(capsys)
    expected = {
        "head": "shapes differ: fc.weight (3, 64) vs (2, 64)",
        "architecture": "missing: layer1.1.conv1.weight",
        "missing": "does not exist",
        "torchscript": "is a TorchScript export",
        "network": "network 5 is not in it (it holds 2 network(s), 0..1)",
        "hostile": "holds code or objects kdarena does not write (posix.system)",
        "folder": "is a folder",
    }[case]
    assert expected in line, line
    if case == "head":
        assert "set reinit_head: true" in line
    if case == "architecture":
        assert "weights of another architecture" in line
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing written


def test_read_weights_refuses_non_tensors(tmp_path):
    torch.save({"weights": [1, 2, 3]}, tmp_path / "lists.pt")
    with pytest.raises(WeightsError, match="neither a kdarena checkpoint nor a state_dict of tensors"):
        read_weights(tmp_path / "lists.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        read_weights(tmp_path / "broken.safetensors")


@pytest.mark.parametrize("raw,message", [
    ({"models": [{"name": "resnet8", "wieghts": "x"}]}, "bad value for 'models.0': unknown key(s) ['wieghts']"),
    ({"models": [{"name": "resnet8", "weights": "x", "network": -1}]}, "bad value for 'models.0.network' (got -1)"),
    ({"models": ["resnet8", "resnet8"], "weights": [None]}, "has 1 entries for 2 models"),
    ({"models": [{"name": "resnet8", "weights": "x"}], "weights": [None]}, "not both"),
    ({"models": [{"name": "branched:resnet20", "weights": "x"}, "branched:resnet20"]}, "branched models share one trunk"),
])
def test_bad_weights_entries_are_config_errors(raw, message):
    with pytest.raises(cfg.ConfigError) as error:
        cfg.validate({**raw, "method": {"name": "independent"}})
    assert message in str(error.value)


def test_a_run_from_weights_evaluates_them_before_its_first_epoch(source, tmp_path, caplog):
    # nothing showed that training starts where it ended (issue 37): lr 1e-9 was the workaround
    from kdarena.experiments import plot
    from kdarena.records.folder import read_metrics

    checkpoint = str(source / "source-run" / "checkpoints" / "best.pt")
    config = run_config(source / "three", models=[{"name": "resnet8", "weights": checkpoint, "network": 1}, "resnet8"])
    with caplog.at_level("INFO", logger="kdarena"):
        summary = train(config, run_dir=tmp_path / "run")
    start, first = read_metrics(tmp_path / "run")
    ended = [r for r in read_metrics(source / "source-run") if "net1/test_top1" in r][-1]
    assert start["before_training"] is True and start["epoch"] == 0 and start["step"] == 0 and start["eval_seconds"] > 0
    assert start["net0/test_top1"] == pytest.approx(ended["net1/test_top1"], abs=1e-9)  # where the source network ended
    assert start["net0/val_top1"] == pytest.approx(ended["net1/val_top1"], abs=1e-9)
    assert first["epoch"] == 0 and "before_training" not in first
    line = f"epoch 0 (the starting weights): val top1 [{start['net0/val_top1']:.2f} {start['net1/val_top1']:.2f}]"
    assert line in [r.getMessage() for r in caplog.records]
    assert summary["epochs"] == 1 and summary["networks"][0]["last_test_top1"] == first["net0/test_top1"]  # no epoch
    epochs, *_ = plot._series(plot._find_runs(tmp_path / "run"), "net0/test_top1")
    assert epochs == [0, 1]
