"""Loss functions shared by every method.

All distillation terms detach the teacher: a student's loss never sends gradient
into the network it learns from (a common bug in online-distillation code).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

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


def upcast(x: Tensor) -> Tensor:
    """Half-precision values become float32 for the loss; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def cross_entropy(logits: Tensor, target: Target) -> Tensor:
    """Mean cross-entropy for class indices or a :class:`MixedTarget` (computed in float32)."""
    logits = upcast(logits)
    if isinstance(target, MixedTarget):
        return target.lam * F.cross_entropy(logits, target.a) + (1.0 - target.lam) * F.cross_entropy(
            logits, target.b
        )
    return F.cross_entropy(logits, target)


def kl_to_teacher(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(t/tau) || softmax(s/tau)) * tau^2, "batchmean" reduction, teacher detached.

    Works in log space (log_softmax on both sides), so a zero teacher probability never
    produces log(0).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_student = F.log_softmax(upcast(student_logits) / temperature, dim=1)
    log_p_teacher = F.log_softmax(upcast(teacher_logits.detach()) / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (temperature * temperature)


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
