"""Independent training: every network alone on cross-entropy (the baseline every table starts from)."""
from __future__ import annotations

import torch

from ..losses import check_logits, per_network_ce
from .base import GroupLosses, GroupMethod, Needs, StepInput
from .registry import register_method


@register_method("independent")
class Independent(GroupMethod):
    """Every network trains alone on cross-entropy: L_i = CE_i."""

    label = "independent training (cross-entropy only)"
    paper = "baseline"
    presets = {"independent": ["method.name=independent", "perturb.enabled=false"]}
    # No competition filters a perturbed batch here: with one network "perturb one network" would
    # mean every batch (and its BatchNorm statistics frozen); train independently means plain training.
    needs = Needs(min_networks=1, perturbation=False)

    def losses(self, step: StepInput) -> GroupLosses:
        check_logits(step.logits, self.needs.min_networks)
        ce_list = per_network_ce(step.logits, step.targets)
        ce = torch.stack(ce_list)
        return GroupLosses.of(ce, ce, per_network=ce_list)
