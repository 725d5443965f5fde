"""The fused (vmapped) group forward computes what the loop computes: logits, CD losses, gradients,
BatchNorm running statistics, and keeps the original networks' parameters in sync."""
from __future__ import annotations

import copy

import pytest
import torch

from kdarena import models
from kdarena.engine.fused import FusedGroup, FusedGroupError, check_fusable
from kdarena.group import Group
from kdarena.losses import MixedTarget
from kdarena.methods import CompetitiveDistillation


pytestmark = pytest.mark.usefixtures("one_thread")


def make_pair(model: str, n: int, collect_features: bool = False, dtype=torch.float64, channels_last: bool = False):
    torch.manual_seed(n)
    nets = [models.create(model, num_classes=5, in_channels=3).to(dtype) for _ in range(n)]
    loop = Group(nets, collect_features=collect_features)
    fused_group = copy.deepcopy(loop)
    if channels_last:
        loop.to(memory_format=torch.channels_last)
        fused_group.to(memory_format=torch.channels_last)
    return loop, fused_group, FusedGroup(fused_group)


def batch(n_inputs: int, dtype=torch.float64, size: int = 8, bsz: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, 3, size, size, generator=g, dtype=dtype)
    y = torch.randint(0, 5, (bsz,), generator=g)
    return x, y


def grads(group: Group) -> list[torch.Tensor]:
    return [p.grad.clone() for p in group.parameters()]


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("model", ["resnet20", "convnet"])
@pytest.mark.parametrize("perturbed", [False, True])
def test_fused_matches_loop(n, model, perturbed):
    loop, fused_group, fused = make_pair(model, n)
    x, y = batch(n)
    inputs, targets = x, y
    if perturbed:  # one network sees its own (mixed) view, as in a perturbed training step
        x_p = x.flip(0) * 0.5 + x * 0.5
        inputs = [x_p if i == 1 else x for i in range(n)]
        targets = [MixedTarget(y, y.flip(0), 0.5) if i == 1 else y for i in range(n)]
    method = CompetitiveDistillation(alpha=1.0, beta=0.0)
    out_loop, out_fused = loop(inputs), fused(inputs)
    for a, b in zip(out_loop.logits, out_fused.logits):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)
    l_loop = method.compute(out_loop.logits, targets)
    l_fused = method.compute(out_fused.logits, targets)
    assert int(l_loop.teacher_index) == int(l_fused.teacher_index)
    torch.testing.assert_close(torch.stack(l_fused.per_network), torch.stack(l_loop.per_network), rtol=1e-9, atol=1e-10)
    l_loop.total.backward()
    l_fused.total.backward()
    for (name, p), q in zip(loop.named_parameters(), fused_group.parameters()):
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-10, msg=lambda m: f"{name}: {m}")
    for (name, b), c in zip(loop.named_buffers(), fused_group.buffers()):  # BN running statistics
        torch.testing.assert_close(c, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("n", [2, 3])
def test_fused_features_and_float32_channels_last(n):
    loop, fused_group, fused = make_pair("resnet20", n, collect_features=True, dtype=torch.float32, channels_last=True)
    x, y = batch(n, dtype=torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    method = CompetitiveDistillation(alpha=1.0, beta=1.0)
    out_loop, out_fused = loop(x), fused(x)
    assert out_fused.features is not None and len(out_fused.features) == n
    for a, b in zip(out_loop.features, out_fused.features):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    l_loop = method.compute(out_loop.logits, y, features=out_loop.features, adapt=loop.adapt)
    l_fused = method.compute(out_fused.logits, y, features=out_fused.features, adapt=fused_group.adapt)
    torch.testing.assert_close(torch.stack(l_fused.per_network), torch.stack(l_loop.per_network), rtol=1e-4, atol=1e-5)
    l_loop.total.backward()
    l_fused.total.backward()
    for (name, p), q in zip(loop.named_parameters(), fused_group.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_optimizer_steps_and_state_dict_stay_shared():
    """Training the original parameters moves the stacked ones; eval and load_state_dict see them too."""
    n = 2
    loop, fused_group, fused = make_pair("resnet20", n)
    opt_loop = torch.optim.SGD(loop.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt_fused = torch.optim.SGD(fused_group.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    method = CompetitiveDistillation(alpha=1.0, beta=0.0)
    for step in range(3):
        x, y = batch(n, seed=step)
        for group, run, opt in ((loop, loop, opt_loop), (fused_group, fused, opt_fused)):
            opt.zero_grad(set_to_none=True)
            method.compute(run(x).logits, y).total.backward()
            opt.step()
    for (name, a), b in zip(loop.state_dict().items(), fused_group.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9, msg=lambda m: f"{name}: {m}")
    for name, stacked in fused.params.items():  # the stacked leaves hold the trained values
        for i in range(n):
            torch.testing.assert_close(stacked[i].detach(), fused_group.networks[i].get_parameter(name).detach(), rtol=0, atol=0)
    # evaluation through the original modules and through the fused forward agree
    x, _ = batch(n, seed=9)
    loop.eval(), fused_group.eval()
    with torch.no_grad():
        expected = [net(x) for net in loop.networks]
        for a, b in zip(expected, fused(x).logits):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)
        # loading a checkpoint into the group reaches the stacked tensors
        fresh = Group([models.create("resnet20", 5, 3).double() for _ in range(n)])
        fresh.eval()
        fused_group.load_state_dict(fresh.state_dict())
        for a, b in zip([net(x) for net in fresh.networks], fused(x).logits):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


def test_rejects_different_architectures():
    group = Group([models.create("resnet20", 5, 3), models.create("resnet32", 5, 3)])
    with pytest.raises(FusedGroupError, match="identical architectures"):
        check_fusable(group)
    with pytest.raises(FusedGroupError, match="at least 2"):
        FusedGroup(Group([models.create("convnet", 5, 3)]))


def test_trainer_fused_matches_loop(tmp_path):
    """A few trainer steps (perturbation on, fp32) give the same losses and teachers fused or not."""
    from kdarena.config import ConfigError, load
    from kdarena.trainer import Trainer

    base = ["models=[convnet,convnet,convnet]", "data.name=digits", "data.train_subset=256", "data.val_size=64",
            "data.batch_size=32", "optim.epochs=1", "train.device=cpu", "train.progress=false",
            "train.tensorboard=false", "train.threads=1", "train.precision=fp32", "train.stop_after_steps=4"]
    pytest.importorskip("sklearn")
    logs = []
    for fused in (False, True):
        trainer = Trainer(load(None, base + [f"train.fused={str(fused).lower()}"]), run_dir=tmp_path / str(fused))
        trainer.step_log = []
        trainer.fit()
        logs.append(trainer.step_log)
    assert [r["teacher"] for r in logs[0]] == [r["teacher"] for r in logs[1]]
    for a, b in zip(logs[0], logs[1]):
        assert b["losses"] == pytest.approx(a["losses"], rel=1e-4, abs=1e-5)
    with pytest.raises(ConfigError, match="train.fused"):
        Trainer(load(None, base + ["models=[convnet,resnet20]", "train.fused=true"]), run_dir=tmp_path / "mixed")
