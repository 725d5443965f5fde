"""Offline knowledge distillation from a fixed, pre-trained teacher (Hinton, Vinyals, Dean; 2015)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from pydantic import Field
from torch import nn

from ..errors import ConfigError, ModelSpecError
from ..losses import check_logits, log_softmax_at, per_network_ce, soft_kl
from .base import GroupLosses, GroupMethod, MethodContext, MethodParams, Needs, StepInput, freeze
from .registry import register_method


class KDParams(MethodParams):
    alpha: float = Field(1.0, ge=0, description="weight of the KL term (Hinton et al.: 0.9)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the KL term (Hinton et al.: 4)")
    ce_weight: float = Field(1.0, ge=0, description="weight of the students' own CE")
    teacher_model: Optional[str] = Field(None, description="the frozen teacher's model name (required for training; "
                                         "the Python API may pass StepInput.teacher_logits instead)")
    teacher_checkpoint: Optional[str] = Field(None, description="a kdarena checkpoint or a state_dict file")
    teacher_index: int = Field(0, ge=0, description="which network of a kdarena checkpoint teaches")

    def check(self, num_networks: int) -> None:
        if self.teacher_model is None:
            raise ValueError("teacher_model", "required: name the frozen teacher's model, e.g. method.teacher_model=resnet56")


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
    params: KDParams
    presets = {}  # needs a teacher model: no preset without one
    needs = Needs(min_networks=1, perturbation=False)

    def __init__(self, params: KDParams | None = None, **options):
        super().__init__(params, **options)
        self.teacher: nn.Module | None = None

    def setup(self, context: MethodContext) -> None:
        p = self.params
        if p.teacher_model is None:
            return
        from .. import models

        try:
            teacher = models.create(p.teacher_model, num_classes=context.num_classes, in_channels=context.in_channels)
        except ModelSpecError as error:
            raise ConfigError(f"bad value for 'method.teacher_model': {error}") from None
        if p.teacher_checkpoint:
            if context.load_network_state is None:
                raise ValueError("method.teacher_checkpoint needs MethodContext.load_network_state (the trainer passes it)")
            state = context.load_network_state(Path(p.teacher_checkpoint), p.teacher_index, "method.teacher_checkpoint")
            try:
                teacher.load_state_dict(state)
            except RuntimeError as error:
                raise ConfigError(f"method.teacher_checkpoint does not fit method.teacher_model={p.teacher_model!r}: "
                                  f"{str(error).splitlines()[0]}") from None
        self.teacher = freeze(teacher.to(context.device))

    def losses(self, step: StepInput) -> GroupLosses:
        p = self.params
        logits = step.logits
        check_logits(logits, self.needs.min_networks)
        teacher_logits = step.teacher_logits
        if teacher_logits is None:
            if self.teacher is None or step.x is None:
                raise ValueError("KnowledgeDistillation needs teacher_logits, or a teacher_model and the clean batch")
            with torch.no_grad(), step.autocast():
                teacher_logits = self.teacher(step.x)
        ce = torch.stack(per_network_ce(logits, step.targets))
        students = torch.stack([log_softmax_at(z, p.temperature) for z in logits])  # (n, B, K)
        kd = soft_kl(students, log_softmax_at(teacher_logits.detach(), p.temperature), p.temperature)
        totals = p.ce_weight * ce + p.alpha * kd
        return GroupLosses.of(totals, ce, kd=kd)

    def describe(self, perturb=None) -> str:
        return f"kd from {self.params.teacher_model}, τ {self.params.temperature}"
