"""The model zoo's extra heads (kdarena.models.heads): built from the network's own layers, trained with it,
absent from evaluation, collected by the group, refused where a model cannot carry them."""
from __future__ import annotations

import pytest
import torch

from kdarena import models
from kdarena.group import Group
from kdarena.models.branched import BranchedGroup
from kdarena.models.heads import HeadError, HeadSpec, attach, heads_of

ALL = [HeadSpec("embedding", 16), HeadSpec("attention", 4), HeadSpec("exits")]


def test_heads_are_the_networks_own_and_run_in_training_only():
    net = models.create("resnet8", num_classes=7)
    plain = sum(p.numel() for p in net.parameters())
    heads = attach(net, ALL)
    assert heads is heads_of(net) and sum(p.numel() for p in net.parameters()) > plain
    assert any(k.startswith("aux_heads.exits.1.") for k in net.state_dict())  # checkpoints carry them
    group = Group([net]).train()
    x = torch.randn(3, 3, 32, 32)
    result = group(x)
    out = result.extras["heads"][0]
    assert out["embedding"].shape == (3, 16)
    torch.testing.assert_close(out["embedding"].norm(dim=1), torch.ones(3))
    assert [t.shape for t in out["attention"]] == [(3, 16), (3, 16)]  # 64 features / 4
    exit_logits, exit_features, final = out["exits"]
    assert [t.shape for t in exit_logits] == [(3, 7), (3, 7)] and [t.shape for t in exit_features] == [(3, 64), (3, 64)]
    torch.testing.assert_close(net.fc(final), result.logits[0])  # the pooled feature the classifier reads
    # exit k: kernel and stride = the downsampling from its stage (32, 16 pixels) to the last stage (8)
    assert [e.bottleneck[3].stride for e in heads.exits] == [(4, 4), (2, 2)]
    group.eval()
    assert group(x).extras["heads"] == [{}]  # evaluation computes the plain network


def test_the_logits_do_not_change_with_heads():
    torch.manual_seed(0)
    plain = models.create("resnet8", num_classes=5)
    torch.manual_seed(0)
    headed = models.create("resnet8", num_classes=5)
    attach(headed, ALL)
    x = torch.randn(2, 3, 32, 32)
    for mode in (True, False):
        plain.train(mode), headed.train(mode)
        torch.testing.assert_close(plain(x), headed(x))


def test_a_forward_outside_the_group_leaves_nothing_for_the_next_step():
    net = models.create("resnet8", num_classes=5)
    attach(net, [HeadSpec("embedding")])
    group = Group([net]).train()
    net(torch.randn(4, 3, 32, 32))  # e.g. a clean-batch CE of the competition
    out = group(torch.randn(2, 3, 32, 32)).extras["heads"][0]
    assert out["embedding"].shape[0] == 2


def test_exits_for_wrn_resnet18_and_gradients_reach_them():
    for name, count in (("wrn16_2", 2), ("resnet18", 3)):
        net = models.create(name, num_classes=10)
        heads = attach(net, [HeadSpec("exits")])
        assert len(heads.exits) == count
        net.train()(torch.randn(2, 3, 32, 32))
        logits, _, _ = heads.take()["exits"]
        sum(z.sum() for z in logits).backward()
        assert all(p.grad is not None for p in heads.parameters())


def test_branches_of_a_shared_trunk_carry_embedding_and_attention():
    group = BranchedGroup.build(["branched:resnet8"] * 3, 10)
    for view in group.networks:
        attach(view, [HeadSpec("attention")])
    group.train()
    out = group(torch.randn(4, 3, 32, 32))
    assert len(out.extras["heads"]) == 3 and out.extras["heads"][2]["attention"][0].shape == (4, 8)
    with pytest.raises(HeadError, match="shared trunk"):
        attach(BranchedGroup.build(["branched:resnet8"] * 2, 10).networks[0], [HeadSpec("exits")])


@pytest.mark.parametrize("name,specs,match", [
    ("mlp", [HeadSpec("exits")], "stage_layers"),
    ("convnet", [HeadSpec("exits")], "stage_layers"),
])
def test_a_model_that_cannot_carry_a_head_is_refused(name, specs, match):
    net = models.create(name, num_classes=10, in_channels=3)
    with pytest.raises(HeadError, match=match) as error:
        attach(net, specs)
    assert "\n" not in str(error.value)


def test_head_specs_are_checked():
    with pytest.raises(ValueError, match="unknown head kind"):
        HeadSpec("projector")
    with pytest.raises(ValueError, match="size must be >= 1"):
        HeadSpec("embedding", 0)
    net = models.create("resnet8", num_classes=5)
    attach(net, [HeadSpec("embedding")])
    with pytest.raises(HeadError, match="once"):
        attach(net, [HeadSpec("exits")])
