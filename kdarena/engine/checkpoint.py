"""Checkpoints written atomically and checked on load.

A write goes to a temporary file in the same folder, is fsynced, and replaces the target
with ``os.replace``; the file it replaces is kept as ``<name>.prev.pt``. A crash or a full
disk at any point leaves the previous checkpoint loadable.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why."""


def previous_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def save_atomic(state: dict[str, Any], path: str | Path, keep_previous: bool = True) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(path.name + ".*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous and path.exists():
            _keep_previous(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _keep_previous(path: Path) -> None:
    """Make ``<name>.prev.pt`` the current ``path`` while ``path`` itself stays in place.

    A hard link keeps ``path`` present at every moment (a kill between two renames would
    otherwise leave only the .prev file); file systems without hard links fall back to a rename.
    """
    previous = previous_path(path)
    link = previous.with_name(previous.name + ".link.tmp")
    try:
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, previous)
        link.unlink(missing_ok=True)  # left if previous was already this file (rename is then a no-op)
    except OSError:
        link.unlink(missing_ok=True)
        os.replace(path, previous)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and sanity-check a kdarena checkpoint, raising :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # truncated zip, wrong format, unpickling failure
        detail = (str(error).splitlines() or [""])[0]
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable (truncated or corrupt?): {type(error).__name__}: {detail}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "group" not in state:
        raise CheckpointError(f"{str(path)!r} is not a kdarena checkpoint (format {FORMAT})")
    return state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_network_state(path: Path, index: int, key: str = "method.teacher_checkpoint") -> dict[str, torch.Tensor]:
    """One network's weights from a kdarena checkpoint (network ``index``) or a plain state_dict file."""
    if not path.is_file():
        raise ValueError(f"{key}={str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "group" in state:
        prefix = f"networks.{index}."
        state = {k[len(prefix):]: v for k, v in state["group"].items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"method.teacher_index={index} is not a network of {path}")
    return state
