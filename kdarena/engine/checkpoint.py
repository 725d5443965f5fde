"""Checkpoints written atomically and checked on load.

A write goes to a temporary file in the same folder, is fsynced, and replaces the target
with ``os.replace``; the file it replaces is kept as ``<name>.prev.pt``. A crash or a full
disk at any point leaves the previous checkpoint loadable.

Loading never runs code: ``torch.load(weights_only=True)`` accepts tensors and plain containers
only (checkpoints are shared: teacher checkpoints, ``kdarena eval``). Everything kdarena saves is
of that kind; the numpy RNG state is stored as a plain list (older checkpoints held a numpy array,
whose three numpy globals are allow-listed so they still load).
"""
from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, apply_overrides, parse_override, validate
from ..data.registry import IMAGE_SETS
from ..data.sources import ARCHIVE_SUFFIXES
from ..errors import UserError

FORMAT = 1
#: what a checkpoint must hold to be resumed (``Trainer.state_dict``) or evaluated
RESUME_KEYS = ("config", "group", "optimizer", "scheduler", "scaler", "method", "epoch", "batch_in_epoch",
               "global_step", "stats", "best_val", "best_val_any", "history_seconds", "rng")
EVAL_KEYS = ("config", "group", "epoch")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why."""


class UnsafeCheckpointError(CheckpointError):
    """A file that would run code (or build objects kdarena never writes) when unpickled: never loaded."""


def _numpy_globals() -> list:
    """The numpy globals of an RNG-state array in checkpoints written before the state became a list."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _check_archive(path: Path) -> None:
    """Refuse a checkpoint whose bytes changed after it was written, or a TorchScript program, before torch reads it.

    torch's reader does not check the zip's CRC-32s: 16 flipped bytes inside a tensor of ``best.pt``
    went unnoticed (eval scored a loss of 2e24, export wrote weights of 1e24). :meth:`zipfile.ZipFile.testzip`
    reads every member once and checks each CRC (about a second per GB).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
                raise CheckpointError(f"{str(path)!r} is a TorchScript program (such as kdarena export --format torchscript "
                                      "writes), not a checkpoint, and kdarena does not run programs; give a checkpoint "
                                      "such as RUN_DIR/checkpoints/best.pt")
            damaged = archive.testzip()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, RuntimeError):
        return  # not a readable zip (truncated, or torch's legacy format): torch.load reports it below
    if damaged is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: its record {damaged} fails its CRC-32 check (the bytes "
                              "changed after kdarena wrote them); use another copy, or RUN_DIR/checkpoints/last.prev.pt")


def _safe_load(path: Path, map_location: Any) -> Any:
    """``torch.load`` that refuses code; raises :class:`CheckpointError` for unreadable files."""
    _check_archive(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(error))  # also "... whose module is blocked"
        if found:
            raise UnsafeCheckpointError(
                f"checkpoint {str(path)!r} holds code or objects kdarena does not write ({found.group(1)}) and was not loaded; "
                f"use checkpoints written by kdarena, or a plain state_dict of tensors") from None
        detail = _detail(error)
    except Exception as error:  # truncated zip, wrong format
        detail = _detail(error)
    raise CheckpointError(f"checkpoint {str(path)!r} is unreadable (truncated or corrupt?): {detail}")


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """Any ``.pt`` file (a checkpoint, a plain state_dict) read without running code; :class:`CheckpointError` if refused."""
    return _safe_load(Path(path), map_location)


def _detail(error: BaseException) -> str:
    # torch's own advice (retry with weights_only=False) would run the file's code: never passed on
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and "weights_only" not in line]
    useful = [line for line in lines if "WeightsUnpickler error" in line] or lines[:1] or [""]
    return f"{type(error).__name__}: {useful[0]}"


def previous_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def save_atomic(state: dict[str, Any], path: str | Path, keep_previous: bool = True) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot create the checkpoint folder {path.parent}: {error.strerror or error}") from error
    _remove_stale_temporaries(path)
    # the PID in the name tells whose file it is (see _remove_stale_temporaries)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            handle = _Writer(raw)
            try:
                torch.save(state, handle)
                raw.flush()
            except Exception:
                # A full disk inside torch's zip writer surfaces as RuntimeError("unexpected pos"):
                # report the OSError that caused it instead.
                if handle.error is not None:
                    raise handle.error from None
                raise
            os.fsync(raw.fileno())
        if keep_previous and path.exists():
            _keep_previous(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):  # a full disk, no permission: the user's to fix, the previous file is intact
            raise CheckpointError(f"cannot write checkpoint {path}: {error.strerror or error}; the previous checkpoint is "
                                  "kept: free disk space (or fix the permissions), then resume") from error
        raise


class _Writer:
    """The file object torch writes to; remembers the first OSError (e.g. ENOSPC) a write raised."""

    def __init__(self, raw):
        self.raw, self.error = raw, None

    def write(self, data) -> int:
        try:
            return self.raw.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        try:
            self.raw.flush()
        except OSError as error:
            self.error = self.error or error
            raise

    def __getattr__(self, name: str):
        return getattr(self.raw, name)


def _remove_stale_temporaries(path: Path) -> None:
    """Remove ``<name>.<pid>.*.tmp`` files left by dead processes (killed mid-write) or by this one.

    Another live process's temporary file is its write in progress and stays. A name without a
    PID comes from a kdarena that did not write one: stale by now.
    """
    for stale in path.parent.glob(path.name + ".*.tmp"):
        owner = stale.name[len(path.name) + 1:].split(".", 1)[0]
        if owner.isdigit() and int(owner) != os.getpid() and _alive(int(owner)):
            continue
        stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except OverflowError:  # not a PID at all
        return False
    return True


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


def load(path: str | Path, map_location: str | torch.device = "cpu", required: tuple[str, ...] = RESUME_KEYS) -> dict[str, Any]:
    """Load and sanity-check a kdarena checkpoint holding ``required``, raising :class:`CheckpointError`."""
    path = Path(path)
    if path.is_dir():
        found = [path / d / n for d in ("checkpoints", ".") for n in ("last.pt", "best.pt") if (path / d / n).is_file()]
        hint = f"give a checkpoint file such as {str(found[0])!r}" if found else "give a file such as RUN_DIR/checkpoints/last.pt"
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder, not a checkpoint file; {hint}")
    if path.exists() and not path.is_file():  # /dev/null, a FIFO: never opened (a FIFO would block)
        raise CheckpointError(f"checkpoint {str(path)!r} is not a regular file (a device, FIFO or socket); "
                              "give a file such as RUN_DIR/checkpoints/last.pt")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    state = _safe_load(path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT or "group" not in state:
        raise CheckpointError(f"{str(path)!r} is not a kdarena checkpoint (format {FORMAT})")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {', '.join(missing)}: it is incomplete (edited, or written by "
                              f"another tool); use a checkpoint written by kdarena")
    if not isinstance(state["group"], dict) or not isinstance(state.get("config", {}), dict):
        raise CheckpointError(f"checkpoint {str(path)!r} has no weights or config of the expected kind; use a checkpoint written by kdarena")
    return state


def stored_config(state: dict[str, Any], overrides: list[str], path: str | Path, check_root: bool = True) -> Config:
    """The run's config from a checkpoint, read as untrusted input (``kdarena eval``, ``export``, ``predict RUN``).

    A checkpoint is a file a user may be handed, and its config says where data is read and whether it is
    fetched: ``data.download: true`` once created a folder of the file's choosing and started a download,
    ``data.root: /`` walked the whole file system. So a download happens only when the user passes
    ``data.download=true``, and an image set's root the user did not pass must hold a ``train/`` folder
    (or be an archive) before anything under it is walked. ``check_root`` False: the caller checks the root
    with :func:`check_stored_root` before it builds the data, if it does (an export needs no data).
    """
    config = validate(apply_overrides(state["config"], list(overrides)))
    if "data.download" not in _override_keys(overrides):
        config.data.download = False
    if check_root:
        check_stored_root(config, overrides, path)
    return config


def check_stored_root(config: Config, overrides: list[str], path: str | Path) -> None:
    """An image set's ``data.root`` from a checkpoint (not passed by the user) must look like one; see :func:`stored_config`."""
    root = config.data.root
    if "data.root" not in _override_keys(overrides) and root and config.data.name in IMAGE_SETS:
        place = Path(root).expanduser()
        if not ((place / "train").is_dir() or (place.is_file() and place.name.lower().endswith(ARCHIVE_SUFFIXES))):
            raise CheckpointError(f"checkpoint {str(path)!r} names data.root={root}, which holds no train/ folder of "
                                  f"{config.data.name} images; pass data.root=FOLDER (the data set the run was trained on)")


def _override_keys(overrides: list[str]) -> set[str]:
    """The dotted keys ``overrides`` set, a section override's keys included (``data={root: x}`` sets data.root)."""
    keys: set[str] = set()
    for text in overrides:
        path, value = parse_override(text)
        keys.add(".".join(path))
        if isinstance(value, dict):
            keys.update(".".join(path + [str(k)]) for k in value)
    return keys


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's state as plain values (a list, not an array): loadable with weights_only=True
    state = {"torch": torch.get_rng_state(), "numpy": (name, keys.tolist(), pos, has_gauss, cached), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_network_state(path: Path, index: int, key: str = "method.teacher_checkpoint") -> dict[str, torch.Tensor]:
    """One network's weights from a kdarena checkpoint (network ``index``) or a plain state_dict file."""
    if path.exists() and not path.is_file():  # a FIFO was reported as "does not exist"
        raise CheckpointError(f"{key}={str(path)!r} is not a regular file (a folder, device, FIFO or socket); give the path "
                              "of a kdarena checkpoint or a state_dict file")
    if not path.is_file():
        raise CheckpointError(f"{key}={str(path)!r} does not exist; give the path of a kdarena checkpoint or a state_dict file")
    state = _safe_load(path, "cpu")
    if isinstance(state, dict) and isinstance(state.get("group"), dict):
        prefix = f"networks.{index}."
        state = {k[len(prefix):]: v for k, v in state["group"].items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(f"method.teacher_index={index} is not a network of {path}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{key}={str(path)!r} is neither a kdarena checkpoint nor a state_dict of tensors")
    return state
