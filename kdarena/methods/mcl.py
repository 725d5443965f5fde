"""MCL: Mutual Contrastive Learning (Yang, An, Xu, Chi, Zhang; "Mutual Contrastive Learning for Visual
Representation Learning", AAAI 2022), the supervised, online-distillation form of its CIFAR results."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ..losses import check_logits, kl_to_teacher, per_network_ce, upcast
from ..models.heads import HeadSpec
from .base import GroupLosses, GroupMethod, MethodParams, Needs, StepInput
from .registry import register_method


class MCLParams(MethodParams):
    alpha: float = Field(0.1, ge=0, description="weight of the vanilla (same-network) contrastive loss VCL (code: 0.1)")
    gamma: float = Field(1.0, ge=0, description="weight of soft VCL, KL between the networks' similarity rows (code: 1)")
    beta: float = Field(0.1, ge=0, description="weight of the interactive (cross-network) contrastive loss ICL (code: 0.1)")
    lam: float = Field(1.0, ge=0, description="weight of soft ICL (code: 1)")
    tau: float = Field(0.1, gt=0, description="temperature of the contrastive similarities (code: 0.1)")
    temperature: float = Field(3.0, gt=0, description="temperature of the soft (KL) terms (code: 3)")
    embedding_dim: int = Field(128, ge=1, description="width of each network's embedding head (code: 128)")
    icl: Literal["paper", "code"] = Field("paper", description="paper: in ICL the same image seen by the other network "
                                          "is a positive; code: the reference code leaves it out of ICL entirely")


def contrastive(sim: Tensor, positives: Tensor, denominator: Tensor) -> Tensor:
    """Supervised contrastive loss of a (B, B) similarity matrix: the mean over anchors that have a positive of
    -mean_{p in P(b)} log(exp(s_bp) / sum_{k in D(b)} exp(s_bk)); 0 when no anchor has one."""
    log_norm = torch.logsumexp(sim.masked_fill(~denominator, float("-inf")), dim=1, keepdim=True)
    log_prob = torch.where(positives, sim - log_norm, torch.zeros_like(sim))
    count = positives.sum(dim=1)
    per_anchor = -log_prob.sum(dim=1) / count.clamp(min=1).to(sim.dtype)
    has = count > 0
    return torch.where(has, per_anchor, torch.zeros_like(per_anchor)).sum() / has.sum().clamp(min=1).to(sim.dtype)


@register_method("mcl")
class MutualContrastiveLearning(GroupMethod):
    """Every network has an embedding head (v_i = normalise(MLP(pooled feature)), ``models.heads``); with
    S_ab = v_a v_b^T / tau the (B, B) similarities of network a's embeddings (anchors) to network b's,
    network i minimises (the paper's Eq. for the supervised case, the weights of its code)

        L_i = CE_i + alpha VCL_i + gamma sum_{j != i} KL_T(S_jj || S_ii)
                   + beta sum_{j != i} ICL_{i->j} + lam sum_{j != i} KL_T(S_ji || S_ij)

    VCL_i: supervised contrastive loss of S_ii (positives: the other samples of the anchor's class; the
    anchor itself in neither numerator nor denominator). ICL_{i->j}: the same of S_ij, where the anchor's
    own image in network j is a positive and in the denominator (``icl: paper``) or, as in the reference
    code, in neither (``icl: code``). KL_T: KL of the rows' softmax at ``temperature`` times T^2,
    averaged over the rows, the teacher's rows (S_jj, S_ji) detached.

    Choices where the paper is silent (ours):

    * the code samples two images per class in every batch (an anchor always has a positive); kdarena
      keeps the run's plain sampling: anchors without a positive are left out of a contrastive mean
      (which is 0 when no anchor has one) -- the code would divide by zero;
    * the soft terms use whole similarity rows, the anchor's self-similarity included (the code);
    * gradients as in the code: ICL and the student side of soft ICL reach both networks' embeddings
      (a contrastive loss trains the contrast side too); ``per_network[i]`` holds the terms whose
      anchor is network i, and ``total`` their sum, so one backward gives the code's gradient;
    * a network whose embedding or CE is not finite is left out of every other network's terms;
    * the input perturbation of the competition does not apply; the embedding heads train with the
      network (they are part of it, unused at test time, as in the paper).
    """

    label = "MCL: contrastive and soft-contrastive losses between the networks' embeddings"
    paper = "Yang et al., Mutual Contrastive Learning for Visual Representation Learning, AAAI 2022"
    Params = MCLParams
    params: MCLParams
    presets = {"mcl": ["method.name=mcl", "perturb.enabled=false"]}

    @property
    def needs(self) -> Needs:
        return Needs(min_networks=2, perturbation=False, heads=(HeadSpec("embedding", self.params.embedding_dim),))

    def describe(self, perturb=None) -> str:
        return f"{self.name}, icl {self.params.icl}, τ {self.params.tau}, T {self.params.temperature}"

    def losses(self, step: StepInput) -> GroupLosses:
        p = self.params
        logits = step.logits
        check_logits(logits, self.needs.min_networks)
        n = len(logits)
        embeddings = step.head_outputs("embedding", self.name)
        if step.y is None:
            raise ValueError("method mcl needs the batch's labels (StepInput.y) for its positives")
        ce = torch.stack(per_network_ce(logits, step.targets))
        v = [upcast(e) for e in embeddings]
        eligible = torch.stack([torch.isfinite(e).all() for e in v]) & torch.isfinite(ce.detach())
        safe = [torch.where(eligible[j], v[j], torch.zeros_like(v[j])) for j in range(n)]
        same = step.y[:, None] == step.y[None, :]
        eye = torch.eye(same.shape[0], dtype=torch.bool, device=same.device)
        within, others = same & ~eye, ~eye  # positives and denominator without the anchor itself
        cross = (same, torch.ones_like(same)) if p.icl == "paper" else (within, others)

        def sim(a: Tensor, b: Tensor) -> Tensor:
            return a @ b.t() / p.tau

        intra = [sim(v[i], v[i]) for i in range(n)]
        intra_teacher = [sim(safe[j], safe[j]) for j in range(n)]
        vcl = torch.stack([contrastive(intra[i], within, others) for i in range(n)])
        soft_vcl, icl, soft_icl = [], [], []
        for i in range(n):
            s_v, i_c, s_i = [], [], []
            for j in range(n):
                if j == i:
                    continue
                s_ij = sim(safe[i], safe[j])  # safe[i]: a diverged anchor sends no NaN into network j
                keep = eligible[i] & eligible[j]
                s_v.append(torch.where(keep, kl_to_teacher(intra[i], intra_teacher[j], p.temperature), 0.0))
                i_c.append(torch.where(keep, contrastive(s_ij, *cross), 0.0))
                s_i.append(torch.where(keep, kl_to_teacher(s_ij, sim(safe[j], safe[i]), p.temperature), 0.0))
            soft_vcl.append(torch.stack(s_v).sum())
            icl.append(torch.stack(i_c).sum())
            soft_icl.append(torch.stack(s_i).sum())
        soft_vcl, icl, soft_icl = torch.stack(soft_vcl), torch.stack(icl), torch.stack(soft_icl)
        totals = ce + p.alpha * vcl + p.gamma * soft_vcl + p.beta * icl + p.lam * soft_icl
        return GroupLosses.of(totals, ce, vcl=vcl, soft_vcl=soft_vcl, icl=icl, soft_icl=soft_icl)
