"""``inputs.json``: what the run's networks take in, recorded when the run starts training.

An export and ``kdarena predict RUN`` read it instead of building the training data, so they work after
that data moved or went away: the class names, the input shape (channels, height, width) and the
preprocessing that evaluation applies (colour, size, resize, normalisation), as the model card states them.
"""
from __future__ import annotations

from typing import Any

from pydantic import model_validator

from .card import CardInput, PositiveInt, Preprocessing, _Strict


class RunInputs(_Strict):
    num_classes: PositiveInt
    classes: list[str]
    input: CardInput
    preprocessing: Preprocessing

    @model_validator(mode="after")
    def _consistent(self) -> "RunInputs":
        if len(self.classes) != self.num_classes:
            raise ValueError(f"classes names {len(self.classes)} classes, num_classes says {self.num_classes}")
        if self.preprocessing.size != self.input.shape[1:]:
            raise ValueError(f"preprocessing.size {self.preprocessing.size} is not input.shape's {self.input.shape[1:]}")
        return self

    @property
    def in_channels(self) -> int:
        return self.input.shape[0]

    def as_written(self) -> dict[str, Any]:
        return self.model_dump()
