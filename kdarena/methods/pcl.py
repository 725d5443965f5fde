"""PCL-style temporal mean teachers (Wu & Gong, AAAI 2021), on separate networks."""
from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field
from torch import Tensor, nn

from ..losses import check_logits, finite_networks, log_softmax_at, logit_mean, per_network_ce, sigmoid_rampup, soft_kl
from .base import GroupLosses, GroupMethod, MethodContext, MethodParams, Needs, StepInput
from .registry import register_method
from .temporal import TemporalMeans, WithTemporalMeans


class PCLParams(MethodParams):
    alpha: float = Field(1.0, ge=0, description="weight of the two KL terms")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of both KL terms")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="decay of the temporal means (ramped up from 0.1 as mean teacher)")
    rampup_epochs: float = Field(0.0, ge=0, description="sigmoid ramp-up of the peer-mean-teacher weight over this many "
                                 "epochs (0: weight 1 from the start)")


@register_method("pcl")
class PeerCollaborativeLearning(WithTemporalMeans, GroupMethod):
    """Peer mean teachers after PCL (Wu & Gong, "Peer Collaborative Learning for Online Knowledge
    Distillation", AAAI 2021): every peer distils from the temporal means of the others and from the
    peer ensemble.

    Every network i has a temporal-mean copy M_i (an exponential moving average of its weights).
    With z_j the online logits, m_j the temporal means' logits on the batch and w(e) the ramp-up::

        p_pmt_i = 1/(n-1) sum_{j != i} softmax(m_j / tau)          (peer mean teacher of i)
        p_ens   = softmax(mean_j z_j / tau)                          (peer ensemble, detached)
        L_i = CE(z_i, y) + alpha * tau^2 * [w(e) * KL(p_pmt_i || p_i) + KL(p_ens || p_i)]
        M_i <- d_t * M_i + (1 - d_t) * net_i   after every optimizer step,
        d_t = min(ema_decay, (t + 1) / (t + 10)),  w(e) = exp(-5 (1 - e / rampup_epochs)^2) for e < rampup_epochs

    Both teachers are detached (the temporal means have no gradient at all), so one backward pass of
    sum_i L_i gives every network the gradient of its own loss.

    What differs from the paper, and choices where it is silent:

    * PCL is a multi-branch network (shared low layers, one branch per peer) whose ensemble teacher is
      a classifier on the concatenated branch features, trained with its own CE. Here the peers are
      separate networks of the group and the ensemble teacher is the mean of their logits (no extra
      parameters); the branched version can come with the branched models of ONE.
    * The peer mean teacher is the mean of the other temporal means' *probabilities* (at tau), and
      the ramp-up weight w(e) applies to that term only: early temporal means are poor teachers,
      while the ensemble of the online peers is as good as the peers themselves from the start.
      ``rampup_epochs`` defaults to 0 (no ramp-up) because the length is not in our sources; e is
      the integer epoch (w is constant within an epoch, so it needs no state to resume).
    * The temporal means see the same batch as the peers, in eval mode: their BatchNorm layers use
      their running statistics, which are themselves averaged like the weights (integer counters
      copied). They are what ``eval_networks`` reports each epoch as ``mean0``, ``mean1``, ... and
      are saved in the method's state for exact resume.
    * A network with non-finite logits is left out of the ensemble, and a temporal mean with
      non-finite logits out of the peer mean teachers (a term with nobody left is zero).
    * The competition's input perturbation does not apply (``Needs(perturbation=False)``).
    """

    label = "PCL-style peer mean teachers: distil from the other peers' temporal means and from the peer ensemble"
    paper = "Wu & Gong, Peer Collaborative Learning for Online Knowledge Distillation, AAAI 2021"
    Params = PCLParams
    params: PCLParams
    needs = Needs(min_networks=2, perturbation=False)
    presets = {"pcl": ["method.name=pcl", "perturb.enabled=false"]}

    def __init__(self, params: PCLParams | None = None, **options):
        super().__init__(params, **options)
        self.temporal = TemporalMeans(self.params.ema_decay, owner="PCL")

    @property
    def means(self) -> list[nn.Module]:
        return self.temporal.models

    def setup(self, context: MethodContext) -> None:
        self.temporal.build(context.networks)

    def peer_mean_targets(self, mean_logits: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """log p_pmt_i for every i, (n, B, K) -- the log of the mean over j != i of the eligible temporal
        means' probabilities -- and whether i had any eligible other mean (n,)."""
        n = len(mean_logits)
        eligible = finite_networks(mean_logits)
        logp = torch.stack([log_softmax_at(m.detach(), self.params.temperature) for m in mean_logits])
        others = eligible[None, :] & ~torch.eye(n, dtype=torch.bool, device=logp.device)  # others[i, j]
        counts = others.sum(dim=1)
        # log mean_j p_j = logsumexp_j log p_j - log(count), over the others only (log space: no log 0)
        masked = torch.where(others[:, :, None, None], logp[None], torch.full_like(logp[None], float("-inf")))
        log_mean = torch.logsumexp(masked, dim=1) - counts.clamp(min=1).to(logp.dtype).log()[:, None, None]
        has_other = counts > 0
        return torch.where(has_other[:, None, None], log_mean, torch.zeros_like(log_mean)), has_other

    def rampup(self, step: StepInput) -> float:
        return sigmoid_rampup(float(step.epoch), self.params.rampup_epochs)

    def losses(self, step: StepInput, mean_logits: Sequence[Tensor] | None = None) -> GroupLosses:
        """``mean_logits``: the temporal means' logits (Python API and tests); default: run the means on ``step.x``."""
        logits = step.logits
        check_logits(logits, self.needs.min_networks)
        n = len(logits)
        ce = torch.stack(per_network_ce(logits, step.targets))
        mean_logits = list(mean_logits) if mean_logits is not None else self.temporal.logits(step)
        if len(mean_logits) != n:
            raise ValueError(f"got {len(mean_logits)} temporal means for {n} networks")
        p = self.params
        pmt_targets, has_pmt = self.peer_mean_targets(mean_logits)
        eligible = finite_networks(logits)
        students = torch.stack([log_softmax_at(z, p.temperature) for z in logits])  # (n, B, K)
        pmt = soft_kl(students, pmt_targets.to(students.device), p.temperature)
        pmt = torch.where(has_pmt.to(pmt.device), pmt, torch.zeros_like(pmt))
        ens = soft_kl(students, log_softmax_at(logit_mean(logits, eligible), p.temperature), p.temperature)
        ens = torch.where(eligible.any(), ens, torch.zeros_like(ens))
        weight = self.rampup(step)
        kd = weight * pmt + ens  # logged per epoch
        return GroupLosses.of(ce + p.alpha * kd, ce, kd=kd, pmt=pmt, ens=ens)

    def describe(self, perturb=None) -> str:
        p = self.params
        parts = [self.name, f"EMA {p.ema_decay}", f"τ {p.temperature}"]
        if p.rampup_epochs:
            parts.append(f"ramp-up {p.rampup_epochs} epochs")
        return ", ".join(parts)
