import math

import pytest
import torch

from kdarena.losses import MixedTarget, cross_entropy, feature_l2, kl_to_teacher
from reference import ce64, kl64


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kl_direction_and_tau_squared_match_float64_reference(tau):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g, dtype=torch.float64) * 3, torch.randn(8, 10, generator=g, dtype=torch.float64) * 3
    got = kl_to_teacher(s, t, tau).item()
    assert got == pytest.approx(kl64(t, s, tau), abs=1e-6)
    # float32 inputs agree to float32 precision
    assert kl_to_teacher(s.float(), t.float(), tau).item() == pytest.approx(got, rel=1e-6)
    # the other direction is a different number: the test would catch a swapped KL
    assert abs(got - kl64(s, t, tau)) > 1e-3


def test_kl_is_zero_for_identical_logits_and_handles_extreme_logits():
    z = torch.randn(4, 5)
    assert kl_to_teacher(z, z).item() == pytest.approx(0.0, abs=1e-7)
    extreme = torch.tensor([[1000.0, -1000.0, 0.0]])
    value = kl_to_teacher(torch.zeros(1, 3), extreme)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(math.log(3.0), rel=1e-5)  # KL(onehot || uniform)


def test_kl_sends_no_gradient_to_the_teacher():
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    kl_to_teacher(s, t, 2.0).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_kl_rejects_nonpositive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        kl_to_teacher(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)


def test_mixed_cross_entropy_is_the_convex_combination():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 7, generator=g)
    a, b = torch.randint(0, 7, (6,), generator=g), torch.randint(0, 7, (6,), generator=g)
    got = cross_entropy(z, MixedTarget(a, b, 0.3)).item()
    assert got == pytest.approx(0.3 * ce64(z, a) + 0.7 * ce64(z, b), abs=1e-6)
    assert cross_entropy(z, a).item() == pytest.approx(ce64(z, a), abs=1e-6)


def test_feature_l2_reductions_and_teacher_detached():
    s = torch.randn(3, 4, 2, 2, requires_grad=True)
    t = torch.randn(3, 4, 2, 2, requires_grad=True)
    squared = (s.detach().double() - t.detach().double()).pow(2)
    assert feature_l2(s, t, "sum").item() == pytest.approx(squared.sum().item(), rel=1e-6)
    assert feature_l2(s, t, "batchmean").item() == pytest.approx(squared.sum().item() / 3, rel=1e-6)
    assert feature_l2(s, t, "mean").item() == pytest.approx(squared.mean().item(), rel=1e-6)
    feature_l2(s, t).backward()
    assert t.grad is None
    with pytest.raises(ValueError, match="adapter"):
        feature_l2(torch.zeros(2, 3), torch.zeros(2, 4))
