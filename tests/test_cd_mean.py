"""Competitive mean teachers (cd-mean, ours): the loss against a float64 reference, the competition among the
temporal means, gradient isolation, the ramp-up, the means' updates and state, and a run with exact resume."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kdarena
from kdarena.config import load
from kdarena.records.folder import read_metrics
from kdarena.methods import MethodContext, StepInput
from kdarena.methods.cd_mean import CompetitiveMeanTeachers
from kdarena.methods.registry import presets
from kdarena.trainer import Trainer
from reference import ce64
from reference_kdcl_pcl_pskd import cd_mean64
from test_kdcl_pcl_pskd import GRID, assert_isolated_given_means, random_logits
from test_kdcl_pcl_pskd_train import TINY, assert_same, group_state


@pytest.mark.parametrize("n,tau", GRID)
def test_loss_matches_formula_given_the_temporal_means(n, tau):
    logits, y = random_logits(n, seed=500 + n)
    means, _ = random_logits(n, seed=600 + n)
    method = CompetitiveMeanTeachers(alpha=0.8, temperature=tau, rampup=0.0)
    out = method.losses(StepInput.of(logits, y), mean_logits=means)
    for i in range(n):
        assert out.per_network[i].item() == pytest.approx(cd_mean64(logits, means, y, i, 0.8, tau), abs=1e-9)
    best = min(range(n), key=lambda j: (ce64(means[j], y), j))
    assert out.teacher == best
    # every network distils, the one whose mean teaches included (the paper's rule leaves its teacher out)
    assert all(out.terms[f"kd_{i}"].item() > 0 for i in range(n))
    # gradient isolation: the teacher is a constant for every student, the means get no gradient
    assert_isolated_given_means(method, out, logits, means, y)


def test_the_lowest_ce_mean_teaches_ties_to_the_lower_index_and_non_finite_means_cannot():
    logits, y = random_logits(3, seed=7)
    mean, _ = random_logits(1, seed=8)
    method = CompetitiveMeanTeachers(rampup=0.0)
    tied = [mean[0].detach().clone() for _ in range(3)]
    assert method.losses(StepInput.of(logits, y), mean_logits=tied).teacher == 0
    worse = [(m * 0.0).detach() for m in tied]  # uniform predictions: CE = log(5), above the tied means' CE?
    better_index = 1 if ce64(tied[0], y) < math.log(5) else 0
    assert method.losses(StepInput.of(logits, y), mean_logits=[worse[0], tied[1], worse[2]]).teacher == better_index
    broken = [tied[0].clone().fill_(float("nan")), worse[1], tied[2]]
    out = method.losses(StepInput.of(logits, y), mean_logits=broken)
    assert out.teacher == (2 if ce64(tied[2], y) < math.log(5) else 1)
    for i in range(3):
        assert out.per_network[i].item() == pytest.approx(cd_mean64(logits, broken, y, i, 1.0, 1.0), abs=1e-9)
    nothing = [m.clone().fill_(float("nan")) for m in tied]
    out = method.losses(StepInput.of(logits, y), mean_logits=nothing)
    assert out.teacher is None
    for i in range(3):  # no mean can teach: cross-entropy alone
        assert out.per_network[i].item() == pytest.approx(ce64(logits[i], y), abs=1e-9)


def test_rampup_scales_the_distillation_by_training_progress():
    logits, y = random_logits(2, seed=11)
    means, _ = random_logits(2, seed=12)
    method = CompetitiveMeanTeachers(alpha=1.0, temperature=2.0, rampup=0.3)
    for progress, weight in ((0.0, math.exp(-5.0)), (0.15, math.exp(-5.0 * 0.25)), (0.3, 1.0), (0.9, 1.0)):
        out = method.losses(StepInput.of(logits, y, progress=progress), mean_logits=means)
        for i in range(2):
            assert out.per_network[i].item() == pytest.approx(cd_mean64(logits, means, y, i, 1.0, 2.0, weight), abs=1e-9)


def test_the_means_follow_their_networks_and_teach_on_the_batch():
    torch.manual_seed(1)
    nets = [nn.Linear(4, 3).double() for _ in range(2)]
    method = CompetitiveMeanTeachers(ema_decay=0.5, rampup=0.0)
    method.setup(MethodContext(3, 1, torch.device("cpu"), nets))
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        for net in nets:
            net.weight.add_(1.0)
    start = [m.weight.detach().clone() for m in method.temporal.models]
    method.after_step(nets, None, StepInput.of([torch.zeros(1, 3)], torch.zeros(1, dtype=torch.long), step=0))
    for mean, net, old in zip(method.temporal.models, nets, start):  # decay at step 0: min(0.5, 1/10)
        assert torch.allclose(mean.weight, 0.1 * old + 0.9 * net.weight)
    logits = [net(x) for net in nets]
    out = method.losses(StepInput.of(logits, y, x=x))
    means = [m(x).detach() for m in method.temporal.models]
    for i in range(2):
        # the means run in float32 (TemporalMeans.logits), hence 1e-6
        assert out.per_network[i].item() == pytest.approx(cd_mean64(logits, means, y, i, 1.0, 1.0), abs=1e-6)
    assert set(method.eval_networks()) == {"mean0", "mean1"}
    with pytest.raises(ValueError, match="needs the batch"):
        method.losses(StepInput.of(logits, y))


def test_preset_and_options():
    assert presets()["cd-mean"] == ["method.name=cd-mean", "perturb.enabled=false"]
    assert not CompetitiveMeanTeachers().needs.perturbation
    config = load(None, TINY + ["method.name=cd-mean", "method.rampup=0.5", "method.ema_decay=0.99"])
    assert config.method.rampup == 0.5 and config.method.ema_decay == 0.99
    with pytest.raises(Exception, match="rule"):
        load(None, TINY + ["method.name=cd-mean", "method.rule=best"])


def test_trains_reports_its_means_and_resumes_bitwise(tmp_path):
    common = ("method.name=cd-mean", "perturb.enabled=false", "optim.epochs=2", "train.deterministic=true",
              "train.precision=fp32")
    summary = kdarena.train(load(None, TINY + list(common)), run_dir=tmp_path / "full")
    assert len(summary["networks"]) == 2
    record = read_metrics(tmp_path / "full")[-1]
    for i in range(2):
        assert 0.0 <= record[f"mean{i}/test_top1"] <= 100.0
    assert record["net0/teacher_share"] + record["net1/teacher_share"] == pytest.approx(1.0)
    split = tmp_path / "split"
    assert Trainer(load(None, TINY + [*common, "train.stop_after_steps=8"]), split).fit() == {"stopped_at_step": 8}
    Trainer(load(None, TINY + list(common)), split, resume=True).fit()
    full, resumed = group_state(tmp_path / "full"), group_state(split)
    assert_same(full["group"], resumed["group"], "group")
    assert_same(full["method"], resumed["method"], "method")  # the temporal means


def test_eval_and_plots_show_the_temporal_means_and_plots_name_the_method(tmp_path):
    # the report listed mean0/mean1 but `kdarena eval` and the accuracy plot left them out, and the plot's
    # legend named the run's folder ("photos") rather than its method (issue 37)
    from kdarena.engine.evaluation_cli import evaluate_checkpoint
    from kdarena.experiments import plot

    run_dir = tmp_path / "photos"
    kdarena.train(load(None, TINY + ["method.name=cd-mean", "perturb.enabled=false", "optim.epochs=1", "train.precision=fp32",
                                     "train.deterministic=true"]), run_dir=run_dir)
    record = read_metrics(run_dir)[-1]
    scored = evaluate_checkpoint(str(run_dir / "checkpoints" / "last.pt"), "test")
    for name in ("net0", "net1", "mean0", "mean1"):  # the means restored from the checkpoint, scored as in training
        assert scored[f"{name}/top1"] == pytest.approx(record[f"{name}/test_top1"], abs=1e-9), name
    runs = plot._find_runs(run_dir)
    assert [r.label for r in runs] == ["cd-mean (photos)"]
    assert [name for name, _ in plot._accuracy_panels(plot._groups(runs))] == ["net0", "net1", "ensemble", "mean0", "mean1"]
