"""The per-step numbers the host needs, gathered on the device and read in ONE transfer.

After the backward pass the trainer needs each network's loss (the non-finite policy and the
logs), the teacher, each network's count of correct training predictions and the method's named
terms. Reading each would synchronise with the device several times per step; instead they are
packed into one tensor, reduced across processes in one collective under torchrun, and read
with one ``tolist()``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..methods import GroupLosses


@dataclass
class StepValues:
    losses: list[float]  # per network (global-batch mean under torchrun)
    teacher: int  # -1: no teacher
    hits: list[float]  # correct top-1 training predictions per network (global sum)
    terms: dict[str, float]  # the method's named terms (global-batch means)
    batch: int  # samples in the (global) batch

    @property
    def nonfinite(self) -> list[int]:
        """Networks whose loss is NaN or Inf."""
        return [i for i, v in enumerate(self.losses) if not math.isfinite(v)]


def gather(losses: GroupLosses, logits: Sequence[Tensor], y: Tensor,
           all_reduce_sum: Callable[[Tensor], Tensor] | None = None, world_size: int = 1) -> StepValues:
    """Pack, optionally reduce across processes, and read the step's numbers with one host transfer.

    Under torchrun, losses and terms become global-batch means and hits and the batch size global
    sums, so every rank logs and applies ``train.nonfinite`` identically (NaN/Inf on any rank stays
    non-finite). The teacher stays this rank's own choice, so records would show any disagreement.
    """
    n = len(logits)
    names = sorted(losses.terms)
    loss = torch.stack([p.detach().float() for p in losses.per_network])
    hits = torch.stack([(z.argmax(1) == y).sum() for z in logits]).float()
    terms = torch.stack([losses.terms[k].float() for k in names]) if names else hits.new_zeros(0)
    teacher = losses.teacher_index.float().reshape(1)
    batch = y.shape[0]
    if all_reduce_sum is None:
        values = torch.cat([loss, teacher, hits, terms]).tolist()
    else:
        reduced = all_reduce_sum(torch.cat([loss, hits, terms, loss.new_tensor([float(batch)])]))
        values = torch.cat([reduced[:n], teacher, reduced[n:]]).tolist()
        batch = int(values.pop())
        values = [v / world_size for v in values[:n]] + values[n:2 * n + 1] + [v / world_size for v in values[2 * n + 1:]]
    return StepValues(losses=values[:n], teacher=int(values[n]), hits=values[n + 1:2 * n + 1],
                      terms=dict(zip(names, values[2 * n + 1:])), batch=batch)
