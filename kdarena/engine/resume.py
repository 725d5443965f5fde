"""Resuming a run: which checkpoint to trust, and whether it belongs to the run being resumed."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..config import flatten
from .checkpoint import CheckpointError, load, previous_path

log = logging.getLogger("kdarena")


def describe_mismatch(saved: dict[str, Any], current: dict[str, Any], keys=("models", "data.name", "method.name")) -> str | None:
    """Name the first structural setting that differs between two config dicts."""
    a, b = flatten(saved), flatten(current)
    for key in keys:
        if a.get(key, saved.get(key)) != b.get(key, current.get(key)):
            return f"{key} is {a.get(key, saved.get(key))!r} in the checkpoint but {b.get(key, current.get(key))!r} now"
    return None


def load_for_resume(path: Path, device: torch.device, is_main: bool) -> tuple[dict[str, Any] | None, Path]:
    """The state to resume from: ``path``, or its previous checkpoint when ``path`` is unreadable.

    Returns (None, path) when the run holds no checkpoint yet. A corrupt ``path`` is renamed
    ``*.corrupt.pt`` (kept for inspection, but out of the way of the next rotation).
    """
    previous = previous_path(path)
    if not path.exists() and not previous.exists():
        return None, path
    try:
        return load(path, map_location=device), path
    except CheckpointError as error:
        if not previous.is_file():
            raise
        log.warning("%s; resuming from the previous checkpoint %s instead", error, previous)
        state = load(previous, map_location=device)
        if is_main and path.exists():
            path.replace(path.with_name(path.stem + ".corrupt" + path.suffix))
        return state, previous


def check_compatible(state: dict[str, Any], path: Path, config: dict[str, Any], batch_size: int, world_size: int) -> None:
    """Refuse to resume a checkpoint made for another run or another global batch."""
    mismatch = describe_mismatch(state["config"], config)
    if mismatch:
        raise CheckpointError(f"checkpoint {path} was made for another run: {mismatch}; "
                              f"resume without that override, or start a new run with --out")
    saved_world = int(state.get("world_size", 1))
    saved_batch = state["config"].get("data", {}).get("batch_size", batch_size)
    if saved_batch * saved_world != batch_size * world_size:
        raise CheckpointError(
            f"checkpoint {path} was trained with a global batch of {saved_batch} x {saved_world} process(es); "
            f"resume with the same data.batch_size x number of processes (now {batch_size} x {world_size})"
        )
