"""Temporal means: an exponential moving average of each network's weights (the "mean teacher").

Used by PCL's peer mean teachers and by our competitive mean teachers (``cd-mean``). The means are
frozen copies in eval mode that follow their networks after every optimizer step; they are
evaluated each epoch as ``mean0``, ``mean1``, ... and saved in the method's state for exact resume.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from ..models.branched import whole
from .base import GroupLosses, StepInput, freeze


def ema_decay_at(step: int, ema_decay: float) -> float:
    """Mean-teacher ramp-up of the EMA decay: min(ema_decay, (t + 1) / (t + 10)), t the global step.

    Early on the average follows the network closely (its first weights are random, a long memory
    of them would only slow it down); later it is a true temporal mean.
    """
    return min(ema_decay, (step + 1) / (step + 10))


@torch.no_grad()
def ema_update(mean: nn.Module, online: nn.Module, decay: float) -> None:
    """mean <- decay * mean + (1 - decay) * online, for parameters and floating buffers (BN running
    statistics); integer buffers (BN's batch counter) are copied."""
    for m, o in zip(mean.parameters(), online.parameters()):
        m.mul_(decay).add_(o.detach(), alpha=1.0 - decay)
    for m, o in zip(mean.buffers(), online.buffers()):
        if m.dtype.is_floating_point:
            m.mul_(decay).add_(o.detach(), alpha=1.0 - decay)
        else:
            m.copy_(o)


class TemporalMeans:
    """One temporal mean per network of the group."""

    def __init__(self, ema_decay: float, owner: str):
        self.ema_decay, self.owner = float(ema_decay), owner
        self.models: list[nn.Module] = []

    def build(self, networks: Sequence[nn.Module]) -> None:
        """Start every temporal mean as a frozen copy of its network (eval mode)."""
        self.models = [freeze(copy.deepcopy(net)) for net in networks]

    def logits(self, step: StepInput) -> list[Tensor]:
        """The means' logits on the step's (clean) batch, without gradient."""
        if not self.models:
            raise ValueError(f"{self.owner} has no temporal means: call setup() (the trainer does) before losses()")
        if step.x is None:
            raise ValueError(f"{self.owner} needs the batch (StepInput.x) to run the temporal means on")
        with torch.no_grad(), step.autocast():
            return [mean(step.x).float() for mean in self.models]

    def update(self, networks: Sequence[nn.Module], step: int) -> None:
        decay = ema_decay_at(step, self.ema_decay)
        for mean, net in zip(self.models, networks):
            ema_update(mean, whole(net), decay)  # a branch of a shared trunk: pair the mean with trunk + branch

    def eval_networks(self) -> dict[str, nn.Module]:
        return {f"mean{i}": mean for i, mean in enumerate(self.models)}

    def state_dict(self) -> dict:
        return {"means": [{k: v.detach().clone() for k, v in mean.state_dict().items()} for mean in self.models]}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("means") or []
        if len(saved) != len(self.models):
            raise ValueError(f"the checkpoint holds {len(saved)} temporal means, this run has {len(self.models)} networks")
        for mean, values in zip(self.models, saved):
            mean.load_state_dict(values)


class WithTemporalMeans:
    """Mixin of the methods that keep ``self.temporal``: update the means after each step, evaluate them as
    extra networks and save them for exact resume."""

    temporal: TemporalMeans

    def after_step(self, networks: Sequence[nn.Module], losses: GroupLosses, step: StepInput) -> None:
        self.temporal.update(networks, step.step)

    def eval_networks(self) -> dict[str, nn.Module]:
        return self.temporal.eval_networks()

    def state_dict(self) -> dict:
        return self.temporal.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.temporal.load_state_dict(state)
