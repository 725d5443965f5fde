"""A method is one class: registered in this file alone, it trains, sweeps and reports like a built-in."""
from __future__ import annotations

import pytest
import torch
import yaml
from pydantic import Field

import kdarena
from kdarena.config import ConfigError, load
from kdarena.experiments.report import write_report
from kdarena.experiments.sweep import presets, run_sweep
from kdarena.methods import GroupLosses, GroupMethod, MethodParams, Needs, StepInput, register_method, registry
from kdarena.losses import per_network_ce


@register_method("toy-ensemble")
class ToyEnsemble(GroupMethod):
    """Each network distils (squared error on probabilities) towards the detached mean prediction."""

    label = "toy: pull every network towards the group's mean probabilities"
    paper = "a test method"
    presets = {"toy-ensemble": ["method.name=toy-ensemble", "perturb.enabled=false"]}
    calls: list[int] = []

    class Params(MethodParams):
        weight: float = Field(0.5, ge=0)

    needs = Needs(min_networks=2, perturbation=False)

    def losses(self, step: StepInput) -> GroupLosses:
        ToyEnsemble.calls.append(step.step)
        ce = torch.stack(per_network_ce(step.logits, step.targets))
        probs = torch.stack([z.float().softmax(1) for z in step.logits])
        pull = ((probs - probs.mean(0, keepdim=True).detach()) ** 2).sum(2).mean(1)
        return GroupLosses.of(ce + self.params.weight * pull, ce)


TINY = {
    "name": "toy",
    "models": ["convnet", "convnet"],
    "data": {"name": "digits", "val_size": 100, "batch_size": 64, "train_subset": 400},
    "optim": {"epochs": 1, "lr": 0.05},
    "train": {"progress": False, "tensorboard": False, "threads": 1, "device": "cpu"},
}



def test_the_registry_knows_the_toy_method_and_its_options():
    assert "toy-ensemble" in registry.names() and "toy-ensemble" in presets()
    config = load(None, ["method.name=toy-ensemble", "method.weight=0.25"])
    assert config.method.weight == 0.25 and config.method.name == "toy-ensemble"
    with pytest.raises(ConfigError, match=r"unknown key 'method.rule' for method toy-ensemble \(rule belongs to method cd\)"):
        load(None, ["method.name=toy-ensemble", "method.rule=best"])
    with pytest.raises(ConfigError, match="method toy-ensemble needs at least 2 networks"):
        load(None, ["method.name=toy-ensemble", "models=[convnet]"])


def test_a_second_class_cannot_take_a_registered_name():
    with pytest.raises(ValueError, match="registered already"):
        @register_method("toy-ensemble")
        class Impostor(GroupMethod):
            pass


def test_the_toy_method_trains_through_kdarena_train(tmp_path):
    ToyEnsemble.calls.clear()
    config = kdarena.config.validate({**TINY, "method": {"name": "toy-ensemble", "weight": 1.0}})
    summary = kdarena.train(config, run_dir=tmp_path / "run")
    assert ToyEnsemble.calls == list(range(4))  # 300 samples / 64: 4 full batches (the partial one is dropped)
    assert summary["config"]["method"] == {"name": "toy-ensemble", "weight": 1.0}
    assert len(summary["networks"]) == 2 and summary["perturbed_steps"] == 0  # Needs(perturbation=False)


def test_the_toy_method_sweeps_and_shows_up_in_the_report(tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({**TINY, "output": str(tmp_path)}))
    runs = run_sweep(config, [], "independent,toy-ensemble", "0", tmp_path / "exp")
    assert [(r["label"], r["status"]) for r in runs] == [("independent", "trained"), ("toy-ensemble", "trained")]
    report = write_report([str(tmp_path / "exp")])
    row = next(line for line in report.splitlines() if line.startswith("| toy-ensemble"))
    assert "toy-ensemble" in row
    assert report.index("| independent") < report.index("| toy-ensemble")  # registration order
