"""Host-side bookkeeping of one epoch (restored with a mid-epoch checkpoint) and the run's summary."""
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

    def record(self) -> dict[str, Any]:
        """The epoch's training numbers as ``metrics.jsonl`` keys."""
        n, count, steps = self.n, max(self.sums["count"], 1.0), max(self.steps, 1)
        record: dict[str, Any] = {}
        for i in range(n):
            record[f"net{i}/train_loss"] = self.sums[f"loss_{i}"] / max(self.steps - self.skipped[i], 1)
            record[f"net{i}/train_top1"] = 100.0 * self.sums[f"hits_{i}"] / count
            for term in ("ce", "kd", "feat"):
                if f"{term}_{i}" in self.sums:
                    record[f"net{i}/{term}"] = self.sums[f"{term}_{i}"] / steps
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


def summarize(records: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Last-epoch and best-validation-epoch test accuracy for every network and the ensemble.

    ``test_at_best_val`` is the test accuracy at the epoch where that network's validation
    accuracy peaked; ``best_test`` (picked on the test set itself) is kept but labelled so.
    """
    evaluated = [r for r in records if "net0/test_top1" in r]
    if not evaluated:
        return {"epochs": len(records), "networks": []}
    has_val = "net0/val_top1" in evaluated[-1]
    out: dict[str, Any] = {"epochs": len(records), "selection_split": "val" if has_val else "test", "networks": []}
    for key in [f"net{i}" for i in range(n)] + ["ensemble"]:
        last = evaluated[-1]
        entry = {"name": key, "last_test_top1": last[f"{key}/test_top1"], "last_test_top5": last[f"{key}/test_top5"]}
        if has_val:
            best = max(evaluated, key=lambda r: r[f"{key}/val_top1"])
            entry.update({"best_val_top1": best[f"{key}/val_top1"], "best_val_epoch": best["epoch"],
                          "test_at_best_val_top1": best[f"{key}/test_top1"], "last_val_top1": last[f"{key}/val_top1"]})
        best_test = max(evaluated, key=lambda r: r[f"{key}/test_top1"])
        entry.update({"best_test_top1_selected_on_test": best_test[f"{key}/test_top1"], "best_test_epoch": best_test["epoch"]})
        if key != "ensemble":
            entry["teacher_share"] = sum(r.get(f"{key}/teacher_share", 0.0) for r in records) / len(records)
            entry["last_train_top1"] = records[-1].get(f"{key}/train_top1")
        if key == "ensemble":
            out["ensemble"] = entry
        else:
            out["networks"].append(entry)
    # networks a method evaluates besides the group (temporal means, a gated ensemble), each selected on its own val
    extra = sorted({k.split("/")[0] for k in evaluated[-1] if k.endswith("/test_top1")} - {f"net{i}" for i in range(n)} - {"ensemble"})
    for key in extra:
        rows = [r for r in evaluated if f"{key}/test_top1" in r]
        entry = {"name": key, "last_test_top1": rows[-1][f"{key}/test_top1"]}
        if has_val and f"{key}/val_top1" in rows[-1]:
            best = max(rows, key=lambda r: r[f"{key}/val_top1"])
            entry.update({"best_val_top1": best[f"{key}/val_top1"], "test_at_best_val_top1": best[f"{key}/test_top1"]})
        out.setdefault("extra", {})[key] = entry
    out["wall_seconds"] = records[-1].get("wall_seconds", 0.0)
    speeds = [r["images_per_s"] for r in records if r.get("images_per_s")]
    out["images_per_s"] = sorted(speeds)[len(speeds) // 2] if speeds else 0.0
    out["perturbed_steps"] = sum(r.get("perturbed_steps", 0) for r in records)
    out["perturbed_won"] = sum(r.get("perturbed_won", 0) for r in records)
    return out
