"""Learning-rate schedules stepped once per iteration: linear warm-up, then cosine / step / multistep."""
from __future__ import annotations

import math

import torch

from ..config import OptimConfig


def lr_factor(config: OptimConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base LR at a global step (pure function, so resume needs only the step)."""
    epoch = step / steps_per_epoch
    warmup = config.warmup_epochs
    if warmup > 0 and epoch < warmup:
        return (epoch + 1.0 / steps_per_epoch) / warmup
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "cosine":
        span = max(config.epochs - warmup, 1e-12)
        progress = min(max((epoch - warmup) / span, 0.0), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "step":
        return config.gamma ** int(epoch // config.step_size)
    milestones = config.milestones
    if milestones and all(m < 1 for m in milestones):
        milestones = [m * config.epochs for m in milestones]
    return config.gamma ** sum(1 for m in milestones if epoch >= m)


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step, steps_per_epoch))
