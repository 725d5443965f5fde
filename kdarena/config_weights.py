"""Start a network from weights: the per-model ``weights`` of a config.

Written in ``models`` next to the plain names (the short form)::

    models:
      - {name: resnet20, weights: runs/a/net.safetensors, reinit_head: true}
      - resnet20

Every reader of a run's config (reports, plots, re-birth, the feature checks) relies on ``models``
being a list of registry names, so the config keeps it that way and holds the weights beside it,
one entry (or null) per model: ``weights: [{path: ..., network: 0, reinit_head: true}, null]``.
That is the form ``config.yaml`` is written in; either form may be written by hand, not both.
The loading itself is :mod:`kdarena.engine.weights`.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config_errors import _KeyValueError


class ModelWeights(BaseModel):
    """Where one network's starting weights come from."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str = Field(min_length=1, description="an exported .safetensors (kdarena export), a kdarena checkpoint "
                      "(RUN/checkpoints/best.pt) or a plain state_dict of tensors (.pt/.pth, .safetensors)")
    network: int = Field(0, ge=0, description="which network of a kdarena checkpoint or of an exported ensemble")
    # strict: a string such as 'yes' or 'no' was read as true (a quoted YAML value is text, not a boolean)
    reinit_head: bool = Field(False, strict=True, description="keep the new model's freshly initialised classifier (fine-tuning on "
                              "another number of classes); every other tensor must fit exactly")


#: the keys of a ``models`` entry written as a mapping (``weights`` is the path)
_ENTRY_KEYS = ("name", "weights", "network", "reinit_head")


def split_model_entries(raw: Any) -> Any:
    """``models: [{name, weights, ...}, name]`` -> ``models: [names]`` plus ``weights: [entry or None]``."""
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list):
        return raw
    entries = raw["models"]
    if not any(isinstance(entry, dict) for entry in entries):
        _check_fits(raw.get("weights"), entries)
        return raw
    if raw.get("weights") is not None:
        raise _KeyValueError("weights", raw["weights"], "give the weights either in 'models' entries or in 'weights', not both")
    names: list[Any] = []
    weights: list[dict[str, Any] | None] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            names.append(entry)
            weights.append(None)
            continue
        unknown = [key for key in entry if key not in _ENTRY_KEYS]
        if unknown or "name" not in entry:
            what = f"unknown key(s) {unknown}" if unknown else "no 'name'"
            raise _KeyValueError(f"models.{i}", entry, f"{what}; an entry is a name or {{name: resnet20, weights: PATH, "
                                 "network: 0, reinit_head: false}")
        names.append(entry["name"])
        spec = {key: entry[key] for key in ("network", "reinit_head") if key in entry}
        weights.append({"path": entry["weights"], **spec} if "weights" in entry else None)
        try:
            if weights[-1] is not None:
                ModelWeights.model_validate(weights[-1])
        except ValidationError as error:
            first = error.errors()[0]
            key = {"path": "weights"}.get(str(first["loc"][0]), str(first["loc"][0])) if first["loc"] else "weights"
            raise _KeyValueError(f"models.{i}.{key}", first.get("input"), first["msg"].removeprefix("Value error, ")) from None
    _check_fits(weights, names)
    return {**raw, "models": names, "weights": weights if any(w is not None for w in weights) else None}


def _check_fits(weights: Any, models: list[Any]) -> None:
    """One entry (or null) per model, and no per-branch weights for a shared trunk."""
    if not isinstance(weights, list):
        return  # None, or a wrong type that pydantic reports
    if len(weights) != len(models):
        raise _KeyValueError("weights", weights, f"has {len(weights)} entries for {len(models)} models; "
                             "give one entry (or null) per model")
    if any(w is not None for w in weights) and any(str(m).startswith("branched:") for m in models):
        raise _KeyValueError("weights", weights, "branched models share one trunk and cannot start from "
                             "per-branch weights; drop 'weights'")
