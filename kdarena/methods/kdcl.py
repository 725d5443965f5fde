"""KDCL: online knowledge distillation via collaborative learning (Guo et al., CVPR 2020)."""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from pydantic import Field
from torch import Tensor

from ..losses import (MixedTarget, Target, check_logits, finite_networks, log_softmax_at, logit_mean, per_network_ce,
                      soft_kl, upcast)
from .base import GroupLosses, GroupMethod, MethodParams, Needs, StepInput
from .registry import register_method


def min_logit(logits: Sequence[Tensor], labels: Tensor, eligible: Tensor) -> Tensor:
    """KDCL's MinLogit ensemble: per sample and class k, min over eligible peers of z_k - z_y, detached."""
    z = torch.stack([upcast(t.detach()) for t in logits])  # (n, B, K)
    shifted = z - z.gather(2, labels.view(1, -1, 1).expand(z.shape[0], -1, 1))
    shifted = torch.where(eligible[:, None, None], shifted, torch.full_like(shifted, float("inf")))
    ensemble = shifted.min(dim=0).values
    return torch.where(torch.isfinite(ensemble), ensemble, torch.zeros_like(ensemble))


def hard_labels(step: StepInput) -> Tensor:
    """The batch's class indices (MinLogit needs the true class of every sample)."""
    if step.y is not None:
        return step.y
    target: Target = step.targets[0]
    if isinstance(target, MixedTarget):
        raise ValueError("method.ensemble=minlogit needs hard labels, got a mixed (mixup/cutmix) target; "
                         "use method.ensemble=naive or turn mixing off")
    return target


class KDCLParams(MethodParams):
    alpha: float = Field(1.0, ge=0, description="weight of the KL to the ensemble (paper: 1)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the KL (not stated for CIFAR: ours 1)")
    ensemble: Literal["naive", "minlogit"] = Field("naive", description="naive: mean of the peers' logits; "
                                                   "minlogit: per class the minimum over peers of z_k - z_y")
    own_views: bool = Field(True, description="each network sees its own random augmentation of the batch (paper)")


@register_method("kdcl")
class KDCL(GroupMethod):
    """KDCL (Guo, Wang, Wu, Yu, Liang, Hu, Luo; "Online Knowledge Distillation via Collaborative
    Learning", CVPR 2020): every peer distils from an ensemble of all peers' logits.

    Implemented, for every network i of the group (z_j: peer j's logits on its own view)::

        naive:     z_ens = (1/m) sum_j z_j
        minlogit:  z_ens[b, k] = min_j (z_j[b, k] - z_j[b, y_b])
        L_i = CE(z_i, y) + alpha * tau^2 * KL(softmax(z_ens/tau) || softmax(z_i/tau))

    with z_ens detached: no gradient reaches any peer through the teacher, so one backward pass
    of sum_i L_i gives every network the gradient of its own loss.

    Choices where the paper is silent or that this implementation adds:

    * Views (``own_views``, default on, as the paper): each network is given its own random
      augmentation of the same images (``Needs(own_views=True)``: the trainer draws one view per
      network), and the ensemble combines the peers' outputs on *their own* views, as the paper
      does: the teacher is the ensemble of what the peers actually computed, no extra forward pass.
      The student's KL compares that ensemble with its output on its own view. Views differ only
      where the data is augmented (``data.crop_padding``/``flip``/``rotation``).
    * A peer with non-finite logits is left out of the ensemble (mean or minimum over the rest);
      if every peer is non-finite the KL term is zero. One diverged network cannot poison the others.
    * The paper's "linear" and "general" ensembles fit weights on held-out data and are not offered.
    * Temperature: default 1 (not stated for CIFAR in our sources); alpha default 1 (paper).
    * The competition's input perturbation does not apply (``Needs(perturbation=False)``): there is
      no competition to filter a perturbed network out of the ensemble.
    """

    label = "KDCL: every network distils from the ensemble of all peers' logits, each peer on its own augmented view"
    paper = "Guo et al., Online Knowledge Distillation via Collaborative Learning, CVPR 2020"
    Params = KDCLParams
    params: KDCLParams
    presets = {
        "kdcl": ["method.name=kdcl", "perturb.enabled=false"],
        "kdcl-minlogit": ["method.name=kdcl", "method.ensemble=minlogit", "perturb.enabled=false"],
    }

    @property
    def needs(self) -> Needs:
        return Needs(min_networks=2, perturbation=False, own_views=self.params.own_views)

    def teacher_logits(self, step: StepInput) -> tuple[Tensor, Tensor]:
        """(z_ens detached, whether any peer was eligible)."""
        eligible = finite_networks(step.logits)
        if self.params.ensemble == "minlogit":
            return min_logit(step.logits, hard_labels(step), eligible), eligible.any()
        return logit_mean(step.logits, eligible), eligible.any()

    def losses(self, step: StepInput) -> GroupLosses:
        p = self.params
        logits = step.logits
        check_logits(logits, self.needs.min_networks)
        ce = torch.stack(per_network_ce(logits, step.targets))
        ensemble, any_eligible = self.teacher_logits(step)
        students = torch.stack([log_softmax_at(z, p.temperature) for z in logits])
        kd = soft_kl(students, log_softmax_at(ensemble, p.temperature), p.temperature)
        kd = torch.where(any_eligible, kd, torch.zeros_like(kd))
        return GroupLosses.of(ce + p.alpha * kd, ce, kd=kd)

    def describe(self, perturb=None) -> str:
        p = self.params
        parts = [self.name, f"{p.ensemble} ensemble", f"τ {p.temperature}"]
        if not p.own_views:
            parts.append("shared view")
        return ", ".join(parts)
