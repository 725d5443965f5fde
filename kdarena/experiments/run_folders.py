"""Finding the runs under a folder, and checking what ``report`` and ``plot`` read from them.

A run folder is read as untrusted input: it may be damaged (a cut write, a hand edit) or hostile.
Each file is validated by a schema of the fields read from it; a folder that fails is skipped with
one warning line naming its file and what is wrong, so one bad run never hides the others, and no
number outside its range (a top-1 outside [0, 100], NaN, inf) can reach a table or a plot.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

log = logging.getLogger("kdarena")

SEED_SUFFIX = re.compile(r"-seed(\d+)$")
_SKIP_DIRS = {"checkpoints", "tensorboard", "plots"}
#: Far above any real file of its kind: a larger one (or a link to one) is refused unread.
SUMMARY_MAX_BYTES = 16 * 2**20
METRICS_MAX_BYTES = 512 * 2**20

_NUMBER = dict(strict=True, allow_inf_nan=False)  # strict: "71.3" or true is not a number
Percent = Annotated[float, Field(ge=0.0, le=100.0, **_NUMBER)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0, **_NUMBER)]
# a bound beyond any real run (a century of seconds, an exabyte per second) keeps sums and means finite
Amount = Annotated[float, Field(ge=0.0, le=1e18, **_NUMBER)]
Finite = Annotated[float, Field(ge=-1e18, le=1e18, **_NUMBER)]
Count = Annotated[int, Field(ge=0, le=2**53, strict=True)]


class _Lenient(BaseModel):
    """Checks the fields listed; keeps every other key as written (reports show them, e.g. config differences)."""

    model_config = ConfigDict(extra="allow", strict=True)


class Result(_Lenient):
    """One network's (or the ensemble's) test accuracy as ``summary.json`` stores it."""

    name: Optional[str] = None
    last_test_top1: Optional[Percent] = None
    test_at_best_val_top1: Optional[Percent] = None
    best_test_top1_selected_on_test: Optional[Percent] = None
    teacher_share: Optional[Fraction] = None


class _Method(_Lenient):
    name: Optional[str] = None


class _Perturb(_Lenient):
    ops: Union[list[str], str, None] = None
    parameters: Optional[dict[str, Any]] = None


class StoredConfig(_Lenient):
    """The parts of a stored run config that reports and plots read (seed, networks, method, data, schedule)."""

    seed: Optional[int] = None
    models: Optional[list[str]] = None
    method: Optional[_Method] = None
    perturb: Optional[_Perturb] = None
    data: Optional[dict[str, Any]] = None
    optim: Optional[dict[str, Any]] = None


class Summary(_Lenient):
    """The fields of ``summary.json`` that ``kdarena report`` reads."""

    networks: list[Result]
    ensemble: Optional[Result] = None
    extra: Optional[dict[str, Result]] = None  # networks a method evaluates besides the group
    config: Optional[StoredConfig] = None
    wall_seconds: Amount = 0.0
    images_per_s: Amount = 0.0
    perturbed_steps: Count = 0
    perturbed_won: Count = 0

    @model_validator(mode="after")
    def _won_within_steps(self) -> "Summary":
        if self.perturbed_won > self.perturbed_steps:
            raise ValueError(f"perturbed_won {self.perturbed_won} exceeds perturbed_steps {self.perturbed_steps}")
        return self


class _SummaryConfig(_Lenient):
    """What ``kdarena plot`` reads from ``summary.json``: only the config."""

    config: Optional[StoredConfig] = None


class DamagedFile(Exception):
    """A run file that cannot be used; the message names the file and what is wrong with it."""


# ----------------------------------------------------------------------------- finding run folders
def walk(root: Path, marker: str) -> Iterator[Path]:
    """Every folder under ``root`` holding a file named ``marker``, sorted; links to folders are not followed."""
    for current, subdirs, files in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs if s not in _SKIP_DIRS and ".old-" not in s)
        if marker in files:
            yield Path(current)


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
def read_json(path: Path, limit: int = SUMMARY_MAX_BYTES) -> Any:
    return _parse_json(path, _read_text(path, limit))


def check_file(path: Path, limit: int) -> None:
    """``path`` is a regular file of at most ``limit`` bytes (a FIFO or a device would block or never end)."""
    if not path.is_file():
        raise DamagedFile(f"{path} is not a regular file")
    size = path.stat().st_size
    if size > limit:
        raise DamagedFile(f"{path} holds {size} bytes, more than the {limit} a run writes; it is not read")


def _read_text(path: Path, limit: int) -> str:
    try:
        check_file(path, limit)
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DamagedFile(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise DamagedFile(f"{path} cannot be read ({error.strerror or error})") from None


def _parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        raise DamagedFile(f"{path} is not valid JSON ({error})") from None
    except RecursionError:
        raise DamagedFile(f"{path} is nested too deeply to be a run's JSON") from None


def validate(path: Path, model: type[BaseModel] | TypeAdapter, data: Any, where: str = "", field: str = "") -> Any:
    """``data`` checked by ``model``; a failure is a :class:`DamagedFile` naming ``path`` and the first bad field.

    ``where`` places ``data`` in the file (" record 3"); ``field`` names it when it is a single value.
    """
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_python(data)
        return model.model_validate(data)
    except ValidationError as error:
        raise DamagedFile(f"{path}{where}: {_first_problem(error, field)}") from None


def _first_problem(error: ValidationError, field: str) -> str:
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


def read_summary(run_dir: Path) -> dict[str, Any]:
    """``summary.json`` as written, once it passes :class:`Summary` (strict: nothing is converted)."""
    path = run_dir / "summary.json"
    data = read_json(path)
    if not validate(path, Summary, data).networks:
        raise DamagedFile(f"{path} holds no evaluation (no test epoch was run)")
    return data


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's config from ``summary.json`` (a finished run) or ``config.yaml`` (one still running), checked."""
    summary = run_dir / "summary.json"
    if summary.exists():
        data = read_json(summary)
        validate(summary, _SummaryConfig, data)
        return data.get("config") or {}
    path = run_dir / "config.yaml"
    if not path.exists():
        return {}
    import yaml

    try:
        data = yaml.safe_load(_read_text(path, SUMMARY_MAX_BYTES))
    except yaml.YAMLError as error:
        raise DamagedFile(f"{path} is not valid YAML ({str(error).splitlines()[0]})") from None
    data = {} if data is None else data
    validate(path, StoredConfig, data)
    return data


# What ``kdarena plot`` reads from each metrics.jsonl record, by key; other keys are not read.
_RECORD_RULES: list[tuple[re.Pattern[str], TypeAdapter]] = [
    (re.compile(r"^epoch$"), TypeAdapter(Count)),
    (re.compile(r"/(test|val)_top[15]$"), TypeAdapter(Optional[Percent])),
    (re.compile(r"/teacher_share$"), TypeAdapter(Optional[Fraction])),
    (re.compile(r"^net\d+/(ce|kd|feat)$"), TypeAdapter(Optional[Finite])),
    (re.compile(r"^perturb/.+/(count|won)$"), TypeAdapter(Count)),
]


def check_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Every value ``plot`` reads from the records of ``path`` (metrics.jsonl) is in its range."""
    for number, record in enumerate(records, 1):
        if "epoch" not in record:
            raise DamagedFile(f"{path} record {number} has no 'epoch'")
        for key, value in record.items():
            for pattern, adapter in _RECORD_RULES:
                if pattern.search(key):
                    validate(path, adapter, value, where=f" record {number}", field=key)
                    break
        for key, count in record.items():
            if key.startswith("perturb/") and key.endswith("/count") and record.get(key[: -len("count")] + "won", 0) > count:
                raise DamagedFile(f"{path} record {number}: {key[:-len('/count')]} won more steps than it was applied to")
