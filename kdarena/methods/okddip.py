"""OKDDip: Online Knowledge Distillation with Diverse Peers (Chen, Mei, Wang, Feng, Chen; AAAI 2020)."""
from __future__ import annotations

import torch
from pydantic import Field

from ..losses import check_logits, kl_to_teacher, per_network_ce, sigmoid_rampup, upcast
from ..models.heads import HeadSpec
from .base import GroupLosses, GroupMethod, MethodParams, Needs, StepInput
from .registry import register_method


class OKDDipParams(MethodParams):
    alpha: float = Field(1.0, ge=0, description="weight of both distillation levels (code: 1)")
    temperature: float = Field(3.0, gt=0, description="softening temperature T of both KL terms (code: 3)")
    rampup: float = Field(80 / 300, ge=0, le=1, description="fraction of training over which the distillation weight "
                          "ramps up, exp(-5 (1 - t)^2) (code: 80 of 300 epochs); 0: no ramp")
    attention_factor: int = Field(8, ge=1, description="query/key width = feature width / this (code: 8)")
    detach_peers: bool = Field(False, description="false (code): the targets pass gradient into the peers' logits and "
                               "the attention; true: into the attention only")


@register_method("okddip")
class OnlineDistillationDiversePeers(GroupMethod):
    """The last network is the group leader (the model kept for inference), the others are peers
    a = 1..m (m = n - 1 >= 2). Each peer has an attention head (``models.heads``): a query q_a and a
    key k_a, linear maps of its pooled feature. Per sample, the peers' aggregation weights are
    A_ab = softmax_b(q_a . k_b) over the peers (a itself included), and (the paper's two levels)

        peer a:  L_a = CE_a + alpha w T^2 KL(softmax(t_a / T) || softmax(z_a / T)),  t_a = sum_b A_ab z_b
        leader:  L_L = CE_L + alpha w T^2 KL(softmax(mean_b z_b / T) || softmax(z_L / T))

    with w the sigmoid ramp-up exp(-5 (1 - t)^2) over the first ``rampup`` of training (t: the fraction
    of it done). Choices (the reference code's unless stated; the paper's equations do not say):

    * the aggregate is one of logits, softened after aggregation (the code), and T = 3, alpha = 1;
    * the targets keep their gradient (code): a peer's KL also trains the attention and the peers its
      target is made of, the leader's KL trains the peers too; ``detach_peers: true`` stops it at the
      peers' logits (the attention still learns: it gets gradient from nothing else);
    * each peer has its own query and key maps; the code shares one pair between the branches of its
      shared trunk (kdarena's networks may differ in width). The leader carries an attention head as
      every network does (``Needs.heads`` is per group), unused;
    * the ramp-up moves every step with the fraction of training done (the code: once per epoch, 80 of
      300 epochs);
    * a peer whose logits, attention or CE are not finite is left out of every aggregate;
    * the networks need not share a trunk (the code's branches do: ``models: [branched:resnet32, ...]``
      runs that form); the input perturbation of the competition does not apply.
    """

    label = "OKDDip: peers distil from attention-weighted peer aggregates, a leader from the peers' mean"
    paper = "Chen et al., Online Knowledge Distillation with Diverse Peers, AAAI 2020"
    Params = OKDDipParams
    params: OKDDipParams
    presets = {"okddip": ["method.name=okddip", "perturb.enabled=false"]}

    @property
    def needs(self) -> Needs:
        return Needs(min_networks=3, perturbation=False, heads=(HeadSpec("attention", self.params.attention_factor),))

    def describe(self, perturb=None) -> str:
        return f"{self.name}, T {self.params.temperature}, ramp-up {self.params.rampup:.2f}"

    def losses(self, step: StepInput) -> GroupLosses:
        p = self.params
        logits = step.logits
        check_logits(logits, self.needs.min_networks)
        m = len(logits) - 1
        attention = step.head_outputs("attention", self.name, count=m)  # the peers' (the leader's is unused)
        ce = torch.stack(per_network_ce(logits, step.targets))
        z = [upcast(t) for t in logits]
        q = torch.stack([upcast(query) for query, _ in attention], dim=1)  # (B, m, d)
        k = torch.stack([upcast(key) for _, key in attention], dim=1)
        finite = torch.stack([torch.isfinite(z[a]).all() & torch.isfinite(q[:, a]).all() & torch.isfinite(k[:, a]).all()
                              for a in range(m)] + [torch.isfinite(z[m]).all()]) & torch.isfinite(ce.detach())
        peers_ok = finite[:m] | ~finite[:m].any()  # no peer finite: keep all (every peer's loss is NaN anyway)
        zeros = torch.zeros_like(z[0])
        safe = [torch.where(finite[a], z[a], zeros) for a in range(len(z))]  # no NaN reaches a target or its gradient
        q = torch.where(finite[None, :m, None], q, torch.zeros_like(q))
        k = torch.where(finite[None, :m, None], k, torch.zeros_like(k))
        peers = torch.stack(safe[:m], dim=1)  # (B, m, C)
        if p.detach_peers:
            peers = peers.detach()
        energy = (q @ k.transpose(1, 2)).masked_fill(~peers_ok[None, None, :], float("-inf"))  # [b, a, c] = q_a . k_c
        targets = torch.softmax(energy, dim=2) @ peers  # (B, m, C): t_a = sum_c A_ac z_c
        weights = peers_ok.to(peers.dtype)
        mean = (peers * weights[None, :, None]).sum(dim=1) / weights.sum()
        kd = torch.stack([kl_to_teacher(safe[a], targets[:, a], p.temperature, teacher_grad=True) for a in range(m)]
                         + [kl_to_teacher(safe[m], mean, p.temperature, teacher_grad=True)])
        w = p.alpha * sigmoid_rampup(step.progress, p.rampup)
        totals = ce + w * kd
        return GroupLosses.of(totals, ce, kd=kd, extra={"kd_weight": ce.new_tensor(w)})
