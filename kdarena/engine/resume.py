"""Resuming a run: which checkpoint to trust, and whether it belongs to the run being resumed."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..config import Config, ConfigError, flatten, marked_keys, read_yaml, to_dict
from ..records.folder import checkpoint_path, config_path
from ..version import __version__
from .build import Parts
from .checkpoint import FORMAT, CheckpointError, UnsafeCheckpointError, load, previous_path, rng_state, set_rng_state
from .loop_state import LoopState

log = logging.getLogger("kdarena")


#: reported first when several differ (they say most plainly that it is another run)
FIRST = ("models", "data.name", "method.name")
#: compared as the global batch (batch x processes) by :func:`check_compatible`, not key by key
GLOBAL_BATCH = "data.batch_size"


def _changed(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys (dotted) present in both config dicts whose values differ: {key: (saved, current)}.

    A key only one side has (written by another kdarena version) is not a change.
    """
    a, b = flatten(saved), flatten(current)
    keys = [k for k in FIRST if k in a and k in b] + sorted(k for k in a.keys() & b.keys() if k not in FIRST)
    return {k: (a[k], b[k]) for k in keys if a[k] != b[k]}


def _may_change() -> set[str]:
    """Keys a resume may change: the schema's bookkeeping and resumable ones (see kdarena.config)."""
    return marked_keys("bookkeeping") | marked_keys("resumable") | {GLOBAL_BATCH}


def describe_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Name the first setting that differs between two config dicts and may not change on resume."""
    allowed = _may_change()
    for key, (old, new) in _changed(saved, current).items():
        if key not in allowed:
            return f"{key} is {old!r} in the checkpoint but {new!r} now"
    return None


def check_overrides(run_dir: Path, current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The changes a resume makes to the run's recorded config.yaml; refuse one that changes the run's meaning."""
    try:
        saved = read_yaml(config_path(run_dir))  # bounded, regular files only (kdarena.config_sources)
    except ConfigError:
        return {}  # unreadable: the caller's own checks report it
    if not isinstance(saved, dict):
        return {}
    changes = _changed(saved, current)
    allowed = _may_change()
    for key, (old, new) in changes.items():
        if key not in allowed:
            raise ConfigError(f"cannot resume {run_dir} with {key} changed: it is {old!r} in the run but {new!r} now, which "
                              f"changes what the run is; resume without that override, or start a new run with --out")
    return changes


def record_resume(run_dir: Path, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append this resume to the run's history, RUN_DIR/resumes.jsonl (time, step, changed keys [old, new])."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step, "changed": {k: list(v) for k, v in changes.items()}}
    with open(run_dir / "resumes.jsonl", "a") as handle:
        handle.write(json.dumps(entry) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def apply_lr(optimizer: torch.optim.Optimizer, scheduler: Any, lr: float) -> None:
    """After loading their states, make ``lr`` (optim.lr, which may change on resume) the base LR.

    The loaded states carry the old base LR (param groups' ``initial_lr``, the scheduler's
    ``base_lrs``) and the current LR of the old schedule; set both from ``lr`` and the schedule now
    configured (optim.epochs may have changed too), as LambdaLR computes it at this step.
    """
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


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
        # a file that holds code was planted, not cut short by a crash: stop rather than fall back
        if not previous.is_file() or isinstance(error, UnsafeCheckpointError):
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


def capture(config: Config, parts: Parts, loop: LoopState, world_size: int) -> dict[str, Any]:
    """A run's whole state as a checkpoint dict (plain containers and tensors: loads with weights_only)."""
    return {
        "format": FORMAT,
        "version": __version__,
        "config": to_dict(config),
        "group": parts.group.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "method": parts.method.state_dict(),
        "perturb": parts.perturber.state_dict() if parts.perturber else None,
        "mutation": parts.mutations.state_dict() if parts.mutations else None,
        **loop.state_dict(),
        "rng": rng_state(),
        "world_size": world_size,
    }


def restore(run_dir: Path, config: Config, parts: Parts, loop: LoopState, device: torch.device, is_main: bool,
            world_size: int) -> None:
    """Load the run's last (or previous) checkpoint into ``parts`` and ``loop``; nothing to do before the first one."""
    state, path = load_for_resume(checkpoint_path(run_dir), device, is_main)
    if state is None:
        # Stopped (e.g. killed) before its first checkpoint: nothing to restore, start from step 0.
        if is_main:
            log.warning("%s holds no checkpoint yet; starting the run from the beginning", run_dir)
        return
    current = to_dict(config)
    check_compatible(state, path, current, config.data.batch_size, world_size)
    try:
        parts.group.load_state_dict(state["group"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {path} does not fit the configured models: {str(error).splitlines()[0]}") from None
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if state["config"].get("optim") != current["optim"]:  # e.g. optim.lr=0.01 on resume
        apply_lr(parts.optimizer, parts.scheduler, config.optim.lr)
    parts.scaler.load_state_dict(state["scaler"])
    parts.method.load_state_dict(state["method"])
    if parts.perturber is not None and state["perturb"] is not None:
        parts.perturber.load_state_dict(state["perturb"])
    if parts.mutations is not None and state.get("mutation") is not None:
        parts.mutations.load_state_dict(state["mutation"])
    loop.load_state_dict(state)
    set_rng_state(state["rng"])
    if is_main:
        log.info("resumed from %s at epoch %d, batch %d", path, loop.epoch, loop.batch_in_epoch)
