"""Reading run folders someone hands over: the one entry point of ``report``, ``plot``, ``export``,
``predict``, ``sweep`` and the benchmarks' tables.

A run folder is read as untrusted input: it may be damaged (a cut write, a hand edit) or hostile.
Every file is read by :mod:`kdarena.safe_files` (regular files only, never more than its kind's
limit, so a FIFO, a device or a huge file is refused unread) and checked by the same model its
writer uses (:mod:`.epoch`, :mod:`.summary`, :mod:`.card`, :mod:`.sweep_index`). A file that fails
is a :class:`DamagedFile` naming it and its first fault; ``report`` and ``plot`` skip such a run
with one warning line (:func:`skip`), so one bad run never hides the others, and no number outside
its range (a top-1 outside [0, 100], NaN, inf) can reach a table, a plot or a model card.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, TypeAdapter, ValidationError

from .. import safe_files
from .epoch import EpochRecord
from .folder import CHECKPOINTS, METRICS_MAX_BYTES, config_path, inputs_path, metrics_path, summary_path
from .inputs import RunInputs
from .numbers import first_problem
from .summary import StoredConfig, Summary, SummaryConfig

log = logging.getLogger("kdarena")

SEED_SUFFIX = re.compile(r"-seed(\d+)$")
_SKIP_DIRS = {CHECKPOINTS, "tensorboard", "plots"}
#: Far above any real file of its kind: a larger one (or a link to one) is refused unread.
SUMMARY_MAX_BYTES = 16 * 2**20  # (the epoch log's own cap: folder.METRICS_MAX_BYTES)


class DamagedFile(Exception):
    """A run file that cannot be used; the message names the file and what is wrong with it."""


# ----------------------------------------------------------------------------- finding run folders
def walk(root: Path, marker: str) -> Iterator[Path]:
    """Every folder under ``root`` holding a file named ``marker``, sorted; links to folders are not followed."""
    for current, subdirs, files in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs if s not in _SKIP_DIRS and ".old-" not in s)
        if marker in files:
            yield Path(current)


def finished_runs(root: Path) -> Iterator[Path]:
    """Every run folder under ``root`` with a summary (a finished run)."""
    return walk(root, summary_path(Path()).name)


def logged_runs(root: Path) -> Iterator[Path]:
    """Every run folder under ``root`` with epoch records (finished or not)."""
    return walk(root, metrics_path(Path()).name)


def label_and_seed(run_dir: Path, config: dict[str, Any]) -> tuple[str, int]:
    """The method label (the folder's name without ``-seedN``) and the seed (that suffix, else the config's)."""
    match = SEED_SUFFIX.search(run_dir.name)
    if match:
        return SEED_SUFFIX.sub("", run_dir.name), int(match.group(1))
    return run_dir.name, int(config.get("seed") or 0)


def skip(error: DamagedFile) -> None:
    """One warning line; the error's message names the file (hence the run) and the fault."""
    log.warning("kdarena: warning: skipping a damaged run: %s", error)


# ----------------------------------------------------------------------------- reading and checking
def read_text(path: Path, limit: int) -> str:
    """The one place a run file's bytes are read."""
    try:
        return safe_files.read_text(path, limit, encoding="UTF-8")
    except safe_files.SafeFileError as error:
        raise DamagedFile(str(error)) from None


def read_json(path: Path, limit: int = SUMMARY_MAX_BYTES) -> Any:
    text = read_text(path, limit)
    try:
        return json.loads(text)
    except ValueError as error:
        raise DamagedFile(f"{path} is not valid JSON ({error})") from None
    except RecursionError:
        raise DamagedFile(f"{path} is nested too deeply to be a run's JSON") from None


def validate(path: Path, model: type[BaseModel] | TypeAdapter, data: Any, where: str = "") -> Any:
    """``data`` checked by ``model``; a failure is a :class:`DamagedFile` naming ``path`` and the first bad field.

    ``where`` places ``data`` in the file (" record 3").
    """
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_python(data)
        return model.model_validate(data)
    except ValidationError as error:
        raise DamagedFile(f"{path}{where}: {first_problem(error)}") from None


def read_summary(run_dir: Path) -> Summary:
    """The run's summary, once it passes :class:`Summary` (strict: nothing is converted)."""
    path = summary_path(run_dir)
    summary = validate(path, Summary, read_json(path))
    if not summary.networks:
        raise DamagedFile(f"{path} holds no evaluation (no test epoch was run)")
    return summary


def read_inputs(run_dir: Path) -> RunInputs | None:
    """What the run's networks take in (``inputs.json``), checked; None for a run trained before it was written."""
    path = inputs_path(run_dir)
    if not path.exists():
        return None
    return validate(path, RunInputs, read_json(path))


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's config from its summary (a finished run) or ``config.yaml`` (one still running), checked."""
    summary = summary_path(run_dir)
    if summary.exists():
        config = validate(summary, SummaryConfig, read_json(summary)).config
        return config.as_written() if config is not None else {}
    path = config_path(run_dir)
    if not path.exists():
        return {}
    import yaml

    try:
        data = yaml.safe_load(read_text(path, SUMMARY_MAX_BYTES))
    except yaml.YAMLError as error:
        raise DamagedFile(f"{path} is not valid YAML ({str(error).splitlines()[0]})") from None
    data = {} if data is None else data
    validate(path, StoredConfig, data)
    return data


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's epoch records, each checked by :class:`EpochRecord`; a blank or cut last line (a kill
    mid-append) is not a record; none when the run has no epoch log yet."""
    path = metrics_path(run_dir)
    if not os.path.lexists(path):
        return []
    records = []
    for number, line in enumerate(read_text(path, METRICS_MAX_BYTES).splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            record = None  # a line cut short
        except RecursionError:
            raise DamagedFile(f"{path} record {number} is nested too deeply to be an epoch record") from None
        if record is None:
            continue
        if isinstance(record, dict) and "epoch" not in record:
            raise DamagedFile(f"{path} record {number} has no 'epoch'")
        records.append(validate(path, EpochRecord, record, where=f" record {number}").model_dump())
    return records
