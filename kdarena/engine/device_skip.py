"""A diverged network's optimizer step undone on the device, without waiting for the host.

Every step, whatever ``train.host_every`` (the host reads the losses after the step, every step or
every k steps; :class:`~kdarena.engine.recovery.NonFinitePolicy` then counts, stops or re-births):

1. before the optimizer step, the gradients of non-finite networks are zeroed (so gradient
   clipping and fp16's GradScaler see finite numbers and the other networks step normally), and
   a copy of every parameter and optimizer-state tensor is kept;
2. after the step, the non-finite networks' parameters and optimizer state are put back
   (``torch.where``), so they end exactly as if the optimizer had skipped them.

Finite networks are not touched (``where`` selects their new values bit for bit). One limit: an
optimizer state created by this very step (a network's first step, e.g. AdamW's moments) cannot
be "un-created"; it is left as that step made it from a zero gradient. And on CUDA, an optimizer
counter kept on the CPU (AdamW's ``step`` when not capturable) still advances.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class DeviceSkip:
    def __init__(self, per_network_params: Sequence[Sequence[nn.Parameter]], optimizer: torch.optim.Optimizer):
        self.params = [list(params) for params in per_network_params]
        self.optimizer = optimizer

    @torch.no_grad()
    def before_step(self, finite: Tensor) -> list[list[tuple[Tensor, Tensor, dict[str, Tensor]]]]:
        """Zero the non-finite networks' gradients; return what the optimizer step may change."""
        saved = []
        for i, params in enumerate(self.params):
            ok = finite[i]
            kept = []
            for p in params:
                if p.grad is None:
                    continue
                p.grad.copy_(torch.where(ok, p.grad, torch.zeros_like(p.grad)))
                state = {k: v.clone() for k, v in self.optimizer.state.get(p, {}).items() if isinstance(v, Tensor)}
                kept.append((p, p.detach().clone(), state))
            saved.append(kept)
        return saved

    @torch.no_grad()
    def after_step(self, finite: Tensor, saved: list[list[tuple[Tensor, Tensor, dict[str, Tensor]]]]) -> None:
        """Put the non-finite networks' parameters and optimizer state back."""
        for i, kept in enumerate(saved):
            ok = finite[i]
            for p, value, state in kept:
                p.copy_(torch.where(ok, p, value))
                current = self.optimizer.state.get(p, {})
                for key, old in state.items():
                    new = current.get(key)
                    # (a CPU-resident counter beside CUDA parameters, e.g. AdamW's `step`, is left alone:
                    # restoring it would need the flag on the host, the sync this class exists to avoid)
                    if isinstance(new, Tensor) and new.shape == old.shape and new.device == ok.device:
                        new.copy_(torch.where(ok, new, old))
