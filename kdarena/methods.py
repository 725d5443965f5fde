"""Group training methods: independent, deep mutual learning, competitive distillation, offline KD.

Every method turns the logits of n networks on one batch into the loss each network
minimises. All of them express distillation as a weight matrix ``W[i, j]`` ("student i
learns from network j with weight W[i, j]") applied to the pairwise matrices of
``KL(p_j || p_i)`` and feature distances, with the teacher side always detached. Because
no loss reaches another network's parameters, one backward pass on ``total`` gives every
network exactly the gradient of its own loss.

Teacher selection is done on tensors (no ``.item()``): the training step never waits for
the device to decide who teaches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import FEATURE_REDUCTIONS, Target, cross_entropy, feature_l2, upcast

Adapter = Callable[[int, int, Tensor], Tensor]


@dataclass
class GroupLosses:
    """What a method computed for one batch.

    ``per_network[i]`` is the loss network i minimises, ``total`` their sum (one backward
    pass), ``ce`` the detached cross-entropies (n,), ``teacher_index`` a 0-dim long tensor
    (-1 when the method has no teacher or no network is eligible) and ``terms`` named
    scalars for logging.
    """

    per_network: list[Tensor]
    total: Tensor
    ce: Tensor
    teacher_index: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    weights: Tensor | None = None  # W[i, j]: how much student i learnt from network j

    @property
    def teacher(self) -> int | None:
        """The teacher's index, or None. Reading it synchronises with the device."""
        index = int(self.teacher_index)
        return None if index < 0 else index


def _as_targets(target: Target | Sequence[Target], n: int) -> list[Target]:
    if isinstance(target, (list, tuple)):
        if len(target) != n:
            raise ValueError(f"got {len(target)} targets for {n} networks; pass one target or one per network")
        return list(target)
    return [target] * n


def _check_logits(logits: Sequence[Tensor], minimum: int) -> None:
    if len(logits) < minimum:
        raise ValueError(f"this method needs at least {minimum} networks, got {len(logits)}")
    shape = logits[0].shape
    for i, z in enumerate(logits):
        if z.dim() != 2 or z.shape != shape:
            raise ValueError(f"logits[{i}] has shape {tuple(z.shape)}; every network must give (batch, classes) = {tuple(shape)}")


def per_network_ce(logits: Sequence[Tensor], target: Target | Sequence[Target]) -> list[Tensor]:
    """Cross-entropy of each network against its own target (a perturbed network may have a mixed one)."""
    return [cross_entropy(z, t) for z, t in zip(logits, _as_targets(target, len(logits)))]


def pairwise_kl(logits: Sequence[Tensor], temperature: float = 1.0, eligible: Tensor | None = None) -> Tensor:
    """Matrix ``K[j, i] = KL(softmax(z_j/tau) || softmax(z_i/tau)) * tau^2`` ("batchmean"), z_j detached.

    Rows of networks that are not ``eligible`` (non-finite outputs) are replaced by zeros
    before use, so their NaNs can reach neither the value nor the gradient of anyone's loss.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = torch.stack([F.log_softmax(upcast(z) / temperature, dim=1) for z in logits])  # (n, B, K)
    teacher_logp = logp.detach()
    if eligible is not None:
        teacher_logp = torch.where(eligible[:, None, None], teacher_logp, torch.zeros_like(teacher_logp))
    teacher_p = teacher_logp.exp()
    # (n_teacher, n_student, B, K) -> sum over classes and mean over the batch
    kl = teacher_p[:, None] * (teacher_logp[:, None] - logp[None, :])
    return kl.sum(dim=3).mean(dim=2) * (temperature * temperature)


def pairwise_feature_l2(
    features: Sequence[Tensor], adapt: Adapter | None, eligible: Tensor, reduction: str
) -> Tensor:
    """Matrix ``D[j, i]`` = feature loss of student i towards network j (teacher side detached, zero diagonal)."""
    n = len(features)
    rows = []
    for j in range(n):
        teacher = upcast(features[j].detach())
        teacher = torch.where(eligible[j], teacher, torch.zeros_like(teacher))
        row = []
        for i in range(n):
            if i == j:
                row.append(upcast(features[i]).new_zeros(()))
                continue
            student = adapt(i, j, features[i]) if adapt is not None else features[i]
            row.append(feature_l2(student, teacher, reduction))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def select_teacher(ce: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the lowest finite CE (ties: lowest index) and the eligibility mask.

    Returns index -1 when no network has a finite CE. Pure tensor ops: no host sync.
    """
    eligible = torch.isfinite(ce)
    masked = torch.where(eligible, ce, torch.full_like(ce, float("inf")))
    index = torch.argmin(masked)  # documented to return the first minimal index
    index = torch.where(eligible.any(), index, torch.full_like(index, -1))
    return index, eligible


def _weighted(matrix: Tensor, weights: Tensor) -> Tensor:
    """sum_j W[i, j] * matrix[j, i] per student i, with zero-weight entries masked (not multiplied)."""
    contributions = torch.where(weights > 0, weights * matrix.t(), torch.zeros_like(weights))
    return contributions.sum(dim=1)


class GroupMethod:
    """Base class. Subclasses build the distillation weights W from the batch's CE."""

    name = "method"
    min_networks = 1
    needs_teacher_network = False

    def losses(
        self,
        logits: Sequence[Tensor],
        target: Target | Sequence[Target],
        features: Sequence[Tensor] | None = None,
        adapt: Adapter | None = None,
        selection_ce: Tensor | None = None,
        teacher_logits: Tensor | None = None,
    ) -> GroupLosses:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Independent(GroupMethod):
    """Every network trains alone on cross-entropy."""

    name = "independent"

    def losses(self, logits, target, features=None, adapt=None, selection_ce=None, teacher_logits=None):
        _check_logits(logits, 1)
        ce_list = per_network_ce(logits, target)
        ce = torch.stack(ce_list)
        terms = {f"ce_{i}": c.detach() for i, c in enumerate(ce_list)}
        return GroupLosses(ce_list, ce.sum(), ce.detach(), torch.tensor(-1, device=ce.device), terms)


class _Distiller(GroupMethod):
    """Shared machinery: CE, weights, KL and feature matrices, per-network totals."""

    def __init__(self, alpha: float, beta: float, temperature: float, feature_reduction: str = "batchmean"):
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if feature_reduction not in FEATURE_REDUCTIONS:
            raise ValueError(f"feature_reduction must be one of {FEATURE_REDUCTIONS}, got {feature_reduction!r}")
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.feature_reduction = feature_reduction

    def weights(self, ce: Tensor, selection_ce: Tensor) -> tuple[Tensor, Tensor]:
        """Return (W, teacher_index)."""
        raise NotImplementedError

    def losses(self, logits, target, features=None, adapt=None, selection_ce=None, teacher_logits=None):
        _check_logits(logits, self.min_networks)
        n = len(logits)
        ce_list = per_network_ce(logits, target)
        ce = torch.stack(ce_list)
        ce_detached = ce.detach()
        selection = ce_detached if selection_ce is None else selection_ce.detach().to(ce.device, ce.dtype)
        weights, teacher_index = self.weights(ce_detached, selection)
        eligible = torch.isfinite(selection) & torch.isfinite(ce_detached)
        terms = {}
        totals = ce
        if self.alpha > 0:
            kd = _weighted(pairwise_kl(logits, self.temperature, eligible), weights)
            totals = totals + self.alpha * kd
            terms.update({f"kd_{i}": kd[i].detach() for i in range(n)})
        if self.beta > 0 and features is not None:
            feat = _weighted(pairwise_feature_l2(features, adapt, eligible, self.feature_reduction), weights)
            totals = totals + self.beta * feat
            terms.update({f"feat_{i}": feat[i].detach() for i in range(n)})
        terms.update({f"ce_{i}": ce_detached[i] for i in range(n)})
        per_network = list(totals.unbind(0))
        return GroupLosses(per_network, totals.sum(), ce_detached, teacher_index, terms, weights)


class DeepMutualLearning(_Distiller):
    """Zhang et al. 2018: L_i = CE_i + alpha/(n-1) * sum_{j != i} KL(p_j || p_i), peers detached.

    A peer whose CE is not finite is left out (and the average taken over the others), so
    one diverged network cannot poison the group.
    """

    name = "dml"
    min_networks = 2

    def __init__(self, alpha: float = 1.0, temperature: float = 1.0, beta: float = 0.0, feature_reduction: str = "batchmean"):
        super().__init__(alpha, beta, temperature, feature_reduction)

    def weights(self, ce, selection_ce):
        n = ce.shape[0]
        eligible = torch.isfinite(selection_ce) & torch.isfinite(ce)
        peers = eligible[None, :] & ~torch.eye(n, dtype=torch.bool, device=ce.device)
        weights = peers.float() / peers.sum(dim=1, keepdim=True).clamp(min=1).float()
        return weights, torch.tensor(-1, device=ce.device)


SELECTIONS = ("own-batch", "clean", "smoothed")
RULES = ("best", "better")


class CompetitiveDistillation(_Distiller):
    """Shi et al., ICCV 2025. The lowest-CE network teaches; every other network distils from it.

    ``rule="best"`` (paper): teacher T = argmin CE; L_T = CE_T; L_i = CE_i + alpha*KL(p_T||p_i) + beta*L_F.
    ``rule="better"`` (authors' code): each network distils from every network with a lower CE,
    the terms averaged over them; the best network gets CE only. Ties go to the lower index.

    ``selection`` decides which CE picks the teacher: ``"own-batch"`` (paper: the CE on the
    input each network was given, perturbed or not), ``"clean"`` (the trainer passes every
    network's CE on the clean batch as ``selection_ce``) or ``"smoothed"`` (an exponential
    moving average of the selection CE with decay ``smoothing``).
    """

    name = "cd"
    min_networks = 2

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        temperature: float = 1.0,
        rule: str = "best",
        selection: str = "own-batch",
        smoothing: float = 0.9,
        feature_reduction: str = "batchmean",
    ):
        super().__init__(alpha, beta, temperature, feature_reduction)
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.rule, self.selection, self.smoothing = rule, selection, float(smoothing)
        self._ema: Tensor | None = None

    def _selection_scores(self, selection_ce: Tensor) -> Tensor:
        if self.selection != "smoothed":
            return selection_ce
        finite = torch.isfinite(selection_ce)
        if self._ema is None or self._ema.shape != selection_ce.shape:
            self._ema = selection_ce.clone()
        else:
            self._ema = self._ema.to(selection_ce.device)
            updated = self.smoothing * self._ema + (1.0 - self.smoothing) * selection_ce
            self._ema = torch.where(finite, updated, self._ema)
        # a network that diverges now is out now, whatever its history
        return torch.where(finite, self._ema, selection_ce)

    def weights(self, ce, selection_ce):
        n = ce.shape[0]
        scores = self._selection_scores(selection_ce)
        scores = torch.where(torch.isfinite(ce), scores, torch.full_like(scores, float("nan")))
        teacher_index, eligible = select_teacher(scores)
        if self.rule == "best":
            students = torch.arange(n, device=ce.device) != teacher_index
            onehot = F.one_hot(teacher_index.clamp(min=0), n).bool() & (teacher_index >= 0)
            weights = (students[:, None] & onehot[None, :]).float()
            return weights, teacher_index
        # "better": j is better than i if (score_j, j) < (score_i, i) and j is eligible
        s = torch.where(eligible, scores, torch.full_like(scores, float("inf")))
        index = torch.arange(n, device=ce.device)
        better = (s[None, :] < s[:, None]) | ((s[None, :] == s[:, None]) & (index[None, :] < index[:, None]))
        better = better & eligible[None, :]
        weights = better.float() / better.sum(dim=1, keepdim=True).clamp(min=1).float()
        return weights, teacher_index

    def state_dict(self) -> dict:
        return {"ema": None if self._ema is None else self._ema.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        ema = state.get("ema")
        self._ema = None if ema is None else ema.clone()


class KnowledgeDistillation(GroupMethod):
    """Offline KD (Hinton et al. 2015) from a fixed, frozen teacher network.

    L_i = ce_weight * CE_i + alpha * KL(softmax(t/tau) || softmax(s_i/tau)) * tau^2 for every
    student i. The teacher's logits are passed as ``teacher_logits`` (computed without grad).
    """

    name = "kd"
    min_networks = 1
    needs_teacher_network = True

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0, ce_weight: float = 1.0):
        if alpha < 0 or ce_weight < 0:
            raise ValueError(f"alpha and ce_weight must be >= 0, got alpha={alpha}, ce_weight={ce_weight}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha, self.temperature, self.ce_weight = float(alpha), float(temperature), float(ce_weight)

    def losses(self, logits, target, features=None, adapt=None, selection_ce=None, teacher_logits=None):
        _check_logits(logits, 1)
        if teacher_logits is None:
            raise ValueError("KnowledgeDistillation needs teacher_logits (the frozen teacher's output on the batch)")
        n = len(logits)
        ce_list = per_network_ce(logits, target)
        ce = torch.stack(ce_list)
        kd = pairwise_kl([teacher_logits.detach(), *logits], self.temperature)[0, 1:]
        totals = self.ce_weight * ce + self.alpha * kd
        terms = {f"ce_{i}": ce[i].detach() for i in range(n)}
        terms.update({f"kd_{i}": kd[i].detach() for i in range(n)})
        return GroupLosses(list(totals.unbind(0)), totals.sum(), ce.detach(), torch.tensor(-1, device=ce.device), terms)


METHODS: dict[str, type[GroupMethod]] = {
    "independent": Independent,
    "dml": DeepMutualLearning,
    "cd": CompetitiveDistillation,
    "kd": KnowledgeDistillation,
}


def freeze(module: nn.Module) -> nn.Module:
    """Put a teacher network in eval mode with every parameter frozen (for offline KD)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
