"""Shared maths of the distillation methods: per-network CE, pairwise KL and feature matrices, teacher selection.

Every distiller expresses distillation as a weight matrix ``W[i, j]`` ("student i learns from
network j with weight W[i, j]") applied to the pairwise matrices of ``KL(p_j || p_i)`` and feature
distances, with the teacher side always detached. Because no loss reaches another network's
parameters, one backward pass on ``total`` gives every network exactly the gradient of its own loss.

Teacher selection is done on tensors (no ``.item()``): the training step never waits for the
device to decide who teaches.
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..losses import FEATURE_REDUCTIONS, Target, cross_entropy, feature_l2, upcast
from .base import Adapter, GroupLosses, GroupMethod, MethodParams, Needs, StepInput


def check_logits(logits: Sequence[Tensor], minimum: int) -> None:
    if len(logits) < minimum:
        raise ValueError(f"this method needs at least {minimum} networks, got {len(logits)}")
    shape = logits[0].shape
    for i, z in enumerate(logits):
        if z.dim() != 2 or z.shape != shape:
            raise ValueError(f"logits[{i}] has shape {tuple(z.shape)}; every network must give (batch, classes) = {tuple(shape)}")


def per_network_ce(logits: Sequence[Tensor], targets: Sequence[Target]) -> list[Tensor]:
    """Cross-entropy of each network against its own target (a perturbed network may have a mixed one)."""
    return [cross_entropy(z, t) for z, t in zip(logits, targets)]


def pairwise_kl(logits: Sequence[Tensor], temperature: float = 1.0, eligible: Tensor | None = None) -> Tensor:
    """Matrix ``K[j, i] = KL(softmax(z_j/tau) || softmax(z_i/tau)) * tau^2`` ("batchmean"), z_j detached.

    Rows of networks that are not ``eligible`` (non-finite outputs) are replaced by zeros
    before use, so their NaNs can reach neither the value nor the gradient of anyone's loss.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = torch.stack([F.log_softmax(upcast(z) / temperature, dim=1) for z in logits])  # (n, B, K)
    teacher_logp = logp.detach()
    if eligible is not None:
        teacher_logp = torch.where(eligible[:, None, None], teacher_logp, torch.zeros_like(teacher_logp))
    teacher_p = teacher_logp.exp()
    # (n_teacher, n_student, B, K) -> sum over classes and mean over the batch
    kl = teacher_p[:, None] * (teacher_logp[:, None] - logp[None, :])
    return kl.sum(dim=3).mean(dim=2) * (temperature * temperature)


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


def select_teacher(ce: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the lowest finite CE (ties: lowest index) and the eligibility mask.

    Returns index -1 when no network has a finite CE. Pure tensor ops: no host sync.
    """
    eligible = torch.isfinite(ce)
    masked = torch.where(eligible, ce, torch.full_like(ce, float("inf")))
    index = torch.argmin(masked)  # documented to return the first minimal index
    index = torch.where(eligible.any(), index, torch.full_like(index, -1))
    return index, eligible


def weighted(matrix: Tensor, weights: Tensor) -> Tensor:
    """sum_j W[i, j] * matrix[j, i] per student i, with zero-weight entries masked (not multiplied)."""
    contributions = torch.where(weights > 0, weights * matrix.t(), torch.zeros_like(weights))
    return contributions.sum(dim=1)


def sigmoid_rampup(progress: float, length: float) -> float:
    """exp(-5 (1 - t)^2) with t = progress / length, 1 from ``length`` on (Laine & Aila 2017; mean teacher)."""
    if length <= 0 or progress >= length:
        return 1.0
    t = max(progress, 0.0) / length
    return math.exp(-5.0 * (1.0 - t) ** 2)


def no_teacher(ce: Tensor) -> Tensor:
    return torch.tensor(-1, device=ce.device)


class DistillerParams(MethodParams):
    alpha: float = Field(1.0, ge=0, description="weight of the KL term")
    beta: float = Field(0.0, ge=0, description="weight of the feature loss (paper: 1.0)")
    temperature: float = Field(1.0, gt=0)
    feature_reduction: Literal["batchmean", "sum", "mean"] = "batchmean"
    feature_layers: Optional[list[Optional[str]]] = Field(None, description="one layer name per model (null: its default)")

    def check(self, num_networks: int) -> None:
        if self.feature_layers is not None and len(self.feature_layers) != num_networks:
            raise ValueError("feature_layers", f"{len(self.feature_layers)} entries for {num_networks} models; "
                             "give one per model (null: its default)")


class Distiller(GroupMethod):
    """Shared machinery of DML and competitive distillation: CE, weights W, KL and feature matrices."""

    Params = DistillerParams

    def __init__(self, alpha: float, beta: float, temperature: float, feature_reduction: str = "batchmean",
                 feature_layers: Sequence[str | None] | None = None):
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if feature_reduction not in FEATURE_REDUCTIONS:
            raise ValueError(f"feature_reduction must be one of {FEATURE_REDUCTIONS}, got {feature_reduction!r}")
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.feature_reduction = feature_reduction
        self.feature_layers = tuple(feature_layers) if feature_layers is not None else None

    @property
    def needs(self) -> Needs:
        return Needs(min_networks=self.min_networks, features=self.beta > 0, feature_layers=self.feature_layers)

    def weights(self, ce: Tensor, selection: Tensor) -> tuple[Tensor, Tensor]:
        """Return (W, teacher_index) from the detached CE and the CE that selects teachers."""
        raise NotImplementedError

    def selection_ce(self, step: StepInput, ce: Tensor) -> Tensor:
        """The CE that decides who teaches (default: each network's CE on its own input)."""
        return ce

    def distillation_scale(self, step: StepInput) -> float:
        """A factor on every distillation term this step (default 1; e.g. a ramp-up)."""
        return 1.0

    def losses(self, step: StepInput) -> GroupLosses:
        logits = step.logits
        check_logits(logits, self.min_networks)
        n = len(logits)
        ce = torch.stack(per_network_ce(logits, step.targets))
        ce_detached = ce.detach()
        selection = self.selection_ce(step, ce_detached)
        weights, teacher_index = self.weights(ce_detached, selection)
        scale = self.distillation_scale(step)
        if scale != 1.0:  # (exactly 1: leave the weights untouched, bit for bit)
            weights = weights * scale
        eligible = torch.isfinite(selection) & torch.isfinite(ce_detached)
        terms = {}
        totals = ce
        if self.alpha > 0:
            kd = weighted(pairwise_kl(logits, self.temperature, eligible), weights)
            totals = totals + self.alpha * kd
            terms.update({f"kd_{i}": kd[i].detach() for i in range(n)})
        if self.beta > 0 and step.features is not None:
            feat = weighted(pairwise_feature_l2(step.features, step.adapt, eligible, self.feature_reduction), weights)
            totals = totals + self.beta * feat
            terms.update({f"feat_{i}": feat[i].detach() for i in range(n)})
        terms.update({f"ce_{i}": ce_detached[i] for i in range(n)})
        return GroupLosses(list(totals.unbind(0)), totals.sum(), ce_detached, teacher_index, terms, weights)

    @classmethod
    def describe(cls, params, perturb) -> str:
        parts = [cls.name]
        if params.get("beta"):
            parts.append(f"β {params.get('beta')}")
        return ", ".join(parts)
