"""Competitive mean teachers (ours): the networks' temporal means compete, the best one teaches everyone."""
from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field
from torch import Tensor

from ..losses import check_logits, log_softmax_at, per_network_ce, select_teacher, sigmoid_rampup, soft_kl
from .base import GroupLosses, GroupMethod, MethodContext, MethodParams, Needs, StepInput
from .registry import register_method
from .temporal import TemporalMeans, WithTemporalMeans


class CompetitiveMeanParams(MethodParams):
    alpha: float = Field(1.0, ge=0, description="weight of the KL term")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the KL term")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="decay of the temporal means (ramped up as in mean teacher)")
    rampup: float = Field(0.3, ge=0, le=1, description="ramp the distillation weight up from 0 over this fraction of "
                          "training (sigmoid; 0: off)")


@register_method("cd-mean")
class CompetitiveMeanTeachers(WithTemporalMeans, GroupMethod):
    """Competition among temporal means (ours, beyond the paper).

    Every network i keeps a temporal mean M_i (an exponential moving average of its weights, as in
    mean teacher and PCL). On each batch the means compete as the networks do in competitive
    distillation: the mean with the lowest cross-entropy teaches, and *every* network distils from
    it, its own mean's network included. With m_j the means' logits on the batch and w(t) the
    ramp-up over the fraction ``rampup`` of training::

        T   = argmin_j CE(m_j, y)                        (ties: the lower index)
        L_i = CE(z_i, y) + alpha * w(t) * tau^2 * KL(softmax(m_T / tau) || softmax(z_i / tau))
        M_i <- d_t * M_i + (1 - d_t) * net_i  after every optimizer step, d_t = min(ema_decay, (t+1)/(t+10))

    Why, from the map: the paper's rule gives a student a teacher that is no better than itself on
    average (two networks of one architecture trade the lead every few batches), and in a pair the
    winner of a batch gets no distillation at all, so half of the group's regularisation is lost where
    networks over-fit. A temporal mean is a better teacher than any online network (it averages the
    noise of SGD), the competition picks the best of them, and every network learns from it on every
    batch. Early KL between random networks is harmful (measured on Fashion-MNIST), hence the ramp-up.

    Choices: the means see the clean batch in eval mode (running BN statistics, themselves averaged);
    the selection CE is averaged over processes under torchrun, so every rank picks the same teacher;
    a mean with non-finite logits cannot teach (no teacher left: no KL); the competition's input
    perturbation does not apply. The means are evaluated each epoch as ``mean0``, ``mean1``, ... and
    saved for exact resume. Cost: one extra forward pass per network and step (no backward).
    """

    label = "competitive mean teachers (ours): the lowest-CE temporal mean of each batch teaches every network"
    paper = "ours (kdarena): competitive distillation among mean teachers"
    Params = CompetitiveMeanParams
    params: CompetitiveMeanParams
    needs = Needs(min_networks=2, perturbation=False)
    has_teacher = True
    presets = {"cd-mean": ["method.name=cd-mean", "perturb.enabled=false"]}

    def __init__(self, params: CompetitiveMeanParams | None = None, **options):
        super().__init__(params, **options)
        self.temporal = TemporalMeans(self.params.ema_decay, owner="cd-mean")

    def setup(self, context: MethodContext) -> None:
        self.temporal.build(context.networks)

    def losses(self, step: StepInput, mean_logits: Sequence[Tensor] | None = None) -> GroupLosses:
        """``mean_logits``: the temporal means' logits (Python API and tests); default: run the means on ``step.x``."""
        logits = step.logits
        check_logits(logits, self.needs.min_networks)
        n = len(logits)
        ce = torch.stack(per_network_ce(logits, step.targets))
        mean_logits = list(mean_logits) if mean_logits is not None else self.temporal.logits(step)
        if len(mean_logits) != n:
            raise ValueError(f"got {len(mean_logits)} temporal means for {n} networks")
        with torch.no_grad():
            finite = torch.stack([torch.isfinite(m).all() for m in mean_logits])
            mean_ce = torch.stack(per_network_ce([m.detach() for m in mean_logits], step.targets))
            mean_ce = torch.where(finite, mean_ce, torch.full_like(mean_ce, float("nan")))
            if step.reduce_mean is not None:
                mean_ce = step.reduce_mean(mean_ce.clone())
            teacher_index, _ = select_teacher(mean_ce)
            teacher_logits = torch.stack([m.detach() for m in mean_logits])[teacher_index.clamp(min=0)]
        p = self.params
        students = torch.stack([log_softmax_at(z, p.temperature) for z in logits])  # (n, B, K)
        kd = soft_kl(students, log_softmax_at(teacher_logits, p.temperature).to(students.device), p.temperature)
        kd = torch.where(teacher_index >= 0, kd, torch.zeros_like(kd))
        weight = sigmoid_rampup(step.progress, p.rampup)
        return GroupLosses.of(ce + (p.alpha * weight) * kd, ce, teacher_index, kd=kd, mean_ce=mean_ce)

    def describe(self, perturb=None) -> str:
        p = self.params
        return ", ".join([self.name, f"EMA {p.ema_decay}", f"τ {p.temperature}", f"ramp-up {p.rampup}"])
