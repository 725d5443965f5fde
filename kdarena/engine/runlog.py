"""The run directory: creation without silent overwrites, metrics.jsonl, summary.json, TensorBoard."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says why and what to do."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: leave the old file, and no temporary one
        tmp.unlink(missing_ok=True)
        raise


def prepare(run_dir: Path, resume: bool, force: bool) -> None:
    """Create ``run_dir``; refuse to reuse one that holds a run unless resuming or forced.

    ``force`` never deletes: the old directory is renamed to ``<name>.old-<timestamp>``.
    """
    occupied = run_dir.exists() and any(run_dir.iterdir())
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise RunDirError(f"cannot resume: {run_dir} holds no run (no config.yaml); start a new run without --resume")
        return
    if occupied:
        if not force:
            raise RunDirError(
                f"run directory {run_dir} already holds a run; continue it with --resume {run_dir}, "
                f"choose another with --out, or pass --force to move it aside"
            )
        backup = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(run_dir), str(backup))
    run_dir.mkdir(parents=True, exist_ok=True)


class MetricsLog:
    """Appends one JSON line per epoch; on resume, drops lines of epochs that will be re-run."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_epoch: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_epoch is not None and self.path.exists():
            # a line cut short by a kill mid-append parses as None and is dropped with the re-run epochs
            kept = [line for line in self.path.read_text().splitlines()
                    if (_parse(line) or {}).get("epoch", resume_epoch) < resume_epoch]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
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
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [record for record in map(_parse, path.read_text().splitlines()) if record is not None]


def _parse(line: str) -> dict[str, Any] | None:
    """One metrics record, or None for a blank or truncated line."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
