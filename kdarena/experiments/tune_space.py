"""The search space of ``kdarena tune``: ``--space KEY=DIST`` items as Optuna distributions.

``DIST`` is one of ``choice(v1,v2,...)`` (values read as YAML scalars: ``choice(1,4)``,
``choice(sgd,adamw)``, ``choice(true,false)``), ``uniform(a,b)``, ``loguniform(a,b)`` (a > 0) or
``int(a,b)`` (both ends included). ``KEY`` is a ``method.*`` or ``optim.*`` key of the config; a key
not in the space keeps the value the method (or the config) gives it. ``optim.epochs`` is the budget
(``--epochs``), the same for every trial, so it cannot be tuned.
"""
from __future__ import annotations

import json
import re
from typing import Any, Sequence

import yaml

from ..errors import UserError

_DIST = re.compile(r"^(choice|uniform|loguniform|int)\((.*)\)$", re.S)
_TUNABLE = ("method.", "optim.")
_EXAMPLE = "e.g. --space method.temperature=choice(1,4) --space optim.lr=loguniform(0.01,0.2)"


class SpaceError(UserError):
    """A ``--space`` item cannot be read; the message names it and shows the form."""


def parse_space(items: Sequence[str]) -> dict[str, Any]:
    """``{key: optuna distribution}`` in the order given; an empty space is an error (nothing to tune)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not items:
        raise SpaceError(f"nothing to tune: give at least one --space KEY=DIST ({_EXAMPLE})")
    space: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key or not text:
            raise SpaceError(f"--space {item!r} is not KEY=DIST ({_EXAMPLE})")
        if not key.startswith(_TUNABLE) or key.count(".") != 1:
            raise SpaceError(f"--space {item!r}: tune a method.* or optim.* key ({_EXAMPLE})")
        if key == "optim.epochs":
            raise SpaceError("--space optim.epochs: the epochs are the budget, the same for every trial; set them with --epochs")
        if key in space:
            raise SpaceError(f"--space gives {key} twice")
        match = _DIST.match(text)
        if not match:
            raise SpaceError(f"--space {item!r}: the distribution must be choice(...), uniform(a,b), loguniform(a,b) or int(a,b)")
        kind, args = match.group(1), [a.strip() for a in match.group(2).split(",") if a.strip()]
        if kind == "choice":
            values = [_scalar(item, a) for a in args]
            if not values or len(set(map(json.dumps, values))) != len(values):
                raise SpaceError(f"--space {item!r}: choice needs one or more different values")
            space[key] = CategoricalDistribution(values)
            continue
        if len(args) != 2:
            raise SpaceError(f"--space {item!r}: {kind} takes two numbers, the low and the high end")
        low, high = (_number(item, a, integer=kind == "int") for a in args)
        if not low < high:
            raise SpaceError(f"--space {item!r}: the low end must be below the high end")
        if kind == "loguniform" and low <= 0:
            raise SpaceError(f"--space {item!r}: loguniform needs a low end above 0")
        space[key] = (IntDistribution(int(low), int(high)) if kind == "int"
                      else FloatDistribution(float(low), float(high), log=kind == "loguniform"))
    return space


def _scalar(item: str, text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if value is not None and not isinstance(value, (bool, int, float, str)):
        raise SpaceError(f"--space {item!r}: a choice is a number, a word or true/false, not {text!r}")
    return value


def _number(item: str, text: str, integer: bool) -> float:
    value = _scalar(item, text)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise SpaceError(f"--space {item!r}: {text!r} is not {'an integer' if integer else 'a number'}")
    return value


def overrides(params: dict[str, Any]) -> list[str]:
    """A trial's parameters as config overrides (``method.temperature=4``), values written as JSON (which YAML reads back)."""
    return [f"{key}={json.dumps(value)}" for key, value in params.items()]


def corners(distribution: Any) -> list[Any]:
    """The values that show a key and its range are valid for a method before anything trains: every choice,
    or both ends of a range."""
    choices = getattr(distribution, "choices", None)
    return list(choices) if choices is not None else [distribution.low, distribution.high]


def describe(space: dict[str, Any]) -> dict[str, str]:
    """The space as written on the command line, ``{key: 'choice(1, 4)'}`` (stored with the study, shown in tables)."""
    out = {}
    for key, dist in space.items():
        choices = getattr(dist, "choices", None)
        if choices is not None:
            out[key] = "choice(" + ", ".join(json.dumps(c) for c in choices) + ")"
        else:
            kind = "int" if type(dist).__name__ == "IntDistribution" else ("loguniform" if dist.log else "uniform")
            out[key] = f"{kind}({dist.low}, {dist.high})"
    return out


def params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{key}={json.dumps(value) if not isinstance(value, float) else f'{value:.4g}'}"
                     for key, value in params.items()) or "defaults"
