"""PCL-style temporal mean teachers (Wu & Gong, AAAI 2021), on separate networks."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from .base import GroupLosses, GroupMethod, MethodContext, MethodParams, Needs, StepInput
from .common import check_logits, no_teacher, per_network_ce
from .kdcl import finite_networks, kl_from_probs, logit_mean
from .registry import register_method
from .temporal import TemporalMeans, WithTemporalMeans, ema_decay_at, ema_update  # noqa: F401 (ema_*: this module's public names before)


def sigmoid_rampup(epoch: float, length: float) -> float:
    """exp(-5 (1 - e/length)^2) for e < length, then 1 (Laine & Aila; the ramp-up mean-teacher methods use)."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


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
    min_networks = 2
    presets = {"pcl": ["method.name=pcl", "perturb.enabled=false"]}

    def __init__(self, alpha: float = 1.0, temperature: float = 1.0, ema_decay: float = 0.999, rampup_epochs: float = 0.0):
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if rampup_epochs < 0:
            raise ValueError(f"rampup_epochs must be >= 0, got {rampup_epochs}")
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.ema_decay, self.rampup_epochs = float(ema_decay), float(rampup_epochs)
        self.temporal = TemporalMeans(ema_decay, owner="PCL")

    @property
    def means(self) -> list[nn.Module]:
        return self.temporal.models

    @property
    def needs(self) -> Needs:
        return Needs(min_networks=self.min_networks, perturbation=False)

    def setup(self, context: MethodContext) -> None:
        self.build_means(context.networks)

    def build_means(self, networks: Sequence[nn.Module]) -> None:
        """Start every temporal mean as a frozen copy of its network (eval mode)."""
        self.temporal.build(networks)

    def mean_logits(self, step: StepInput) -> list[Tensor]:
        return self.temporal.logits(step)

    def peer_mean_targets(self, mean_logits: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        """p_pmt_i for every i (mean over j != i of the eligible temporal means' probabilities) and
        whether i had any eligible other mean."""
        n = len(mean_logits)
        eligible = finite_networks(mean_logits)
        probs = torch.stack([F.softmax(m.detach() / self.temperature, dim=1) for m in mean_logits])
        probs = torch.where(eligible[:, None, None], probs, torch.zeros_like(probs))
        others = eligible[None, :] & ~torch.eye(n, dtype=torch.bool, device=probs.device)  # others[i, j]
        counts = others.sum(dim=1)
        targets = torch.einsum("ij,jbk->ibk", others.to(probs.dtype), probs) / counts.clamp(min=1)[:, None, None].to(probs.dtype)
        return list(targets.unbind(0)), counts > 0

    def rampup(self, step: StepInput) -> float:
        return sigmoid_rampup(float(step.epoch), self.rampup_epochs)

    def losses(self, step: StepInput, mean_logits: Sequence[Tensor] | None = None) -> GroupLosses:
        """``mean_logits``: the temporal means' logits (Python API and tests); default: run the means on ``step.x``."""
        logits = step.logits
        check_logits(logits, self.min_networks)
        n = len(logits)
        ce = torch.stack(per_network_ce(logits, step.targets))
        mean_logits = list(mean_logits) if mean_logits is not None else self.mean_logits(step)
        if len(mean_logits) != n:
            raise ValueError(f"got {len(mean_logits)} temporal means for {n} networks")
        pmt_targets, has_pmt = self.peer_mean_targets(mean_logits)
        eligible = finite_networks(logits)
        p_ens = F.softmax(logit_mean(logits, eligible) / self.temperature, dim=1)
        pmt = torch.stack([kl_from_probs(pmt_targets[i].to(logits[i].device), logits[i], self.temperature) for i in range(n)])
        pmt = torch.where(has_pmt.to(pmt.device), pmt, torch.zeros_like(pmt))
        ens = torch.stack([kl_from_probs(p_ens, z, self.temperature) for z in logits])
        ens = torch.where(eligible.any(), ens, torch.zeros_like(ens))
        weight = self.rampup(step)
        totals = ce + self.alpha * (weight * pmt + ens)
        terms = {f"ce_{i}": ce[i].detach() for i in range(n)}
        terms.update({f"kd_{i}": (weight * pmt[i] + ens[i]).detach() for i in range(n)})  # logged per epoch
        terms.update({f"pmt_{i}": pmt[i].detach() for i in range(n)})
        terms.update({f"ens_{i}": ens[i].detach() for i in range(n)})
        return GroupLosses(list(totals.unbind(0)), totals.sum(), ce.detach(), no_teacher(ce), terms)

    @classmethod
    def describe(cls, params, perturb) -> str:
        parts = [cls.name, f"EMA {params.get('ema_decay', 0.999)}", f"τ {params.get('temperature', 1.0)}"]
        if params.get("rampup_epochs"):
            parts.append(f"ramp-up {params.get('rampup_epochs')} epochs")
        return ", ".join(parts)
