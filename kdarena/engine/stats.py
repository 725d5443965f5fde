"""Host-side bookkeeping of one epoch (restored with a mid-epoch checkpoint); the run's summary is :mod:`kdarena.records.summary`."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from ..perturb import Perturbation
from .step_values import StepValues


class EpochStats:
    """Sums over the steps of the current epoch."""

    def __init__(self, n: int):
        self.n = n
        self.sums: dict[str, float] = defaultdict(float)
        self.teacher = [0] * n
        self.perturbed: dict[str, int] = defaultdict(int)
        self.perturbed_won: dict[str, int] = defaultdict(int)
        self.skipped = [0] * n
        self.reborn = [0] * n
        self.switches = 0
        self.steps = 0
        self.samples = 0
        self.seconds = 0.0
        self.last_teacher = -1

    def add(self, values: StepValues, decision: Perturbation | None) -> None:
        """Count one step (a network with a non-finite loss adds no loss to the mean)."""
        self.steps += 1
        self.samples += values.batch
        for i in range(self.n):
            if math.isfinite(values.losses[i]):
                self.sums[f"loss_{i}"] += values.losses[i]
            self.sums[f"hits_{i}"] += values.hits[i]
        self.sums["count"] += values.batch
        for name, value in values.terms.items():
            if math.isfinite(value):
                self.sums[name] += value
        teacher = values.teacher
        if teacher >= 0:
            self.teacher[teacher] += 1
            if self.last_teacher >= 0 and teacher != self.last_teacher:
                self.switches += 1
            self.last_teacher = teacher
        if decision is not None:
            self.perturbed[decision.op] += 1
            if decision.network == teacher:
                self.perturbed_won[decision.op] += 1

    def train_accuracy(self) -> float:
        """Running top-1 training accuracy (%) over all networks this epoch."""
        seen = max(self.sums["count"], 1.0)
        return 100.0 * sum(self.sums[f"hits_{i}"] for i in range(self.n)) / (self.n * seen)

    def record(self, teacher: bool = True) -> dict[str, Any]:
        """The epoch's training numbers as keys of its :class:`~kdarena.records.epoch.EpochRecord`; ``teacher``:
        the method picks a teacher per step (else no teacher share is recorded: a DML share of 0.00 is no fact)."""
        n, count, steps = self.n, max(self.sums["count"], 1.0), max(self.steps, 1)
        record: dict[str, Any] = {}
        for i in range(n):
            record[f"net{i}/train_loss"] = self.sums[f"loss_{i}"] / max(self.steps - self.skipped[i], 1)
            record[f"net{i}/train_top1"] = 100.0 * self.sums[f"hits_{i}"] / count
            for term in ("ce", "kd", "feat"):
                if f"{term}_{i}" in self.sums:
                    record[f"net{i}/{term}"] = self.sums[f"{term}_{i}"] / steps
            if teacher:
                record[f"net{i}/teacher_share"] = self.teacher[i] / steps
            record[f"net{i}/skipped_steps"] = self.skipped[i]
            record[f"net{i}/reborn"] = self.reborn[i]
        record["teacher_switches"] = self.switches
        record["perturbed_steps"] = sum(self.perturbed.values())
        record["perturbed_won"] = sum(self.perturbed_won.values())
        for op, count_op in sorted(self.perturbed.items()):
            record[f"perturb/{op}/count"] = count_op
            record[f"perturb/{op}/won"] = self.perturbed_won.get(op, 0)
        record["train_seconds"] = self.seconds
        record["images_per_s"] = self.samples / self.seconds if self.seconds > 0 else 0.0
        return record

    def state_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, defaultdict) else v) for k, v in vars(self).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key == "sums":
                self.sums = defaultdict(float, value)
            elif key in ("perturbed", "perturbed_won"):
                setattr(self, key, defaultdict(int, value))
            else:
                setattr(self, key, value)
