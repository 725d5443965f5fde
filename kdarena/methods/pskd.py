"""PS-KD: self-knowledge distillation with progressive refinement of targets (Kim et al., ICCV 2021)."""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..losses import Target, check_logits, cross_entropy, per_network_ce, upcast
from .base import GroupLosses, GroupMethod, MethodContext, MethodParams, Needs, StepInput
from .registry import register_method

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def soft_target_ce(logits: Tensor, target: Target, previous: Tensor, weight: Tensor) -> Tensor:
    """mean_b -sum_k t_bk log p_bk with t_b = (1 - a_b) onehot(y_b) + a_b * previous_b.

    Written as (1 - a_b) * CE_b + a_b * H(previous_b, p_b): the CE against a mixture of targets is
    the mixture of the CEs, and this form also takes a mixed (mixup/cutmix) label as the one-hot part.
    ``weight`` is a_b per sample (0 where there is no previous prediction).
    """
    log_p = F.log_softmax(upcast(logits), dim=1)
    soft = -(previous.detach().to(log_p.dtype) * log_p).sum(dim=1)
    a = weight.to(log_p.dtype)
    return ((1.0 - a) * cross_entropy(logits, target, reduction="none") + a * soft).mean()


class PSKDParams(MethodParams):
    alpha_T: float = Field(0.8, ge=0, le=1, description="final weight of the network's own past prediction (paper: 0.8)")
    epochs: Optional[int] = Field(None, ge=1, description="a_t = alpha_T * epoch / epochs (paper); null: a_t = alpha_T * "
                                  "progress (the fraction of training done, grows every step)")
    store_dtype: Literal["float32", "float16"] = Field("float32", description="dtype of the stored predictions "
                                                      "(train size x classes per network, on the device)")


@register_method("pskd")
class ProgressiveSelfKD(GroupMethod):
    """PS-KD (Kim, Ji, Yoon, Hwang; "Self-Knowledge Distillation with Progressive Refinement of
    Targets", ICCV 2021): a network learns from soft targets that mix the label with its own
    prediction from the previous epoch.

    Implemented, for every network i of the group independently (one network is enough)::

        t_b = (1 - a_t) * onehot(y_b) + a_t * P_i[idx_b]
        L_i = -(1/B) sum_b sum_k t_bk log softmax(z_i)_bk
        a_t = alpha_T * epoch / epochs   (``epochs`` set; epoch counted from 0)
            = alpha_T * progress          (``epochs`` null, default: the fraction of training done)

    where P_i (train size x classes) holds network i's softmax prediction for every training sample,
    written after the sample's loss is taken: when a sample comes round again in the next epoch, its
    target uses the prediction of the previous epoch. The targets are constants: no gradient flows
    into P_i.

    Choices where the paper is silent or that this implementation makes:

    * The stored prediction is the one the network made in its training forward pass on that sample
      (augmented view, train-mode BatchNorm), at temperature 1: no extra pass over the data.
    * In the first epoch, and for a sample never seen yet (e.g. dropped with the last incomplete
      batch), the target is the one-hot label. A non-finite prediction is not stored (the sample
      keeps its previous one).
    * ``epochs`` null: a_t grows every step with ``progress`` instead of once per epoch (the trainer
      does not tell methods the epoch count); set ``method.epochs`` to ``optim.epochs`` for the
      paper's per-epoch schedule. alpha_T defaults to the paper's CIFAR value 0.8.
    * The store lives on the device (``store_dtype`` float16 halves it) and is part of the method's
      state: a resumed run continues bit for bit. Under torchrun every process would hold its own,
      incomplete store, so PS-KD refuses to run there for now.
    * ``GroupLosses.ce`` and the ``ce_i`` terms are the plain CE against the labels (comparable
      with every other method), ``kd_i`` is L_i - CE_i (what the soft targets changed); the input
      perturbation of the competition does not apply.
    """

    label = "PS-KD self-distillation: soft targets mixing the label with the network's own previous-epoch prediction"
    paper = "Kim et al., Self-Knowledge Distillation with Progressive Refinement of Targets, ICCV 2021"
    Params = PSKDParams
    params: PSKDParams
    needs = Needs(min_networks=1, perturbation=False, sample_index=True)
    presets = {"pskd": ["method.name=pskd", "perturb.enabled=false"]}

    def __init__(self, params: PSKDParams | None = None, **options):
        super().__init__(params, **options)
        self.train_size = 0
        self.predictions: Tensor | None = None  # (n, N, K) in store_dtype
        self.seen: Tensor | None = None  # (n, N) bool: a prediction is stored

    def setup(self, context: MethodContext) -> None:
        if context.train_size <= 0:
            raise ValueError("method pskd needs the training set size (MethodContext.train_size) to store a prediction per sample")
        self.train_size = int(context.train_size)

    def alpha_at(self, step: StepInput) -> float:
        p = self.params
        if p.epochs is not None:
            return p.alpha_T * min(step.epoch / p.epochs, 1.0)
        return p.alpha_T * min(max(step.progress, 0.0), 1.0)

    def _store(self, n: int, classes: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if self.predictions is None:
            if self.train_size <= 0:
                raise ValueError("PS-KD has no training set size: call setup(MethodContext(..., train_size=N)) before losses()")
            self.predictions = torch.zeros(n, self.train_size, classes, dtype=STORE_DTYPES[self.params.store_dtype], device=device)
            self.seen = torch.zeros(n, self.train_size, dtype=torch.bool, device=device)
        elif self.predictions.shape[0] != n or self.predictions.shape[2] != classes:
            raise ValueError(f"PS-KD stores predictions for {self.predictions.shape[0]} networks x {self.predictions.shape[2]} "
                             f"classes, got {n} x {classes}")
        self.predictions, self.seen = self.predictions.to(device), self.seen.to(device)
        return self.predictions, self.seen

    def losses(self, step: StepInput) -> GroupLosses:
        logits = step.logits
        check_logits(logits, self.needs.min_networks)
        if step.index is None:
            raise ValueError("PS-KD needs the batch's sample indices (StepInput.index); the trainer fills them for Needs(sample_index=True)")
        if step.reduce_mean is not None:
            raise ValueError("method pskd does not run under torchrun yet (each process would keep its own prediction store); "
                             "train in one process")
        n, classes = len(logits), logits[0].shape[1]
        predictions, seen = self._store(n, classes, logits[0].device)
        index = step.index.to(predictions.device)  # not range-checked here: that would wait for the device every step
        alpha = self.alpha_at(step)
        ce = torch.stack(per_network_ce(logits, step.targets))
        losses = []
        for i, z in enumerate(logits):
            weight = alpha * seen[i, index].to(torch.float32)
            losses.append(soft_target_ce(z, step.targets[i], predictions[i, index].float(), weight))
            # store after use: the next time this sample comes round (next epoch) it sees this prediction
            with torch.no_grad():
                p = F.softmax(upcast(z.detach()), dim=1)
                finite = torch.isfinite(p).all(dim=1)
                predictions[i, index] = torch.where(finite[:, None], p.to(predictions.dtype), predictions[i, index])
                seen[i, index] = seen[i, index] | finite
        totals = torch.stack(losses)
        # kd: what the soft targets changed, the loss minus the plain CE (0 in the first epoch)
        return GroupLosses.of(totals, ce, per_network=losses, kd=totals - ce, extra={"alpha_t": ce.new_tensor(alpha)})

    def state_dict(self) -> dict:
        if self.predictions is None:
            return {"predictions": None, "seen": None}
        return {"predictions": self.predictions.detach().clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict) -> None:
        predictions, seen = state.get("predictions"), state.get("seen")
        if predictions is None:
            self.predictions = self.seen = None
            return
        if self.train_size and predictions.shape[1] != self.train_size:
            raise ValueError(f"the checkpoint's PS-KD store holds {predictions.shape[1]} samples, this run's training set {self.train_size}")
        self.predictions, self.seen = predictions.clone(), seen.clone()

    def describe(self, perturb=None) -> str:
        return f"{self.name}, α_T {self.params.alpha_T}"
