"""Independent training: every network alone on cross-entropy (the baseline every table starts from)."""
from __future__ import annotations

import torch

from .base import GroupLosses, GroupMethod, Needs, StepInput
from .common import check_logits, no_teacher, per_network_ce
from .registry import register_method


@register_method("independent")
class Independent(GroupMethod):
    """Every network trains alone on cross-entropy: L_i = CE_i."""

    label = "independent training (cross-entropy only)"
    paper = "baseline"
    presets = {"independent": ["method.name=independent", "perturb.enabled=false"]}

    @property
    def needs(self) -> Needs:
        # No competition filters a perturbed batch here: with one network "perturb one network" would
        # mean every batch (and its BatchNorm statistics frozen); train independently means plain training.
        return Needs(min_networks=1, perturbation=False)

    def losses(self, step: StepInput) -> GroupLosses:
        check_logits(step.logits, 1)
        ce_list = per_network_ce(step.logits, step.targets)
        ce = torch.stack(ce_list)
        terms = {f"ce_{i}": c.detach() for i, c in enumerate(ce_list)}
        return GroupLosses(ce_list, ce.sum(), ce.detach(), no_teacher(ce), terms)
