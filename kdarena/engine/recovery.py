"""What ``train.nonfinite`` does when a network's loss is NaN or Inf: stop, skip its step, or re-birth it."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ..errors import UserError

if TYPE_CHECKING:
    from ..trainer import Trainer

log = logging.getLogger("kdarena")


class NonFiniteLossError(UserError, RuntimeError):
    pass


def handle_nonfinite(trainer: "Trainer", bad: list[int], teacher: int, step: int | None = None) -> None:
    """Apply the policy to the networks ``bad`` before the optimizer step (``step``: the step, when read late)."""
    policy = trainer.config.train.nonfinite
    if policy == "stop":
        last = trainer.checkpoint_dir / "last.pt"
        # point at a checkpoint only when one exists; optim.lr and train.nonfinite may change on resume
        where = (f"the last checkpoint is {last}; resume with --resume {trainer.run_dir} and a lower optim.lr, or"
                 if last.is_file() else "no checkpoint has been written yet; start again with a lower optim.lr, or")
        raise NonFiniteLossError(
            f"network(s) {bad} produced a non-finite loss at step {trainer.global_step if step is None else step} (epoch {trainer.epoch}); "
            f"{where} set optim.grad_clip, or choose train.nonfinite=skip or rebirth"
        )
    for i in bad:
        # Its gradients are NaN/Inf: drop them, so the optimizer leaves the network untouched this step.
        for p in trainer.group.network_parameters(i):
            p.grad = None
        trainer.stats.skipped[i] += 1
        if policy == "rebirth":
            rebirth(trainer, i, teacher)


@torch.no_grad()
def rebirth(trainer: "Trainer", index: int, teacher: int) -> None:
    """Replace a diverged network by a copy of the current teacher (same architecture) or a fresh one."""
    target = trainer.group.networks[index]
    models_ = trainer.config.models
    same_arch = 0 <= teacher < trainer.n and teacher != index and models_[teacher] == models_[index]
    if same_arch:
        target.load_state_dict(trainer.group.networks[teacher].state_dict())
    else:
        from .. import models

        fresh = models.create(models_[index], trainer.data.num_classes, trainer.data.in_channels).to(trainer.device)
        target.load_state_dict(fresh.state_dict())
    for p in target.parameters():
        trainer.optimizer.state.pop(p, None)
    trainer.stats.reborn[index] += 1
    log.warning("network %d diverged and was re-born from %s", index, f"network {teacher}" if same_arch else "a fresh initialisation")
