"""ONE and branched groups: the loss against a float64 reference written from the paper's formula,
trunk gradients against an independent written-out computation, and branched groups trained end to
end by ONE, DML and competitive distillation (resume bit for bit, ``kdarena eval``)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdarena import models
from kdarena.cli import main
from kdarena.config import ConfigError, load
from kdarena.engine import checkpoint as ckpt
from kdarena.records.folder import read_metrics
from kdarena.methods import registry
from kdarena.models.branched import BranchedGroup, BranchView, GateEnsemble, whole
from kdarena.trainer import Trainer, train

BRANCHED3 = "models=[branched:resnet20,branched:resnet20,branched:resnet20]"
TINY = [
    BRANCHED3, "data.name=digits", "data.train_subset=256", "data.val_size=64", "data.batch_size=32",
    "optim.epochs=1", "optim.lr=0.05", "train.device=cpu", "train.progress=false", "train.tensorboard=false",
    "train.threads=1", "train.precision=fp32",
]



def tiny(*overrides: str):
    return load(None, TINY + list(overrides))


# ---------------------------------------------------------------------------------- the loss
def reference_one(logits, gate, y, tau, alpha):
    """The paper's Eq. 7 written out in float64: sum_k CE_k + CE_e + alpha tau^2 sum_k KL(p_e || p_k), p_e detached."""
    m, batch = len(logits), y.shape[0]

    def ce(z):
        return sum(-(z[b, y[b]] - torch.log(torch.exp(z[b]).sum())) for b in range(batch)) / batch

    z_e = sum(gate[:, k:k + 1] * logits[k] for k in range(m))
    p_e = torch.softmax(z_e.detach() / tau, dim=1)
    per = []
    for k in range(m):
        p_k = torch.softmax(logits[k] / tau, dim=1)
        kl = (p_e * (torch.log(p_e) - torch.log(p_k))).sum() / batch
        per.append(ce(logits[k]) + alpha * tau * tau * kl)
    return per, ce(z_e)


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_one_loss_matches_float64_reference(m, tau):
    torch.manual_seed(m * 10 + int(tau))
    batch, classes, alpha = 6, 5, 0.7
    base = [torch.randn(batch, classes, dtype=torch.float64) * 2 for _ in range(m)]
    gate_raw = torch.randn(batch, m, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,))
    method = registry.get("one")(alpha=alpha, temperature=tau)

    logits = [z.clone().requires_grad_() for z in base]
    gate = torch.softmax(gate_raw, 1).requires_grad_()
    out = method.compute(logits, y, extras={"gate": gate})
    out.total.backward()

    ref_logits = [z.clone().requires_grad_() for z in base]
    ref_gate = torch.softmax(gate_raw, 1).requires_grad_()
    per, ce_e = reference_one(ref_logits, ref_gate, y, tau, alpha)
    ref_total = sum(per) + ce_e
    ref_total.backward()

    torch.testing.assert_close(out.total, ref_total, rtol=1e-10, atol=1e-12)
    for k in range(m):  # the ensemble CE is shared equally among the branches' losses
        torch.testing.assert_close(out.per_network[k], per[k] + ce_e / m, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(logits[k].grad, ref_logits[k].grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gate.grad, ref_gate.grad, rtol=1e-9, atol=1e-12)
    assert out.teacher is None and float(out.terms["ens_ce"]) == pytest.approx(ce_e.item())


def test_one_leaves_a_diverged_branch_out_of_the_ensemble():
    torch.manual_seed(0)
    logits = [torch.randn(4, 3, requires_grad=True) for _ in range(3)]
    bad = logits[1].detach().clone()
    bad[0, 0] = float("nan")
    logits[1] = bad.requires_grad_()
    gate = torch.softmax(torch.randn(4, 3), 1)
    out = registry.get("one")().compute(logits, torch.tensor([0, 1, 2, 0]), extras={"gate": gate})
    finite = [math.isfinite(v.item()) for v in out.per_network]
    assert finite == [True, False, True]


def test_one_needs_the_gate():
    with pytest.raises(ValueError, match="gate"):
        registry.get("one")().compute([torch.randn(2, 3)] * 2, torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------- trunk gradients
class LinearTrunk(nn.Module):
    """f = W x as a (N, h, 1, 1) map, so the gate's global pooling applies."""

    def __init__(self, d: int, h: int):
        super().__init__()
        self.lin = nn.Linear(d, h, bias=False)
        self.out_channels = h

    def forward(self, x):
        return self.lin(x)[:, :, None, None]


class LinearHead(nn.Module):
    def __init__(self, h: int, c: int):
        super().__init__()
        self.pool = nn.Flatten()
        self.fc = nn.Linear(h, c)
        self.feature_layer = "pool"

    def forward(self, f):
        return self.fc(self.pool(f))


@pytest.mark.parametrize("m", [2, 3])
def test_trunk_gradient_matches_the_written_out_formula(m):
    torch.manual_seed(m)
    d, h, c, batch, tau = 4, 3, 5, 8, 3.0
    group = BranchedGroup(LinearTrunk(d, h), [LinearHead(h, c) for _ in range(m)], gate=True).double().train()
    with torch.no_grad():  # a gate whose ReLU is active and whose BN has non-trivial affine parameters
        group.gate.bn.weight.uniform_(0.5, 1.5)
        group.gate.bn.bias.uniform_(1.0, 2.0)
    x = torch.randn(batch, d, dtype=torch.float64)
    y = torch.randint(0, c, (batch,))
    out = group(x)
    registry.get("one")(temperature=tau).compute(out.logits, y, extras=out.extras).total.backward()

    # the same model written out with the raw weights, differentiated by an independent autograd
    W = group.trunk.lin.weight.detach().clone().requires_grad_()
    f = x @ W.t()
    heads = [(v.head.fc.weight.detach(), v.head.fc.bias.detach()) for v in group.networks]
    z = [f @ V.t() + b for V, b in heads]
    a = f @ group.gate.fc.weight.detach().t() + group.gate.fc.bias.detach()
    mean, var = a.mean(0), a.var(0, unbiased=False)
    a = (a - mean) / torch.sqrt(var + group.gate.bn.eps) * group.gate.bn.weight.detach() + group.gate.bn.bias.detach()
    g = torch.softmax(torch.relu(a), dim=1)
    per, ce_e = reference_one(z, g, y, tau, 1.0)
    (sum(per) + ce_e).backward()
    torch.testing.assert_close(group.trunk.lin.weight.grad, W.grad, rtol=1e-9, atol=1e-12)

    # and the CE part by hand: d/dW sum_k CE(V_k W x) = sum_k V_k^T (softmax(z_k) - onehot(y)) x / N
    group.zero_grad()
    sum(F.cross_entropy(zk, y) for zk in group(x).logits).backward()
    onehot = F.one_hot(y, c).double()
    by_hand = sum(V.t() @ (torch.softmax(f.detach() @ V.t() + b, 1) - onehot).t() @ x for V, b in heads) / batch
    torch.testing.assert_close(group.trunk.lin.weight.grad, by_hand, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------- the branched group
def test_branched_group_runs_the_trunk_once_per_distinct_input():
    torch.manual_seed(0)
    group = BranchedGroup.build(["branched:resnet20"] * 3, 10, 1)
    calls = []
    group.trunk.register_forward_hook(lambda mod, i, o: calls.append(1))
    x, x_p = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    group.eval()
    with torch.no_grad():
        out = group(x)
        assert len(calls) == 1 and out.extras == {}
        mixed = group([x, x_p, x])
        assert len(calls) == 3
        for i, inp in enumerate([x, x_p, x]):  # each view alone gives the same logits (what evaluation runs)
            torch.testing.assert_close(group.networks[i](inp), mixed.logits[i])


def test_trunk_is_counted_once_and_owned_by_the_group():
    group = BranchedGroup.build(["branched:resnet32"] * 3, 100, 3, gate=True)
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    single = count(models.create("resnet32", 100).parameters())
    trunk, head = count(group.trunk.parameters()), count(group.networks[0].parameters())
    assert count(group.parameters()) == trunk + 3 * head + count(group.gate.parameters())
    assert trunk + head == single
    assert not any(k.startswith("networks.0.trunk") for k in group.state_dict())
    ids = {id(p) for p in group.network_parameters(1)}
    assert all(id(p) in ids for p in group.trunk.parameters()) and all(id(p) in ids for p in group.gate.parameters())
    assert not ids & {id(p) for p in group.networks[0].parameters()}


def test_view_load_and_deepcopy_keep_the_trunk_shared():
    torch.manual_seed(0)
    group = BranchedGroup.build(["branched:resnet20"] * 2, 10, 1)
    trunk_before = copy.deepcopy(group.trunk.state_dict())
    fresh = models.create("branched:resnet20", 10, 1)  # what re-birth loads from
    group.networks[1].load_state_dict(fresh.state_dict())
    for k, v in group.trunk.state_dict().items():
        assert torch.equal(v, trunk_before[k])
    assert torch.equal(group.networks[1].head.fc.weight, fresh.head.fc.weight)
    clone = copy.deepcopy(group.networks[0])
    assert isinstance(clone, BranchView) and not clone.shared
    assert clone.get_trunk() is not group.trunk
    group.eval(), clone.eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(clone(x), group.networks[0](x))
    # whole(view) pairs parameter for parameter with the deep copy (e.g. for a temporal mean)
    pairs = list(zip(clone.parameters(), whole(group.networks[0]).parameters(), strict=True))
    assert all(a.shape == b.shape and torch.equal(a, b) for a, b in pairs)
    assert any(b is group.trunk.conv1.weight for _, b in pairs)


def test_gate_ensemble_needs_a_gate():
    group = BranchedGroup.build(["branched:resnet20"] * 2, 10, 1)
    with pytest.raises(ValueError, match="gate"):
        GateEnsemble(group.networks)


@pytest.mark.parametrize("overrides,match", [
    (["method.name=one", "models=[resnet20,resnet20]"], "needs a branched model"),
    (["models=[branched:resnet20,resnet20]"], "same branched model"),
    (["models=[branched:vgg8,branched:vgg8]"], "no branched form"),
    (["train.fused=true"], "train.fused=false"),
    (["train.compile=true"], "train.compile=false"),
])
def test_config_errors_are_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as error:
        tiny(*overrides)
    assert "\n" not in str(error.value) and "models" in str(error.value)


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("method,extra", [
    ("one", ["perturb.enabled=false"]),
    ("dml", ["perturb.enabled=false"]),
    ("cd", ["perturb.enabled=true", "perturb.every=1"]),  # a perturbed branch: the trunk runs twice
    ("pcl", []),  # temporal means of trunk + branch
    ("kdcl", []),
    ("pskd", []),
])
def test_branched_group_trains_with_every_method(tmp_path, capsys, method, extra):
    run_dir = tmp_path / method
    trainer = Trainer(tiny(f"method.name={method}", *extra), run_dir)
    group = trainer.group
    assert isinstance(group, BranchedGroup) and len(group) == 3
    optimized = [p for g in trainer.parts.optimizer.param_groups for p in g["params"]]
    assert len({id(p) for p in optimized}) == len(optimized) == len(list(group.parameters()))
    assert sum(p.numel() for p in optimized) < 3 * sum(p.numel() for p in models.create("resnet20", 10, 1).parameters())
    assert (group.gate is not None) == (method == "one")
    trainer.fit()
    record = read_metrics(run_dir)[-1]
    extra_nets = {"one": ["gate_ensemble"], "pcl": ["mean0", "mean1", "mean2"]}.get(method, [])
    for key in ["net0", "net1", "net2", "ensemble"] + extra_nets:
        assert 0.0 <= record[f"{key}/val_top1"] <= 100.0 and 0.0 <= record[f"{key}/test_top1"] <= 100.0
    capsys.readouterr()
    assert main(["eval", str(run_dir / "checkpoints" / "last.pt")]) == 0
    out = capsys.readouterr().out
    assert all(f"net{i}/top1" in out for i in range(3)) and "ensemble/top1" in out


def test_one_gate_ensemble_metric_is_the_gated_ensemble(tmp_path):
    trainer = Trainer(tiny("method.name=one", "perturb.enabled=false"), tmp_path / "run")
    trainer.fit()
    ensemble = trainer.method.eval_networks()["gate_ensemble"]
    x = next(iter(trainer.data.val))[0]
    trainer.group.eval()
    with torch.no_grad():
        f = trainer.group.trunk(x)
        expected = sum(trainer.group.gate(f)[:, k:k + 1] * view.head(f) for k, view in enumerate(trainer.group.networks))
        torch.testing.assert_close(ensemble(x), expected)


@pytest.mark.parametrize("method,extra", [("one", ["perturb.enabled=false"]), ("cd", ["perturb.enabled=true"])])
def test_branched_resume_is_bitwise_exact(tmp_path, method, extra):
    common = (f"method.name={method}", *extra, "train.deterministic=true")
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    train(tiny(*common), full_dir)
    assert Trainer(tiny(*common, "train.stop_after_steps=4"), split_dir).fit() == {"stopped_at_step": 4}
    resumed = Trainer(tiny(*common), split_dir, resume=True)
    assert resumed.loop.global_step == 4
    resumed.fit()
    a, b = ckpt.load(full_dir / "checkpoints" / "last.pt"), ckpt.load(split_dir / "checkpoints" / "last.pt")
    assert a["group"].keys() == b["group"].keys()
    assert all(torch.equal(a["group"][k], b["group"][k]) for k in a["group"])
    losses = lambda d: [[r[f"net{i}/train_loss"] for i in range(3)] for r in read_metrics(d)]  # noqa: E731
    assert losses(full_dir) == losses(split_dir)


def test_sweep_and_report_run_one_dml_and_cd_on_the_same_branches(tmp_path):
    from kdarena.config import dump
    from kdarena.experiments.report import write_report
    from kdarena.experiments.sweep import presets, run_sweep

    assert presets()["one"] == ["method.name=one", "perturb.enabled=false"]
    config = tmp_path / "branched.yaml"
    config.write_text(dump(tiny(f"output={tmp_path}", "data.train_subset=160", "method.name=one")))
    runs = run_sweep(config, [], "one,dml,cd", "0", tmp_path / "exp")
    assert [(r["label"], r["status"]) for r in runs] == [(m, "trained") for m in ("one", "dml", "cd")]
    rows = [line for line in write_report([str(tmp_path / "exp")]).splitlines() if line.startswith("| ")]
    assert any(line.startswith("| one ") for line in rows) and any(line.startswith("| cd ") for line in rows)
