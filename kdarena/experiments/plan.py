"""The plan file ``kdarena tune`` writes and ``kdarena confirm`` runs: each method at its tuned best.

A plan is self-contained: the whole base config (the config file with the tuning's overrides and
epochs, as tuned), and per method the overrides that make it (its preset and its tuned values), the
validation top-1 that chose them and the trial they come from. ``objective`` says which epoch was
tuned, so confirmation reads the test accuracy of the same epoch: ``last``, or ``best`` (the epoch of
the best validation top-1). Read as untrusted input: YAML without tags, checked by :class:`Plan`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import UserError
from ..records.numbers import first_problem

PLAN_VERSION = 1
#: A plan is a few kilobytes; anything far larger is not one.
PLAN_MAX_BYTES = 4 * 2**20
Objective = Literal["last", "best"]


class PlanError(UserError):
    """A plan file cannot be read or has changed; the message names the file."""


class PlannedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overrides: list[str]
    validation_top1: Optional[float] = Field(None, allow_inf_nan=False)
    trial: Optional[int] = None
    params: dict[str, Any] = {}


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kdarena_plan: Literal[1] = PLAN_VERSION
    objective: Objective
    config: dict[str, Any]
    methods: dict[str, PlannedMethod] = Field(min_length=1)


def digest(path: Path) -> str:
    """sha256 of the plan file's bytes (what ``confirm`` freezes)."""
    return hashlib.sha256(read_bytes(path)).hexdigest()


def read_bytes(path: Path) -> bytes:
    path = Path(path)
    try:
        if not path.is_file():
            raise PlanError(f"{path} is not a plan file (kdarena tune writes DIR/plan.yaml)")
        if path.stat().st_size > PLAN_MAX_BYTES:
            raise PlanError(f"{path} is larger than any plan ({PLAN_MAX_BYTES} bytes); it is not read")
        return path.read_bytes()
    except OSError as error:
        raise PlanError(f"{path} cannot be read ({error.strerror or error})") from None


def load(path: Path) -> Plan:
    try:
        data = yaml.safe_load(read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise PlanError(f"{path} is not a YAML plan ({str(error).splitlines()[0]})") from None
    try:
        return Plan.model_validate(data)
    except ValidationError as error:
        raise PlanError(f"{path}: {first_problem(error)}") from None


def dump(plan: Plan, header: str) -> str:
    """The plan as YAML, below ``header`` (comment lines saying what it is and how to confirm it)."""
    body = yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body
