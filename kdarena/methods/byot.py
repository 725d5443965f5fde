"""BYOT: self-distillation from the deepest classifier into early exits (Zhang, Song, Gao, Chen, Bao, Ma;
"Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks via Self Distillation", ICCV 2019)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..losses import check_logits, cross_entropy, feature_l2, kl_to_teacher, upcast
from ..models.heads import HeadSpec
from .base import GroupLosses, GroupMethod, MethodParams, Needs, StepInput
from .registry import register_method


class BYOTParams(MethodParams):
    alpha: float = Field(0.1, ge=0, le=1, description="weight of the KL terms; the CEs get 1 - alpha (code: 0.1)")
    temperature: float = Field(3.0, gt=0, description="softening temperature T of the KL terms (code: 3)")
    beta: float = Field(1e-6, ge=0, description="weight of the feature hints (code: 1e-6 with the summed distance)")
    feature_reduction: Literal["sum", "batchmean", "mean"] = Field(
        "sum", description="the hints' squared distance: summed over batch and features (code), per sample, or per element")


@register_method("byot")
class BeYourOwnTeacher(GroupMethod):
    """Every network is trained on its own (one network is enough), with early exits after each of its
    stages but the last (``models.heads``: BYOT's bottleneck, pooling, a linear classifier). With z the
    network's logits and F its pooled feature (the deepest classifier), z_e, F_e those of exit e:

        L = (1 - alpha) [CE(z) + sum_e CE(z_e)]
            + alpha T^2 sum_e KL(softmax(z / T) || softmax(z_e / T)) + beta sum_e ||F_e - F||^2

    z and F detached in the last two terms (the deepest classifier teaches and is not pulled towards
    its exits). Choices (the paper gives the loss, not its settings; the reference code's unless stated):

    * alpha = 0.1, T = 3, beta = 1e-6 with the squared distance summed over the batch and the feature
      (``feature_reduction: sum``; ``batchmean`` divides by the batch size);
    * the KL term is a KL (the code writes the soft cross-entropy, which differs from it by the
      teacher's entropy: the same gradient, a different logged value);
    * the exits' architecture (the paper does not give it) is the code's bottleneck; only the deepest
      classifier is evaluated and kept for inference (the exits train with it, as heads of it);
    * ``GroupLosses.ce`` is the deepest classifier's CE (comparable with every method), ``exit_ce`` the
      exits' summed CE; networks of a group never see each other; no input perturbation.
    """

    label = "BYOT self-distillation: a network's deepest classifier teaches early exits after its stages"
    paper = "Zhang et al., Be Your Own Teacher: Improve the Performance of CNNs via Self Distillation, ICCV 2019"
    Params = BYOTParams
    params: BYOTParams
    presets = {"byot": ["method.name=byot", "perturb.enabled=false"]}
    needs = Needs(min_networks=1, perturbation=False, heads=(HeadSpec("exits"),))

    def describe(self, perturb=None) -> str:
        return f"{self.name}, α {self.params.alpha}, T {self.params.temperature}, β {self.params.beta:g}"

    def losses(self, step: StepInput) -> GroupLosses:
        p = self.params
        logits = step.logits
        check_logits(logits, self.needs.min_networks)
        exits = step.head_outputs("exits", self.name)
        ce, exit_ce, kd, hint = [], [], [], []
        for z, target, (exit_logits, exit_features, final) in zip(logits, step.targets, exits):
            ce.append(cross_entropy(z, target))
            exit_ce.append(sum(cross_entropy(ze, target) for ze in exit_logits))
            kd.append(sum(kl_to_teacher(ze, z, p.temperature) for ze in exit_logits))
            hint.append(sum(feature_l2(upcast(fe), upcast(final), p.feature_reduction) for fe in exit_features))
        ce, exit_ce, kd, hint = torch.stack(ce), torch.stack(exit_ce), torch.stack(kd), torch.stack(hint)
        totals = (1 - p.alpha) * (ce + exit_ce) + p.alpha * kd + p.beta * hint
        return GroupLosses.of(totals, ce, exit_ce=exit_ce, kd=kd, hint=hint)
