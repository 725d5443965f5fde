"""Deep Mutual Learning (Zhang, Xiang, Hospedales, Lu; CVPR 2018)."""
from __future__ import annotations

import torch

from .distiller import Distiller
from .registry import register_method


@register_method("dml")
class DeepMutualLearning(Distiller):
    """L_i = CE_i + alpha/(n-1) * sum_{j != i} KL(p_j || p_i), peers detached.

    A peer whose CE is not finite is left out (and the average taken over the others), so
    one diverged network cannot poison the group. ``beta > 0`` adds the same average of
    feature losses (not in the paper; offered so DML and competitive distillation can be
    compared with equal extras).
    """

    label = "deep mutual learning: every network distils from the mean of its peers"
    paper = "Zhang et al., Deep Mutual Learning, CVPR 2018"
    presets = {"dml": ["method.name=dml", "perturb.enabled=false"]}

    def weights(self, ce, selection):
        n = ce.shape[0]
        eligible = torch.isfinite(selection) & torch.isfinite(ce)
        peers = eligible[None, :] & ~torch.eye(n, dtype=torch.bool, device=ce.device)
        weights = peers.float() / peers.sum(dim=1, keepdim=True).clamp(min=1).float()
        return weights, None  # no teacher
