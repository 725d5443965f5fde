"""Competitive mean teachers (ours): the networks' temporal means compete, the best one teaches everyone."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from .base import GroupLosses, GroupMethod, MethodContext, MethodParams, Needs, StepInput
from .common import check_logits, per_network_ce, select_teacher, sigmoid_rampup
from .kdcl import kl_from_probs
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
    min_networks = 2
    has_teacher = True
    presets = {"cd-mean": ["method.name=cd-mean", "perturb.enabled=false"]}

    def __init__(self, alpha: float = 1.0, temperature: float = 1.0, ema_decay: float = 0.999, rampup: float = 0.3):
        if alpha < 0 or temperature <= 0:
            raise ValueError(f"alpha must be >= 0 and temperature > 0, got alpha={alpha}, temperature={temperature}")
        if not 0.0 <= rampup <= 1.0:
            raise ValueError(f"rampup must be in [0, 1], got {rampup}")
        self.alpha, self.temperature, self.rampup = float(alpha), float(temperature), float(rampup)
        self.temporal = TemporalMeans(ema_decay, owner="cd-mean")

    @property
    def needs(self) -> Needs:
        return Needs(min_networks=self.min_networks, perturbation=False)

    def setup(self, context: MethodContext) -> None:
        self.temporal.build(context.networks)

    def losses(self, step: StepInput, mean_logits: Sequence[Tensor] | None = None) -> GroupLosses:
        """``mean_logits``: the temporal means' logits (Python API and tests); default: run the means on ``step.x``."""
        logits = step.logits
        check_logits(logits, self.min_networks)
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
            teacher_p = F.softmax(teacher_logits / self.temperature, dim=1)
        kd = torch.stack([kl_from_probs(teacher_p.to(z.device), z, self.temperature) for z in logits])
        kd = torch.where(teacher_index >= 0, kd, torch.zeros_like(kd))
        weight = sigmoid_rampup(step.progress, self.rampup)
        totals = ce + (self.alpha * weight) * kd
        terms = {f"ce_{i}": ce[i].detach() for i in range(n)}
        terms.update({f"kd_{i}": kd[i].detach() for i in range(n)})
        terms.update({f"mean_ce_{i}": mean_ce[i] for i in range(n)})
        return GroupLosses(list(totals.unbind(0)), totals.sum(), ce.detach(), teacher_index, terms)

    @classmethod
    def describe(cls, params, perturb) -> str:
        return ", ".join([cls.name, f"EMA {params.get('ema_decay', 0.999)}", f"τ {params.get('temperature', 1.0)}",
                          f"ramp-up {params.get('rampup', 0.3)}"])
