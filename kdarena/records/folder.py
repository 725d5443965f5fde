"""The run folder as its writer sees it: its files' names, creation without silent overwrites, one run
at a time (the lock), the epoch log and TensorBoard, atomic writes.

A run folder holds ``config.yaml`` (the config, written first), ``metrics.jsonl`` (one
:class:`~kdarena.records.epoch.EpochRecord` per line), ``summary.json`` (the
:class:`~kdarena.records.summary.Summary`, written last: a run is finished when it exists),
``inputs.json`` (:class:`~kdarena.records.inputs.RunInputs`, what its networks take in, for export and
predict), ``checkpoints/`` (``last.pt``, ``best.pt``), ``.lock`` and, if asked, ``tensorboard/``.
An experiment folder holds one run folder per method and seed and ``sweep.json``
(:class:`~kdarena.records.sweep_index.SweepIndex`). Readers of folders someone hands over go through
:mod:`kdarena.records.read`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import IO, Any

from .. import safe_files
from ..errors import UserError
from .epoch import EpochRecord

try:
    import fcntl
except ImportError:  # not POSIX: no run-directory lock
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
SWEEP_INDEX_FILE = "sweep.json"
INPUTS_FILE = "inputs.json"
CHECKPOINTS = "checkpoints"
#: the largest metrics.jsonl read (an epoch's record is about a kilobyte)
METRICS_MAX_BYTES = 512 * 2**20


def config_path(run_dir: Path) -> Path:
    return Path(run_dir) / CONFIG_FILE


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def summary_path(run_dir: Path) -> Path:
    return Path(run_dir) / SUMMARY_FILE


def checkpoint_path(run_dir: Path, name: str = "last") -> Path:
    """``checkpoints/last.pt`` (the latest), ``best.pt`` (the best selection-split epoch), ``last.prev.pt``..."""
    return Path(run_dir) / CHECKPOINTS / f"{name}.pt"


def inputs_path(run_dir: Path) -> Path:
    return Path(run_dir) / INPUTS_FILE


def sweep_index_path(exp_dir: Path) -> Path:
    return Path(exp_dir) / SWEEP_INDEX_FILE


def is_finished(run_dir: Path) -> bool:
    """A run is finished once its summary is written (its last act)."""
    return summary_path(run_dir).is_file()


class RunDirError(UserError, RuntimeError):
    """The run directory cannot be used as asked; the message says why and what to do."""


def write_failed(path: Path, error: OSError) -> RunDirError:
    """A run file that cannot be written (a full disk, no permission) as the user's one-line error."""
    return RunDirError(f"cannot write {path}: {error.strerror or error}; free disk space or fix the permissions "
                       f"(the files written before are kept), then resume")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:  # e.g. a full disk: leave the old file, and no temporary one
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise write_failed(path, error) from error
        raise


def lock(run_dir: Path) -> IO[str] | None:
    """Hold RUN_DIR/.lock exclusively (it records our PID) until the returned file is closed.

    ``flock`` belongs to the open file: the kernel drops it when the holder exits or is killed, so
    a lock left by a dead process is simply taken over. Two Trainers in one process conflict too.
    """
    if fcntl is None:
        return None
    handle = open(run_dir / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirError(f"run directory {run_dir} is in use by another kdarena run (PID {holder}); wait for it to end, "
                          f"or choose another directory with --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def prepare(run_dir: Path, resume: bool, force: bool) -> IO[str] | None:
    """Create ``run_dir`` and lock it (see :func:`lock`; close the result to unlock); refuse to
    reuse one that holds a run unless resuming or forced, and one that another run is using.

    ``force`` never deletes: the old directory is renamed to ``<name>.old-<timestamp>[-k]``.
    """
    try:
        return _prepare(run_dir, resume, force)
    except OSError as error:  # e.g. no permission to create it, a file in its place
        raise RunDirError(f"cannot use run directory {run_dir}: {error.strerror or error}; choose another with --out") from error


def _prepare(run_dir: Path, resume: bool, force: bool) -> IO[str] | None:
    if resume:
        if not config_path(run_dir).is_file():
            raise RunDirError(f"cannot resume: {run_dir} holds no run (no {CONFIG_FILE}); start a new run without --resume")
        return lock(run_dir)
    old = lock(run_dir) if run_dir.is_dir() else None  # held while the old run is moved aside: no one is using it
    if not (run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir())):
        run_dir.mkdir(parents=True, exist_ok=True)
        return old if old is not None else lock(run_dir)
    try:
        if not force:
            raise RunDirError(
                f"run directory {run_dir} already holds a run; continue it with --resume {run_dir}, "
                f"choose another with --out, or pass --force to move it aside"
            )
        shutil.move(str(run_dir), str(_backup_path(run_dir)))
    finally:
        if old is not None:
            old.close()  # its lock file went with the old run
    run_dir.mkdir(parents=True, exist_ok=True)
    return lock(run_dir)


def _backup_path(run_dir: Path) -> Path:
    """``<name>.old-<timestamp>``, with ``-1``, ``-2``... when a backup of that second exists (no nesting)."""
    base = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    backup, k = base, 0
    while backup.exists():
        k += 1
        backup = base.with_name(f"{base.name}-{k}")
    return backup


class MetricsLog:
    """Appends one :class:`EpochRecord` per epoch as a JSON line; on resume, drops lines of epochs that will be re-run."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_epoch: int | None = None):
        self.path = metrics_path(run_dir)
        if resume_epoch is not None and self.path.exists():
            # a line cut short by a kill mid-append parses as None and is dropped with the re-run epochs
            lines = read_run_file(self.path, METRICS_MAX_BYTES).splitlines()
            epochs = [_epoch_of(self.path, n, line, resume_epoch) for n, line in enumerate(lines, 1)]
            kept = [line for line, epoch in zip(lines, epochs) if epoch < resume_epoch]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        """One epoch's record, checked by :class:`EpochRecord` as every reader checks it (a value out of its
        range is a bug of ours: it raises here, not in the report of a finished study)."""
        line = json.dumps(EpochRecord.model_validate(record).model_dump()) + "\n"
        try:
            with open(self.path, "a") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            raise write_failed(self.path, error) from error
        if self.writer is not None:
            step = record["epoch"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The epoch records of a run this process writes (resume, the summary); a folder someone hands over
    is read with :func:`kdarena.records.read.read_records`, which checks them."""
    path = metrics_path(run_dir)
    if not path.exists():
        return []
    return [record for record in map(_parse, read_run_file(path, METRICS_MAX_BYTES).splitlines()) if record is not None]


def read_run_file(path: Path, limit: int) -> str:
    """A file of a run folder this process resumes or summarises, through :mod:`kdarena.safe_files`: a FIFO
    named metrics.jsonl hung ``train --resume``, ``export`` and a resuming sweep; a link to /dev/zero read
    until MemoryError."""
    try:
        return safe_files.read_text(path, limit)
    except safe_files.SafeFileError as error:
        raise RunDirError(f"{error}; replace or delete that file of the run folder") from None


def _parse(line: str) -> dict[str, Any] | None:
    """One metrics record, or None for a blank or truncated line."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _epoch_of(path: Path, number: int, line: str, default: int) -> int:
    """The epoch of a metrics line (``default`` for a truncated one); an edited, wrong-typed one is an error."""
    epoch = (_parse(line) or {}).get("epoch", default)
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise RunDirError(f"{path} line {number}: 'epoch' is {epoch!r}, not an integer; fix or delete that line, then resume again")
    return epoch


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
