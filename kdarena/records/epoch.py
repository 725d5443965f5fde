"""One line of ``metrics.jsonl``: the record of one epoch, and the rule that picks the selection split.

Keys are ``epoch`` (0-based), ``step``, ``lr``, the training sums (``net{i}/train_loss``,
``net{i}/train_top1``, ``net{i}/ce|kd|feat``, ``net{i}/teacher_share``, ``perturb/{op}/count|won``,
...) and, on an evaluated epoch, ``{network}/{split}_{metric}`` for every network of the group,
``ensemble`` and the networks a method evaluates besides the group (``mean0``...), split ``val``
(when the run has a validation split) and ``test``, metric ``top1``, ``top5``, ``loss``. Times:
``epoch_seconds`` (the epoch's training), ``eval_seconds`` (its evaluation, on an evaluated epoch) and
``wall_seconds`` (training seconds of every epoch so far, over resumes; evaluation excluded).

A run started from weights (``weights``) first evaluates them: a record with ``epoch`` 0 and
``before_training`` true (``epoch 0`` on the console and in plots, before the first epoch's record,
also ``epoch`` 0), which no summary or export counts as a trained epoch.
"""
from __future__ import annotations

import re
from typing import Any, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, model_validator

from .numbers import Count, Finite, Fraction, Percent, first_problem

Split = Literal["val", "test"]


def accuracy_key(network: str, split: str, metric: str = "top1") -> str:
    """``net0/val_top1``: the record key of ``network``'s ``metric`` on ``split``."""
    return f"{network}/{split}_{metric}"


BEFORE_TRAINING = "before_training"


def is_before_training(record: Mapping[str, Any]) -> bool:
    """The evaluation of a run's starting weights, before its first epoch (not an epoch)."""
    return record.get(BEFORE_TRAINING) is True


def is_evaluated(record: Mapping[str, Any]) -> bool:
    """The epoch was evaluated (every evaluated epoch scores the test split); not the starting weights' record."""
    return accuracy_key("net0", "test") in record and not is_before_training(record)


def selection_split(record: Mapping[str, Any]) -> Split:
    """Where best epochs and best networks are chosen: the validation split when the run has one, else
    the test split (and every reader labels a choice made on test as such)."""
    return "val" if accuracy_key("net0", "val") in record else "test"


# The keys a reader uses, by pattern, and their kinds; other keys are kept as written.
_RULES: list[tuple[re.Pattern[str], TypeAdapter]] = [
    (re.compile(r"/(test|val)_top[15]$"), TypeAdapter(Optional[Percent])),
    (re.compile(r"/teacher_share$"), TypeAdapter(Optional[Fraction])),
    (re.compile(r"^net\d+/(ce|kd|feat)$"), TypeAdapter(Optional[Finite])),
    (re.compile(r"^perturb/.+/(count|won)$"), TypeAdapter(Count)),
]


class EpochRecord(BaseModel):
    """What the trainer writes for an epoch and every reader (plot, export, predict) reads back."""

    model_config = ConfigDict(extra="allow", strict=True)

    epoch: Count

    @model_validator(mode="after")
    def _keys_in_range(self) -> "EpochRecord":
        extra = self.model_extra or {}
        for key, value in extra.items():
            for pattern, adapter in _RULES:
                if pattern.search(key):
                    try:
                        adapter.validate_python(value)
                    except ValidationError as error:
                        raise ValueError(first_problem(error, key)) from None
                    break
        for key, count in extra.items():
            if key.startswith("perturb/") and key.endswith("/count") and extra.get(key[: -len("count")] + "won", 0) > count:
                raise ValueError(f"{key[:-len('/count')]} won more steps than it was applied to")
        return self
