"""What ``train.nonfinite`` does when a network's loss is NaN or Inf: stop, skip its step, or re-birth it.

One policy for every ``train.host_every``. On the device, before anything is read: a non-finite
batch reaches no BatchNorm statistic, and the diverged networks' optimizer step is undone
(:class:`~kdarena.engine.device_skip.DeviceSkip`), so they are left exactly as they were. When the
host reads the step's numbers (every step, or every k steps), :class:`NonFinitePolicy` counts the
skipped step and then stops the run (``stop``, up to k-1 steps late) or re-births the network.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import UserError
from ..records.folder import checkpoint_path
from .stats import EpochStats

log = logging.getLogger("kdarena")


class NonFiniteLossError(UserError, RuntimeError):
    pass


class NonFinitePolicy:
    """``train.nonfinite`` on the host, given what it acts on (never the trainer)."""

    def __init__(self, policy: str, networks: nn.ModuleList, optimizer: torch.optim.Optimizer, models: Sequence[str],
                 num_classes: int, in_channels: int, device: torch.device, run_dir: Path):
        self.policy, self.networks, self.optimizer, self.models = policy, networks, optimizer, list(models)
        self.num_classes, self.in_channels, self.device, self.run_dir = num_classes, in_channels, device, run_dir

    def __call__(self, bad: list[int], teacher: int, step: int, epoch: int, stats: EpochStats) -> None:
        """Networks ``bad`` had a non-finite loss at ``step`` (their update was already undone on the device)."""
        if self.policy == "stop":
            last = checkpoint_path(self.run_dir)
            # point at a checkpoint only when one exists; optim.lr and train.nonfinite may change on resume
            where = (f"the last checkpoint is {last}; resume with --resume {self.run_dir} and a lower optim.lr, or"
                     if last.is_file() else "no checkpoint has been written yet; start again with a lower optim.lr, or")
            raise NonFiniteLossError(f"network(s) {bad} produced a non-finite loss at step {step} (epoch {epoch}); "
                                     f"{where} set optim.grad_clip, or choose train.nonfinite=skip or rebirth")
        for i in bad:
            stats.skipped[i] += 1
            if self.policy == "rebirth":
                self.rebirth(i, teacher)
                stats.reborn[i] += 1

    @torch.no_grad()
    def rebirth(self, index: int, teacher: int) -> None:
        """Replace a diverged network by a copy of the current teacher (same architecture) or a fresh one."""
        target = self.networks[index]
        same_arch = 0 <= teacher < len(self.networks) and teacher != index and self.models[teacher] == self.models[index]
        if same_arch:
            target.load_state_dict(self.networks[teacher].state_dict())
        else:
            from .. import models

            fresh = models.create(self.models[index], self.num_classes, self.in_channels).to(self.device)
            target.load_state_dict(fresh.state_dict())
        for p in target.parameters():
            self.optimizer.state.pop(p, None)
        log.warning("network %d diverged and was re-born from %s", index, f"network {teacher}" if same_arch else "a fresh initialisation")
