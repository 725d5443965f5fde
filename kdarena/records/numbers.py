"""The kinds of number a run's records hold, each with the range a real run stays in.

Strict: ``"71.3"`` or ``true`` is not a number; NaN and infinity are refused, so no value out of its
range can reach a table, a plot or a model card from a damaged or hostile file.
"""
from __future__ import annotations

import math
from typing import Annotated

from pydantic import Field, ValidationError

_NUMBER = dict(strict=True, allow_inf_nan=False)
Percent = Annotated[float, Field(ge=0.0, le=100.0, **_NUMBER)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0, **_NUMBER)]
# a bound beyond any real run (a century of seconds, an exabyte per second) keeps sums and means finite
Amount = Annotated[float, Field(ge=0.0, le=1e18, **_NUMBER)]
Finite = Annotated[float, Field(ge=-1e18, le=1e18, **_NUMBER)]
Count = Annotated[int, Field(ge=0, le=2**53, strict=True)]


def first_problem(error: ValidationError, field: str = "") -> str:
    """The first fault of ``error`` as ``loc is VALUE: what is wrong``; ``field`` names a single value's key."""
    problem = error.errors()[0]
    value, message = problem.get("input"), problem["msg"]
    loc = ".".join([field] * bool(field) + [str(part) for part in problem["loc"]])
    if problem["type"] == "value_error":  # a check across fields (a model validator)
        return (f"{loc}: " if loc else "") + message.removeprefix("Value error, ")
    if not loc:
        return f"the top level must be an object of named fields, not {type(value).__name__}"
    if isinstance(value, float) and not math.isfinite(value):
        shown = "a number too large for a float" if math.isinf(value) else "NaN"  # JSON's 1e400 reads as inf
    else:
        shown = type(value).__name__ if isinstance(value, (dict, list)) else repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"{loc} is {shown}: {message[0].lower() + message[1:]}"
