"""What DML and competitive distillation share: CE, a weight matrix W, the KL and feature matrices.

Every distiller expresses distillation as a weight matrix ``W[i, j]`` ("student i learns from
network j with weight W[i, j]") applied to the pairwise matrices of ``KL(p_j || p_i)`` and feature
distances, with the teacher side always detached. Because no loss reaches another network's
parameters, one backward pass on ``total`` gives every network exactly the gradient of its own loss.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import Tensor

from ..losses import check_logits, pairwise_feature_l2, pairwise_kl, per_network_ce, weighted
from .base import GroupLosses, GroupMethod, MethodParams, Needs, StepInput


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
    params: DistillerParams

    @property
    def needs(self) -> Needs:
        p = self.params
        layers = tuple(p.feature_layers) if p.feature_layers is not None else None
        return Needs(min_networks=2, features=p.beta > 0, feature_layers=layers)

    def weights(self, ce: Tensor, selection: Tensor) -> tuple[Tensor, Tensor | None]:
        """Return (W, teacher_index or None) from the detached CE and the CE that selects teachers."""
        raise NotImplementedError

    def selection_ce(self, step: StepInput, ce: Tensor) -> Tensor:
        """The CE that decides who teaches (default: each network's CE on its own input)."""
        return ce

    def distillation_scale(self, step: StepInput) -> float:
        """A factor on every distillation term this step (default 1; e.g. a ramp-up)."""
        return 1.0

    def losses(self, step: StepInput) -> GroupLosses:
        p = self.params
        logits = step.logits
        check_logits(logits, self.needs.min_networks)
        ce = torch.stack(per_network_ce(logits, step.targets))
        ce_detached = ce.detach()
        selection = self.selection_ce(step, ce_detached)
        weights, teacher_index = self.weights(ce_detached, selection)
        scale = self.distillation_scale(step)
        if scale != 1.0:  # (exactly 1: leave the weights untouched, bit for bit)
            weights = weights * scale
        eligible = torch.isfinite(selection) & torch.isfinite(ce_detached)
        series = {}
        totals = ce
        if p.alpha > 0:
            series["kd"] = weighted(pairwise_kl(logits, p.temperature, eligible), weights)
            totals = totals + p.alpha * series["kd"]
        if p.beta > 0 and step.features is not None:
            series["feat"] = weighted(pairwise_feature_l2(step.features, step.adapt, eligible, p.feature_reduction), weights)
            totals = totals + p.beta * series["feat"]
        return GroupLosses.of(totals, ce, teacher_index, weights, **series)

    #: the distillation options a description names when they differ from their defaults, and their symbols
    DESCRIBED = {"temperature": "T", "alpha": "α", "beta": "β"}

    def distillation_parts(self) -> list[str]:
        """``T 4.0``, ``α 0.5``, ``β 1.0``: each distillation option not at its default (two runs that differ in one
        differ in their description; at the defaults, nothing)."""
        fields = type(self.params).model_fields
        return [f"{symbol} {getattr(self.params, key)}" for key, symbol in self.DESCRIBED.items()
                if getattr(self.params, key) != fields[key].default]

    def describe(self, perturb=None) -> str:
        return ", ".join([self.name, *self.distillation_parts()])
