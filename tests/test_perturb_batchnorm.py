"""BatchNorm running-statistics protection (kdarena.perturb.batchnorm): snapshot before a forward,
restore after, for the loop and the fused (vmapped) group, and conditionally on a device flag."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdarena import models
from kdarena.engine.fused import FusedGroup
from kdarena.group import Group
from kdarena.perturb import BatchNormSnapshot, GroupBatchNormSnapshot, bn_buffers, frozen_bn_stats, preserved_bn_stats


pytestmark = pytest.mark.usefixtures("one_thread")


def make_group(n: int = 3) -> Group:
    torch.manual_seed(0)
    return Group([models.create("resnet20", num_classes=5, in_channels=3) for _ in range(n)])


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)


def buffers(net: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for b in bn_buffers(net)]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def moved(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Every running mean / var changed (and num_batches_tracked counted the batch)."""
    return all(not torch.equal(x, y) for x, y in zip(a, b))


def test_bn_buffers_finds_running_statistics_only():
    net = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm1d(3, track_running_stats=False), nn.BatchNorm2d(2, momentum=None))
    found = bn_buffers(net)
    assert [tuple(b.shape) for b in found] == [(4,), (4,), (), (2,), (2,), ()]


@pytest.mark.parametrize("fused", [False, True])
def test_perturbed_network_statistics_unchanged_others_moved(fused):
    group = make_group()
    runner = FusedGroup(group) if fused else group
    x, y = batch()
    before = [buffers(net) for net in group.networks]
    stacked_before = {k: v.clone() for k, v in runner.buffers.items()} if fused else None
    with preserved_bn_stats(group.networks[1]):
        out = runner([x * 3, x * 3 + 1, x * 3])  # the perturbed network sees its own, shifted view
    after = [buffers(net) for net in group.networks]
    assert same(after[1], before[1])
    assert moved(after[0], before[0]) and moved(after[2], before[2])
    if fused:  # the per-network buffers are views: the stacked tensors vmap reads were restored too
        for name, stacked in runner.buffers.items():
            assert torch.equal(stacked[1], stacked_before[name][1]), name
            assert not torch.equal(stacked[0], stacked_before[name][0]), name
    # the backward still runs after the restore (BatchNorm saves its running buffers for it)
    sum(nn.functional.cross_entropy(z, y) for z in out.logits).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in group.networks[1].parameters())


@pytest.mark.parametrize("fused", [False, True])
def test_restore_is_bit_for_bit_the_momentum_zero_forward(fused):
    """What the former frozen_bn_stats (momentum 0 during the forward) gave: same logits, gradients, buffers."""
    group = make_group(2)
    ref = copy.deepcopy(group)
    x, y = batch(1)
    inputs = [x, x.flip(0) * 2]
    layers = [m for m in ref.networks[1].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracked = [m.num_batches_tracked.clone() for m in layers]
    for m in layers:
        m.momentum = 0.0
    ref_out = ref(inputs)
    for m, t in zip(layers, tracked):
        m.momentum = 0.1
        m.num_batches_tracked.copy_(t)
    runner = FusedGroup(group) if fused else group
    with frozen_bn_stats(group.networks[1]):
        out = runner(inputs)
    for z, r in zip(out.logits, ref_out.logits):
        if fused:  # vmap's batched kernels are not the loop's bit for bit (see tests/test_fused.py)
            torch.testing.assert_close(z, r, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(z, r)
    sum(nn.functional.cross_entropy(z, y) for z in out.logits).backward()
    sum(nn.functional.cross_entropy(z, y) for z in ref_out.logits).backward()
    for net, ref_net in zip(group.networks, ref.networks):
        for a, b in zip(bn_buffers(net), bn_buffers(ref_net)):
            if fused:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(a, b)
    if not fused:
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(group.parameters(), ref.parameters()))


def test_preserved_bn_stats_none_and_exception():
    with preserved_bn_stats(None) as snap:
        assert snap.buffers == []
    group = make_group(2)
    x, _ = batch()
    before = buffers(group.networks[0])
    with pytest.raises(RuntimeError, match="boom"):
        with preserved_bn_stats(group.networks[0]):
            group.networks[0](x)
            raise RuntimeError("boom")
    assert same(buffers(group.networks[0]), before)


@pytest.mark.parametrize("fused", [False, True])
def test_restore_where_nan_batch_leaves_finite_buffers(fused):
    group = make_group()
    runner = FusedGroup(group) if fused else group
    x, y = batch()
    before = [buffers(net) for net in group.networks]
    snap = GroupBatchNormSnapshot(group.networks)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    out = runner([x, bad, x])  # network 1 gets a non-finite batch
    loss = torch.stack([nn.functional.cross_entropy(z, y) for z in out.logits])
    assert not all(torch.isfinite(b).all() for b in bn_buffers(group.networks[1]))
    nonfinite = ~torch.isfinite(loss)  # stays on the device: no host sync
    assert nonfinite.tolist() == [False, True, False]
    snap.restore_where(nonfinite)
    after = [buffers(net) for net in group.networks]
    assert all(torch.isfinite(b).all() for b in after[1])
    assert same(after[1], before[1])
    assert moved(after[0], before[0]) and moved(after[2], before[2])
    if fused:
        for stacked in runner.buffers.values():
            assert torch.isfinite(stacked).all()
    with pytest.raises(ValueError, match="one per network"):
        snap.restore_where(nonfinite[:2])


def test_single_snapshot_restore_where_flag():
    group = make_group(2)
    net = group.networks[0]
    x, _ = batch()
    before = buffers(net)
    snap = BatchNormSnapshot(net)
    net(x)
    moved_values = buffers(net)
    snap.restore_where(torch.tensor(False))
    assert same(buffers(net), moved_values)
    snap.restore_where(False)
    assert same(buffers(net), moved_values)
    snap.restore_where(torch.tensor(True))
    assert same(buffers(net), before)
    with pytest.raises(ValueError, match="0-dim"):
        snap.restore_where(torch.tensor([True, False]))
