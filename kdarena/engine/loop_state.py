"""Where a run stands: epoch, batch, step, the epoch's statistics, the best validation so far, time.

With the parts' own states (weights, optimizer, scheduler, method...), this is what a checkpoint holds;
the trainer owns one and hands it, with the parts, to :mod:`kdarena.engine.resume`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .stats import EpochStats


@dataclass
class LoopState:
    n: int
    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    stats: EpochStats = field(init=False)
    #: best validation (or test, without a validation split) top-1 of each network, and of any network
    best_val: list[float] = field(init=False)
    best_val_any: float = -1.0
    #: training seconds of the epochs done, over every resume
    history_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.stats = EpochStats(self.n)
        self.best_val = [-1.0] * self.n

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        self.stats = EpochStats(self.n)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's loop keys (top level of the checkpoint dict, as every kdarena version wrote them)."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "global_step": self.global_step,
                "stats": self.stats.state_dict(), "best_val": self.best_val, "best_val_any": self.best_val_any,
                "history_seconds": self.history_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch_in_epoch, self.global_step = state["epoch"], state["batch_in_epoch"], state["global_step"]
        self.stats.load_state_dict(state["stats"])
        self.best_val, self.best_val_any = state["best_val"], state["best_val_any"]
        self.history_seconds = state["history_seconds"]
