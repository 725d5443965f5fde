"""The distillation maths every method shares, in one place.

Cross-entropy (hard or mixed targets), KL at a temperature (the one implementation: single pairs,
whole matrices of pairs, teachers given as logits or log-probabilities), feature distances, the
weight matrix ``W[i, j]`` ("student i learns from network j") applied to a pairwise matrix, teacher
selection and the sigmoid ramp. Methods import their maths from here and their types from
:mod:`kdarena.methods.base`, never from each other.

All distillation terms detach the teacher: a student's loss never sends gradient into the network
it learns from (a common bug in online-distillation code). Teacher selection works on tensors (no
``.item()``): the training step never waits for the device to decide who teaches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class MixedTarget:
    """Targets of a mixed batch (mixup / cutmix): the loss is lam*CE(y_a) + (1-lam)*CE(y_b)."""

    a: Tensor
    b: Tensor
    lam: float

    def to(self, device: torch.device | str) -> "MixedTarget":
        return MixedTarget(self.a.to(device), self.b.to(device), self.lam)


Target = Union[Tensor, MixedTarget]
#: student i's features mapped to network j's shape (``Group.adapt``)
Adapter = Callable[[int, int, Tensor], Tensor]


def upcast(x: Tensor) -> Tensor:
    """Half-precision values become float32 for the loss; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def cross_entropy(logits: Tensor, target: Target, reduction: str = "mean") -> Tensor:
    """Cross-entropy for class indices or a :class:`MixedTarget` (computed in float32 or wider)."""
    logits = upcast(logits)
    if isinstance(target, MixedTarget):
        return target.lam * F.cross_entropy(logits, target.a, reduction=reduction) + (1.0 - target.lam) * F.cross_entropy(
            logits, target.b, reduction=reduction)
    return F.cross_entropy(logits, target, reduction=reduction)


def per_network_ce(logits: Sequence[Tensor], targets: Sequence[Target]) -> list[Tensor]:
    """Cross-entropy of each network against its own target (a perturbed network may have a mixed one)."""
    return [cross_entropy(z, t) for z, t in zip(logits, targets)]


def check_logits(logits: Sequence[Tensor], minimum: int) -> None:
    if len(logits) < minimum:
        raise ValueError(f"this method needs at least {minimum} networks, got {len(logits)}")
    shape = logits[0].shape
    for i, z in enumerate(logits):
        if z.dim() != 2 or z.shape != shape:
            raise ValueError(f"logits[{i}] has shape {tuple(z.shape)}; every network must give (batch, classes) = {tuple(shape)}")


def log_softmax_at(logits: Tensor, temperature: float) -> Tensor:
    """log softmax(z / tau) over the last dimension, in float32 or wider."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.log_softmax(upcast(logits) / temperature, dim=-1)


def soft_kl(student_logp: Tensor, teacher_logp: Tensor, temperature: float, teacher_grad: bool = False) -> Tensor:
    """KL(p_t || p_s) * tau^2 from log-probabilities at temperature tau, the teacher detached (``teacher_grad``:
    not detached -- only for a method whose teacher must learn from it, e.g. OKDDip's attention).

    Summed over classes (the last dimension) and averaged over the batch (the one before); leading
    dimensions broadcast, so a (n, 1, B, K) teacher against (1, n, B, K) students is the matrix of
    every pair. Log space on both sides: a zero teacher probability never produces log(0).
    """
    kl = F.kl_div(student_logp, teacher_logp if teacher_grad else teacher_logp.detach(), reduction="none", log_target=True)
    return kl.sum(dim=-1).mean(dim=-1) * (temperature * temperature)


def kl_to_teacher(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, teacher_grad: bool = False) -> Tensor:
    """KL(softmax(t/tau) || softmax(s/tau)) * tau^2, averaged over the batch, teacher detached (see :func:`soft_kl`)."""
    teacher = teacher_logits if teacher_grad else teacher_logits.detach()
    return soft_kl(log_softmax_at(student_logits, temperature), log_softmax_at(teacher, temperature), temperature, teacher_grad)


def pairwise_kl(logits: Sequence[Tensor], temperature: float = 1.0, eligible: Tensor | None = None) -> Tensor:
    """Matrix ``K[j, i] = KL(softmax(z_j/tau) || softmax(z_i/tau)) * tau^2``, z_j detached.

    Rows of networks that are not ``eligible`` (non-finite outputs) are replaced by zeros
    before use, so their NaNs can reach neither the value nor the gradient of anyone's loss.
    """
    logp = torch.stack([log_softmax_at(z, temperature) for z in logits])  # (n, B, K)
    teacher_logp = logp.detach()
    if eligible is not None:
        teacher_logp = torch.where(eligible[:, None, None], teacher_logp, torch.zeros_like(teacher_logp))
    return soft_kl(logp[None, :], teacher_logp[:, None], temperature)


def finite_networks(logits: Sequence[Tensor]) -> Tensor:
    """(n,) bool: which networks gave finite logits on the whole batch (the others are left out of any ensemble)."""
    return torch.stack([torch.isfinite(z).all() for z in logits])


def logit_mean(logits: Sequence[Tensor], eligible: Tensor) -> Tensor:
    """Mean of the eligible networks' logits, detached (zeros when none is eligible: the caller masks that case)."""
    z = torch.stack([upcast(t.detach()) for t in logits])
    z = torch.where(eligible[:, None, None], z, torch.zeros_like(z))
    return z.sum(0) / eligible.sum().clamp(min=1).to(z.dtype)


FEATURE_REDUCTIONS = ("batchmean", "sum", "mean")


def feature_l2(student_features: Tensor, teacher_features: Tensor, reduction: str = "batchmean") -> Tensor:
    """Squared L2 distance between feature maps, teacher detached.

    ``"sum"`` is the paper's literal sum over the batch of ||F_s - F_t||^2; ``"batchmean"``
    (default) divides that by the batch size, like the KL's reduction, so beta does not
    have to change with the batch size; ``"mean"`` averages over every element.
    """
    if reduction not in FEATURE_REDUCTIONS:
        raise ValueError(f"feature reduction must be one of {FEATURE_REDUCTIONS}, got {reduction!r}")
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"feature shapes differ: student {tuple(student_features.shape)} vs teacher "
            f"{tuple(teacher_features.shape)}; give the student an adapter (Group(feature_adapters=True))"
        )
    diff = upcast(student_features) - upcast(teacher_features.detach())
    squared = diff.pow(2)
    if reduction == "mean":
        return squared.mean()
    total = squared.sum()
    return total if reduction == "sum" else total / diff.shape[0]


def pairwise_feature_l2(features: Sequence[Tensor], adapt: Adapter | None, eligible: Tensor, reduction: str) -> Tensor:
    """Matrix ``D[j, i]`` = feature loss of student i towards network j (teacher side detached, zero diagonal)."""
    n = len(features)
    rows = []
    for j in range(n):
        teacher = upcast(features[j].detach())
        teacher = torch.where(eligible[j], teacher, torch.zeros_like(teacher))
        row = []
        for i in range(n):
            if i == j:
                row.append(upcast(features[i]).new_zeros(()))
                continue
            student = adapt(i, j, features[i]) if adapt is not None else features[i]
            row.append(feature_l2(student, teacher, reduction))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def weighted(matrix: Tensor, weights: Tensor) -> Tensor:
    """sum_j W[i, j] * matrix[j, i] per student i, with zero-weight entries masked (not multiplied)."""
    contributions = torch.where(weights > 0, weights * matrix.t(), torch.zeros_like(weights))
    return contributions.sum(dim=1)


def select_teacher(ce: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the lowest finite CE (ties: lowest index) and the eligibility mask.

    Returns index -1 when no network has a finite CE. Pure tensor ops: no host sync.
    """
    eligible = torch.isfinite(ce)
    masked = torch.where(eligible, ce, torch.full_like(ce, float("inf")))
    index = torch.argmin(masked)  # documented to return the first minimal index
    index = torch.where(eligible.any(), index, torch.full_like(index, -1))
    return index, eligible


def sigmoid_rampup(position: float, length: float) -> float:
    """exp(-5 (1 - t)^2) with t = position / length, 1 from ``length`` on (Laine & Aila 2017; mean teacher).

    ``position`` and ``length`` in one unit: a fraction of training, or epochs.
    """
    if length <= 0 or position >= length:
        return 1.0
    t = max(position, 0.0) / length
    return math.exp(-5.0 * (1.0 - t) ** 2)
