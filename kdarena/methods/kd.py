"""Offline knowledge distillation from a fixed, pre-trained teacher (Hinton, Vinyals, Dean; 2015)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from pydantic import Field
from torch import nn

from .base import GroupLosses, GroupMethod, MethodContext, MethodParams, Needs, StepInput
from .common import check_logits, no_teacher, pairwise_kl, per_network_ce
from .registry import register_method


class KDParams(MethodParams):
    # config defaults alpha = tau = 1 as in every kdarena release so far (the Python class defaults to Hinton's 0.9 / 4)
    alpha: float = Field(1.0, ge=0, description="weight of the KL term")
    temperature: float = Field(1.0, gt=0)
    ce_weight: float = Field(1.0, ge=0, description="weight of the students' own CE")
    teacher_model: str = Field(description="the frozen teacher's model name")
    teacher_checkpoint: Optional[str] = Field(None, description="a kdarena checkpoint or a state_dict file")
    teacher_index: int = Field(0, ge=0, description="which network of a kdarena checkpoint teaches")


def freeze(module: nn.Module) -> nn.Module:
    """Put a teacher network in eval mode with every parameter frozen."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@register_method("kd")
class KnowledgeDistillation(GroupMethod):
    """L_i = ce_weight * CE_i + alpha * KL(softmax(t/tau) || softmax(s_i/tau)) * tau^2 for every student i.

    The teacher is built by :meth:`setup` from ``teacher_model`` (+ ``teacher_checkpoint``) and
    frozen; its logits on the clean batch are computed without gradient, under the step's
    autocast. In the Python API, ``StepInput.teacher_logits`` may be passed instead. The students
    are not perturbed (there is no competition to filter a perturbation).
    """

    label = "offline knowledge distillation from a frozen, pre-trained teacher"
    paper = "Hinton et al., Distilling the Knowledge in a Neural Network, 2015"
    Params = KDParams
    presets = {}  # needs a teacher model: no preset without one

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0, ce_weight: float = 1.0,
                 teacher_model: str | None = None, teacher_checkpoint: str | None = None, teacher_index: int = 0):
        if alpha < 0 or ce_weight < 0:
            raise ValueError(f"alpha and ce_weight must be >= 0, got alpha={alpha}, ce_weight={ce_weight}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha, self.temperature, self.ce_weight = float(alpha), float(temperature), float(ce_weight)
        self.teacher_model, self.teacher_checkpoint, self.teacher_index = teacher_model, teacher_checkpoint, teacher_index
        self.teacher: nn.Module | None = None

    @property
    def needs(self) -> Needs:
        return Needs(min_networks=1, perturbation=False)

    def setup(self, context: MethodContext) -> None:
        if self.teacher_model is None:
            return
        from .. import models
        from ..engine.checkpoint import load_network_state

        teacher = models.create(self.teacher_model, num_classes=context.num_classes, in_channels=context.in_channels)
        if self.teacher_checkpoint:
            state = load_network_state(Path(self.teacher_checkpoint), self.teacher_index, "method.teacher_checkpoint")
            try:
                teacher.load_state_dict(state)
            except RuntimeError as error:
                raise ValueError(f"method.teacher_checkpoint does not fit method.teacher_model={self.teacher_model!r}: "
                                 f"{str(error).splitlines()[0]}") from None
        self.teacher = freeze(teacher.to(context.device))

    def losses(self, step: StepInput) -> GroupLosses:
        logits = step.logits
        check_logits(logits, 1)
        teacher_logits = step.teacher_logits
        if teacher_logits is None:
            if self.teacher is None or step.x is None:
                raise ValueError("KnowledgeDistillation needs teacher_logits, or a teacher_model and the clean batch")
            with torch.no_grad(), step.autocast():
                teacher_logits = self.teacher(step.x)
        n = len(logits)
        ce = torch.stack(per_network_ce(logits, step.targets))
        kd = pairwise_kl([teacher_logits.detach(), *logits], self.temperature)[0, 1:]
        totals = self.ce_weight * ce + self.alpha * kd
        terms = {f"ce_{i}": ce[i].detach() for i in range(n)}
        terms.update({f"kd_{i}": kd[i].detach() for i in range(n)})
        return GroupLosses(list(totals.unbind(0)), totals.sum(), ce.detach(), no_teacher(ce), terms)

    @classmethod
    def describe(cls, params, perturb) -> str:
        return f"kd from {params.get('teacher_model')}, τ {params.get('temperature')}"
