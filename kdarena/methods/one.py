"""ONE: On-the-fly Native Ensemble (Lan, Zhu, Gong; "Knowledge Distillation by On-the-Fly Native
Ensemble", NeurIPS 2018)."""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..losses import check_logits, cross_entropy, log_softmax_at, per_network_ce, soft_kl, upcast
from ..models.branched import GateEnsemble
from .base import GroupLosses, GroupMethod, MethodContext, MethodParams, Needs, StepInput
from .registry import register_method


class OneParams(MethodParams):
    alpha: float = Field(1.0, ge=0, description="weight of the distillation term (paper: 1, i.e. the loss has no weight)")
    temperature: float = Field(3.0, gt=0, description="softening temperature T of the KL term (paper: 3)")


@register_method("one")
class OnTheFlyNativeEnsemble(GroupMethod):
    """m branches on one shared trunk, taught by their gated ensemble.

    The networks are the branches of a branched model (``models: [branched:resnet32, ...]``, one
    entry per branch; see :mod:`kdarena.models.branched`). With the gate g(x) in R^m (softmax over
    the branches of FC -> BN -> ReLU of the pooled trunk features), the ensemble's logits are
    z_e = sum_k g_k z_k, and the loss is (paper, Eq. 7, with T the temperature)

        L = sum_k CE(z_k) + CE(z_e) + alpha * T^2 * sum_k KL(softmax(z_e/T) || softmax(z_k/T)),

    with T = 3 and alpha = 1 as in the paper. Choices where the paper is silent (ours):

    * the ensemble's soft target is detached in the KL term: branches move towards the ensemble, the
      ensemble (and the gate) learn only from CE(z_e) -- like every teacher in kdarena;
    * ``per_network[k] = CE(z_k) + alpha T^2 KL_k + CE(z_e)/m``: the ensemble CE is shared equally
      among the branches' reported losses, so ``total`` is their sum (one backward);
    * a branch whose CE is not finite is left out of the ensemble (the gate renormalised over the
      others), so one diverged branch poisons no other branch's target;
    * under perturbation (off by default, as in the paper) the gate looks at branch 0's input and the
      ensemble's CE uses branch 0's target.

    The gated ensemble is evaluated every epoch as ``gate_ensemble/{val,test}_top1`` beside each
    branch (``net{i}``) and the plain mean-of-softmax ``ensemble``.

    Cost (``benchmarks/branched.py``: CIFAR-100 heads, 32x32 inputs, batch 64, fp32, one CPU thread
    on a shared, loaded 2-core machine, median of 10 steps, groups interleaved; expect noise): a
    branched ResNet-32 with 3 branches has 1,186,085 parameters with ONE's gate (1,185,980 without)
    against 1,410,012 for 3 separate ResNet-32 (0.84x: the trunk, i.e. stem + stages 1-2, is counted
    once; most parameters live in the last stage, which every branch copies), and a training step
    (forward, loss, backward, SGD) took 2.56 s against 4.77 s for DML on 3 separate networks (0.54x;
    the three stages cost about the same FLOPs, so 5 stage-passes instead of 9 predicts 0.56x).
    """

    label = "ONE: branches on a shared trunk distil from their gated ensemble"
    paper = "Lan, Zhu, Gong, Knowledge Distillation by On-the-Fly Native Ensemble, NeurIPS 2018"
    Params = OneParams
    params: OneParams
    needs = Needs(min_networks=2, branched=True)
    presets = {"one": ["method.name=one", "perturb.enabled=false"]}

    def __init__(self, params: OneParams | None = None, **options):
        super().__init__(params, **options)
        self._ensemble: nn.Module | None = None

    def setup(self, context: MethodContext) -> None:
        self._ensemble = GateEnsemble(context.networks)

    def eval_networks(self) -> dict[str, nn.Module]:
        return {"gate_ensemble": self._ensemble} if self._ensemble is not None else {}

    def losses(self, step: StepInput) -> GroupLosses:
        logits = step.logits
        check_logits(logits, self.needs.min_networks)
        m = len(logits)
        gate = step.extras.get("gate")
        if gate is None or tuple(gate.shape) != (logits[0].shape[0], m):
            raise ValueError(f"ONE needs the branched group's gate of shape (batch, {m}) in StepInput.extras['gate'], "
                             f"got {None if gate is None else tuple(gate.shape)}; use models: [branched:NAME, ...]")
        ce = torch.stack(per_network_ce(logits, step.targets))
        ce_detached = ce.detach()
        eligible = torch.isfinite(ce_detached)
        z = torch.stack([upcast(zk) for zk in logits])  # (m, B, C)
        z = torch.where(eligible[:, None, None], z, torch.zeros_like(z))
        g = upcast(gate).to(z.dtype)
        kept = torch.where(eligible[None, :], g, torch.zeros_like(g))
        g = torch.where(eligible.all(), g, kept / kept.sum(dim=1, keepdim=True).clamp_min(1e-12))
        z_e = torch.einsum("bk,kbc->bc", g, z)
        ce_e = cross_entropy(z_e, step.targets[0])
        p = self.params
        students = torch.stack([log_softmax_at(zk, p.temperature) for zk in z.unbind(0)])
        kd = soft_kl(students, log_softmax_at(z_e.detach(), p.temperature), p.temperature)
        totals = ce + p.alpha * kd + ce_e / m
        return GroupLosses.of(totals, ce, kd=kd, extra={"ens_ce": ce_e})

    def describe(self, perturb=None) -> str:
        return f"{self.name}, T {self.params.temperature}"
