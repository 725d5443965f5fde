"""The per-step numbers the host needs, gathered on the device and read in ONE transfer.

After the backward pass the trainer needs each network's loss (the non-finite policy and the
logs), the teacher, each network's count of correct training predictions and the method's named
terms. Reading each would synchronise with the device several times per step; instead they are
packed into one tensor, reduced across processes in one collective under torchrun, and read
with one ``tolist()`` every k steps (``train.host_every``) for k steps at once (:class:`PendingValues`),
so the device never waits for the host in between.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..methods import GroupLosses
from ..perturb import Perturbation


@dataclass(frozen=True)
class StepContext:
    """What the host decided for a step before running it (kept with its numbers until they are read)."""

    step: int
    perturbation: Perturbation | None
    mutated: int | None  # the network whose weights were mutated this step


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


@dataclass
class Packed:
    """One step's numbers on the device, laid out [losses (n), teacher, hits (n), terms, batch]."""

    tensor: Tensor
    n: int
    names: list[str]
    #: under torchrun the losses and terms are global sums until read: divided on the host, as always
    world_size: int = 1

    @property
    def finite(self) -> Tensor:
        """(n,) bool on the device: which networks' losses are finite (a sum is finite iff every rank's is)."""
        return torch.isfinite(self.tensor[: self.n])

    def values(self, numbers: list[float]) -> StepValues:
        n, w = self.n, self.world_size
        losses, terms = numbers[:n], numbers[2 * n + 1:-1]
        if w > 1:
            losses, terms = [v / w for v in losses], [v / w for v in terms]
        return StepValues(losses=losses, teacher=int(numbers[n]), hits=numbers[n + 1:2 * n + 1],
                          terms=dict(zip(self.names, terms)), batch=int(numbers[-1]))


def pack(losses: GroupLosses, logits: Sequence[Tensor], y: Tensor,
         all_reduce_sum: Callable[[Tensor], Tensor] | None = None, world_size: int = 1) -> Packed:
    """The step's numbers as one device tensor (no host sync).

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
    batch = loss.new_tensor([float(y.shape[0])])
    if all_reduce_sum is not None:
        reduced = all_reduce_sum(torch.cat([loss, hits, terms, batch]))
        loss, hits, terms, batch = reduced[:n], reduced[n:2 * n], reduced[2 * n:-1], reduced[-1:]
    return Packed(torch.cat([loss, teacher, hits, terms, batch]), n, names, world_size if all_reduce_sum is not None else 1)


class PendingValues:
    """Steps whose numbers stay on the device until :meth:`drain` reads them all in one transfer."""

    def __init__(self) -> None:
        self._steps: list[tuple[Packed, StepContext]] = []

    def __len__(self) -> int:
        return len(self._steps)

    def push(self, packed: Packed, context: StepContext) -> None:
        self._steps.append((packed, context))

    def drain(self) -> list[tuple[StepValues, StepContext]]:
        """Every pending step's values (in order) with the context it was pushed with."""
        if not self._steps:
            return []
        numbers = torch.cat([packed.tensor for packed, _ in self._steps]).tolist()
        out, start = [], 0
        for packed, context in self._steps:
            size = packed.tensor.numel()
            out.append((packed.values(numbers[start:start + size]), context))
            start += size
        self._steps.clear()
        return out
