"""``summary.json``: what a finished run scored, computed once from its epoch records, written last.

For every network of the group and for the ensemble (the mean of their softmax): the test top-1 and
top-5 of the last epoch; with a validation split, the test top-1 at the epoch where that network's
validation top-1 peaked (``test_at_best_val_top1``, the number studies report); and the best test
top-1 over epochs, chosen on the test set itself and named so. Networks a method evaluates besides
the group (temporal means, a gated ensemble) are in ``extra``, each selected on its own validation
top-1. Then speed, perturbation counts and what the run ran on (config, versions, device, precision).

The same :class:`Summary` checks the file for the trainer that writes it and for every reader
(``kdarena train``'s table, ``report``, ``sweep``, ``confirm``): lenient about keys it does not name,
strict about the numbers it does.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, PrivateAttr, field_validator, model_validator

from ..version import __version__
from .epoch import Split, accuracy_key, is_before_training, is_evaluated, selection_split
from .numbers import Amount, Count, Fraction, Percent


class _Lenient(BaseModel):
    """Checks the fields listed; keeps every other key as written (reports show them, e.g. config differences)."""

    model_config = ConfigDict(extra="allow", strict=True)


class Result(_Lenient):
    """One network's (or the ensemble's) accuracies, in the order the file lists them."""

    name: Optional[str] = None
    last_test_top1: Optional[Percent] = None
    last_test_top5: Optional[Percent] = None
    best_val_top1: Optional[Percent] = None
    best_val_epoch: Optional[Count] = None
    test_at_best_val_top1: Optional[Percent] = None
    last_val_top1: Optional[Percent] = None
    best_test_top1_selected_on_test: Optional[Percent] = None
    best_test_epoch: Optional[Count] = None
    teacher_share: Optional[Fraction] = None
    last_train_top1: Optional[Percent] = None

    def test_top1(self, at: Literal["last", "best"]) -> Optional[float]:
        """Test top-1 at the last epoch, or at the epoch of the best validation top-1 (None without a validation split)."""
        return self.last_test_top1 if at == "last" else self.test_at_best_val_top1

    def selected(self) -> Optional[float]:
        """Test top-1 at the epoch chosen on the selection split: validation when the run has one, else test."""
        return self.test_at_best_val_top1 if self.test_at_best_val_top1 is not None else self.best_test_top1_selected_on_test


class _Method(_Lenient):
    name: Optional[str] = None


class _Perturb(_Lenient):
    ops: Union[list[str], str, None] = None
    parameters: Optional[dict[str, Any]] = None


class StoredConfig(_Lenient):
    """The parts of a stored run config that reports and plots read (seed, networks, method, data, schedule)."""

    seed: Optional[int] = None
    models: Optional[list[str]] = None
    method: Optional[_Method] = None
    perturb: Optional[_Perturb] = None
    data: Optional[dict[str, Any]] = None
    optim: Optional[dict[str, Any]] = None
    _written: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_as_written(cls, data: Any, handler) -> "StoredConfig":
        config = handler(data)
        config._written = data if isinstance(data, dict) else config.model_dump()
        return config

    def as_written(self) -> dict[str, Any]:
        """The whole config as the file holds it (its key order too; nothing is converted in strict mode)."""
        return self._written


class DataCounts(_Lenient):
    """What the run trained and was scored on (written since CIFAR-100 from image files)."""

    name: Optional[str] = None
    classes: Optional[Count] = None
    train_images: Optional[Count] = None
    val_images: Optional[Count] = None
    test_images: Optional[Count] = None


class SummaryConfig(_Lenient):
    """What ``kdarena plot`` reads from a summary: only the config."""

    config: Optional[StoredConfig] = None


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string; an unreadable one counts as the oldest."""
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


class Summary(_Lenient):
    """``summary.json``. Its schema is versioned by ``version``, the kdarena that wrote it: every release up
    to this one writes these fields with these meanings (runs written by 0.2 read unchanged); a run written
    by a newer release is refused with one line naming its version (a field may mean something else there).
    A release that changes a field's meaning reads the older files here, by their ``version``."""

    epochs: Optional[Count] = None
    selection_split: Optional[Split] = None
    networks: list[Result]
    ensemble: Optional[Result] = None
    extra: Optional[dict[str, Result]] = None  # networks a method evaluates besides the group
    wall_seconds: Amount = 0.0  # training only, as train_seconds (the name 0.2 wrote)
    #: seconds spent training, evaluating, and both (start-up and data loading not included); absent in older summaries
    train_seconds: Optional[Amount] = None
    eval_seconds: Optional[Amount] = None
    total_seconds: Optional[Amount] = None
    images_per_s: Amount = 0.0
    perturbed_steps: Count = 0
    perturbed_won: Count = 0
    run_dir: Optional[str] = None
    config: Optional[StoredConfig] = None
    version: Optional[str] = None
    world_size: Optional[Count] = None
    precision: Optional[str] = None
    device: Optional[str] = None
    device_model: Optional[str] = None
    torch: Optional[str] = None
    data: Optional[DataCounts] = None

    @field_validator("version")
    @classmethod
    def _not_newer(cls, version: Optional[str]) -> Optional[str]:
        if version is not None and _release(version) > _release(__version__):
            raise ValueError(f"written by kdarena {version}, newer than this kdarena {__version__}; "
                             "read it with that release or a later one")
        return version

    @model_validator(mode="after")
    def _won_within_steps(self) -> "Summary":
        if self.perturbed_won > self.perturbed_steps:
            raise ValueError(f"perturbed_won {self.perturbed_won} exceeds perturbed_steps {self.perturbed_steps}")
        return self

    def as_written(self) -> dict[str, Any]:
        """The plain data of the file: the keys it was made with, in the schema's order, then any others."""
        data = self.model_dump(exclude_unset=True)
        if self.config is not None:
            data["config"] = self.config.as_written()
        return data

    def table(self) -> str:
        """What ``kdarena train`` prints at the end: each network's last and selected test top-1."""
        split = self.selection_split or "test"
        teacher = any(entry.teacher_share is not None for entry in self.networks)  # none for methods without a teacher
        lines = [f"run: {self.run_dir or ''}  epochs: {self.epochs}  images/s: {self.images_per_s:.0f}{self.seconds_note()}",
                 f"{'network':<10} {'model':<14} {'last test':>10} {'best-' + split + ' test':>15}"
                 + (f" {'teacher share':>14}" if teacher else "")]
        models = (self.config.models if self.config else None) or []
        for i, entry in enumerate(self.networks):
            lines.append(f"{entry.name:<10} {models[i] if i < len(models) else '':<14} {entry.last_test_top1:>10.2f} "
                         f"{entry.selected():>15.2f}" + (f" {entry.teacher_share or 0:>14.2f}" if teacher else ""))
        ens = self.ensemble
        lines.append(f"{'ensemble':<10} {'':<14} {ens.last_test_top1:>10.2f} {ens.selected():>15.2f}")
        return "\n".join(lines)

    def seconds_note(self) -> str:
        """``  seconds: 147.0 train + 307.2 evaluation = 454.2`` ('' for a summary written before they were recorded)."""
        if self.eval_seconds is None or self.train_seconds is None or self.total_seconds is None:
            return ""
        return f"  seconds: {self.train_seconds:.1f} train + {self.eval_seconds:.1f} evaluation = {self.total_seconds:.1f}"

    def accuracy_note(self) -> str:
        """``; last test top-1 71.20 / 70.85 (ensemble 72.40)``: the tail of a sweep's line for a run ('' before any test)."""
        if not self.networks:
            return ""
        accs = " / ".join(f"{n.last_test_top1:.2f}" for n in self.networks)
        ens = self.ensemble.last_test_top1 if self.ensemble is not None else None
        return f"; last test top-1 {accs}" + (f" (ensemble {ens:.2f})" if ens is not None and len(self.networks) > 1 else "")


def _result(key: str, rows: Sequence[dict[str, Any]], selected_on: Split, top5: bool = True) -> dict[str, Any]:
    """``key``'s accuracies over the evaluated ``rows``: at the last one, and at the best one on each split."""
    last = rows[-1]
    entry: dict[str, Any] = {"name": key, "last_test_top1": last[accuracy_key(key, "test")]}
    if top5:
        entry["last_test_top5"] = last[accuracy_key(key, "test", "top5")]
    if selected_on == "val" and accuracy_key(key, "val") in last:
        best = max(rows, key=lambda r: r[accuracy_key(key, "val")])
        entry.update({"best_val_top1": best[accuracy_key(key, "val")], "best_val_epoch": best["epoch"],
                      "test_at_best_val_top1": best[accuracy_key(key, "test")], "last_val_top1": last[accuracy_key(key, "val")]})
    best_test = max(rows, key=lambda r: r[accuracy_key(key, "test")])
    entry.update({"best_test_top1_selected_on_test": best_test[accuracy_key(key, "test")], "best_test_epoch": best_test["epoch"]})
    return entry


def summarize(records: list[dict[str, Any]], n: int, **facts: Any) -> Summary:
    """The summary of a run of ``n`` networks from its epoch records; ``facts``: what it ran on (config, versions...).

    ``test_at_best_val`` is the test accuracy at the epoch where that network's validation
    accuracy peaked; ``best_test`` (picked on the test set itself) is kept but labelled so.
    """
    records = [r for r in records if not is_before_training(r)]  # the starting weights' evaluation is no epoch
    evaluated = [r for r in records if is_evaluated(r)]
    if not evaluated:
        return Summary.model_validate({"epochs": len(records), "networks": [], **facts})
    split = selection_split(evaluated[-1])
    out: dict[str, Any] = {"epochs": len(records), "selection_split": split, "networks": []}
    for i in range(n):
        entry = _result(f"net{i}", evaluated, split)
        if any(f"net{i}/teacher_share" in r for r in records):  # recorded for methods that pick a teacher
            entry["teacher_share"] = sum(r.get(f"net{i}/teacher_share", 0.0) for r in records) / len(records)
        entry["last_train_top1"] = records[-1].get(f"net{i}/train_top1")
        out["networks"].append(entry)
    out["ensemble"] = _result("ensemble", evaluated, split)
    # networks a method evaluates besides the group (temporal means, a gated ensemble), each selected on its own val
    group = {f"net{i}" for i in range(n)} | {"ensemble"}
    extra = sorted({k.split("/")[0] for k in evaluated[-1] if k.endswith("/test_top1")} - group)
    for key in extra:
        rows = [r for r in evaluated if accuracy_key(key, "test") in r]
        entry = _result(key, rows, split, top5=False)
        out.setdefault("extra", {})[key] = {k: entry[k] for k in ("name", "last_test_top1", "best_val_top1", "test_at_best_val_top1") if k in entry}
    out["wall_seconds"] = out["train_seconds"] = records[-1].get("wall_seconds", 0.0)
    out["eval_seconds"] = sum(r.get("eval_seconds", 0.0) for r in records)
    out["total_seconds"] = out["train_seconds"] + out["eval_seconds"]
    speeds = [r["images_per_s"] for r in records if r.get("images_per_s")]
    out["images_per_s"] = sorted(speeds)[len(speeds) // 2] if speeds else 0.0
    out["perturbed_steps"] = sum(r.get("perturbed_steps", 0) for r in records)
    out["perturbed_won"] = sum(r.get("perturbed_won", 0) for r in records)
    return Summary.model_validate({**out, **facts})
