"""Competitive distillation (Shi, Diao, Chen, John; ICCV 2025)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..losses import select_teacher, sigmoid_rampup
from .base import StepInput
from .distiller import Distiller, DistillerParams
from .registry import register_method


class CompetitiveParams(DistillerParams):
    beta: float = Field(0.0, ge=0, description="weight of the feature loss (paper: 1.0)")
    rule: Literal["best", "better", "soft"] = Field(
        "best", description="best: the argmin-CE network teaches (paper); better: distil from every better network "
        "(authors' code); soft (ours): learn from each other network in proportion to sigmoid((CE_i - CE_j) / soft_scale)")
    soft_scale: float = Field(0.1, gt=0, description="rule=soft: CE difference (nats) at which the weight is sigmoid(1) = 0.73")
    rampup: float = Field(0.0, ge=0, le=1, description="ramp the distillation weight up from 0 over this fraction of training "
                          "(sigmoid, as mean-teacher methods do; ours; 0: off as in the paper)")
    selection: Literal["own-batch", "clean", "smoothed"] = Field(
        "own-batch", description="which CE picks the teacher: the CE on each network's own (perhaps perturbed) input "
        "(paper), the perturbed network's CE on the clean batch, or an EMA of it")
    smoothing: float = Field(0.9, ge=0, lt=1, description="selection=smoothed: EMA decay")


@register_method("cd")
class CompetitiveDistillation(Distiller):
    """The lowest-CE network teaches; every other network distils from it.

    ``rule="best"`` (paper): teacher T = argmin CE; L_T = CE_T; L_i = CE_i + alpha*KL(p_T||p_i) + beta*L_F.
    ``rule="better"`` (authors' code): each network distils from every network with a lower CE,
    the terms averaged over them; the best network gets CE only. Ties go to the lower index.
    ``rule="soft"`` (ours, beyond the paper): network i learns from every other network j with weight
    ``sigmoid((CE_i - CE_j) / soft_scale)``, a soft competition instead of a winner-takes-all one.
    ``rampup`` (ours): the distillation terms are multiplied by ``exp(-5 (1 - t/rampup)^2)`` until the
    fraction ``rampup`` of training is done: early KL between two random networks only adds noise.

    ``selection`` decides which CE picks the teacher: ``"own-batch"`` (paper: the CE on the
    input each network was given, perturbed or not), ``"clean"`` (the perturbed network is
    judged by its CE on the clean batch, from ``StepInput.clean_ce``) or ``"smoothed"`` (an
    exponential moving average of the clean selection CE with decay ``smoothing``). Under
    torchrun the selection CE is averaged over processes first, so every rank picks the same
    teacher from the global batch.
    """

    label = "competitive distillation: the lowest-CE network of each batch teaches the others"
    paper = "Shi et al., Competitive Distillation, ICCV 2025"
    has_teacher = True
    Params = CompetitiveParams
    params: CompetitiveParams
    presets = {
        "cd": ["method.name=cd"],  # with the config's perturbation settings
        "cd-noperturb": ["method.name=cd", "perturb.enabled=false"],
        # the authors' released code: distil from every better peer, their op pool, every 10th batch
        "cd-code": ["method.name=cd", "method.rule=better", "perturb.enabled=true", "perturb.ops=code", "perturb.every=10"],
        # ours (beyond the paper): no early distillation between random networks, then hard or soft competition
        "cd-ramp": ["method.name=cd", "method.rampup=0.3", "perturb.enabled=false"],
        "cd-soft": ["method.name=cd", "method.rule=soft", "method.rampup=0.3", "perturb.enabled=false"],
    }

    def __init__(self, params: CompetitiveParams | None = None, **options):
        super().__init__(params, **options)
        self._ema: Tensor | None = None  # selection=smoothed: the EMA of the selection CE

    def selection_ce(self, step: StepInput, ce: Tensor) -> Tensor:
        if step.selection_ce is not None:
            return step.selection_ce.detach().to(ce.device, ce.dtype)
        selection = ce
        if self.params.selection != "own-batch" and step.perturbed is not None and step.clean_ce is not None:
            selection = ce.clone()
            selection[step.perturbed] = step.clean_ce(step.perturbed).to(ce.dtype)
        if step.reduce_mean is not None:
            selection = step.reduce_mean(selection.clone())
        return selection

    def distillation_scale(self, step: StepInput) -> float:
        return sigmoid_rampup(step.progress, self.params.rampup)

    def _scores(self, selection: Tensor) -> Tensor:
        if self.params.selection != "smoothed":
            return selection
        finite = torch.isfinite(selection)
        if self._ema is None or self._ema.shape != selection.shape:
            self._ema = selection.clone()
        else:
            self._ema = self._ema.to(selection.device)
            smoothing = self.params.smoothing
            updated = smoothing * self._ema + (1.0 - smoothing) * selection
            self._ema = torch.where(finite, updated, self._ema)
        # a network that diverges now is out now, whatever its history
        return torch.where(finite, self._ema, selection)

    def weights(self, ce, selection):
        n = ce.shape[0]
        scores = self._scores(selection)
        scores = torch.where(torch.isfinite(ce), scores, torch.full_like(scores, float("nan")))
        teacher_index, eligible = select_teacher(scores)
        rule = self.params.rule
        if rule == "best":
            students = torch.arange(n, device=ce.device) != teacher_index
            onehot = F.one_hot(teacher_index.clamp(min=0), n).bool() & (teacher_index >= 0)
            weights = (students[:, None] & onehot[None, :]).float()
            return weights, teacher_index
        if rule == "soft":
            # W[i, j] = sigmoid((s_i - s_j) / scale): a clearly better peer teaches fully, an equal one half, a
            # clearly worse one not at all; scale -> 0 gives "better" without the averaging (ours, not the paper)
            gap = (scores[:, None] - scores[None, :]) / self.params.soft_scale
            weights = torch.sigmoid(torch.nan_to_num(gap))
            weights = weights * (eligible[None, :] & ~torch.eye(n, dtype=torch.bool, device=ce.device)).float()
            return weights, teacher_index
        # "better": j is better than i if (score_j, j) < (score_i, i) and j is eligible
        s = torch.where(eligible, scores, torch.full_like(scores, float("inf")))
        index = torch.arange(n, device=ce.device)
        better = (s[None, :] < s[:, None]) | ((s[None, :] == s[:, None]) & (index[None, :] < index[:, None]))
        better = better & eligible[None, :]
        weights = better.float() / better.sum(dim=1, keepdim=True).clamp(min=1).float()
        return weights, teacher_index

    def describe(self, perturb=None) -> str:
        p = self.params
        parts = [self.name, f"rule {p.rule}"]
        if p.rule == "soft":
            parts.append(f"scale {p.soft_scale}")
        if p.rampup:
            parts.append(f"ramp-up {p.rampup}")
        if p.selection != "own-batch":
            parts.append(f"selection {p.selection}")
        parts += self.distillation_parts()
        perturb = perturb or {}
        if perturb.get("enabled"):
            ops = perturb.get("ops")
            ops = "+".join(ops) if isinstance(ops, list) else ops
            when = f"p={perturb['probability']}" if perturb.get("probability") is not None else f"every {perturb.get('every', 1)}"
            parts.append(f"perturb {ops} {when}")
        else:
            parts.append("no perturbation")
        return ", ".join(parts)

    def state_dict(self) -> dict:
        return {"ema": None if self._ema is None else self._ema.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        ema = state.get("ema")
        self._ema = None if ema is None else ema.clone()
