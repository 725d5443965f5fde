"""Typed run configuration: YAML files validated by pydantic, with ``key=value`` overrides.

Every error is a :class:`ConfigError` with a one-line message that names the key, the
bad value and the fix (the CLI prints it and exits with status 2).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A bad configuration value; the message is one line meant for the user."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    name: Literal["fashion_mnist", "cifar10", "cifar100", "digits", "imagefolder"] = "fashion_mnist"
    root: Optional[str] = Field(None, description="data folder (default: search $KDARENA_DATA, ~/.cache/kdarena, system paths)")
    download: bool = False
    val_size: Union[int, float] = Field(5000, ge=0, description="held-out validation samples (count, or fraction < 1)")
    val_seed: int = 0
    batch_size: int = Field(128, ge=1, description="per-process batch size")
    eval_batch_size: int = Field(512, ge=1)
    crop_padding: Optional[int] = Field(None, ge=0, description="random-crop padding (default: 4 for CIFAR, 0 otherwise)")
    flip: Optional[bool] = Field(None, description="random horizontal flip (default: on for CIFAR and image folders)")
    image_size: int = Field(224, ge=8, description="image folders: resize/crop size")
    num_workers: int = Field(4, ge=0, description="image folders: DataLoader workers")
    train_subset: Optional[int] = Field(None, ge=1, description="use only this many training samples (quick tests)")
    skip_bad_images: bool = False


class MethodConfig(_Section):
    name: Literal["independent", "dml", "cd", "kd"] = "cd"
    alpha: float = Field(1.0, ge=0, description="weight of the KL term")
    beta: float = Field(0.0, ge=0, description="weight of the feature loss (paper: 1.0)")
    temperature: float = Field(1.0, gt=0)
    rule: Literal["best", "better"] = "best"
    selection: Literal["own-batch", "clean", "smoothed"] = "own-batch"
    smoothing: float = Field(0.9, ge=0, lt=1)
    feature_reduction: Literal["batchmean", "sum", "mean"] = "batchmean"
    feature_layers: Optional[list[Optional[str]]] = None
    teacher_model: Optional[str] = Field(None, description="kd: the frozen teacher's model name")
    teacher_checkpoint: Optional[str] = Field(None, description="kd: a kdarena checkpoint or a state_dict file")
    teacher_index: int = Field(0, ge=0, description="kd: which network of a kdarena checkpoint teaches")


class ParameterMutationConfig(_Section):
    enabled: bool = False
    scale: float = Field(0.01, gt=0, description="noise std relative to each tensor's RMS value")
    every: int = Field(10, ge=1)
    rollback_after: int = Field(0, ge=0, description="undo a mutation that has not won within this many steps (0: never)")


class PerturbConfig(_Section):
    enabled: bool = True
    ops: Union[Literal["paper", "code", "all"], list[str]] = "paper"
    every: int = Field(1, ge=1, description="perturb every k-th step (paper: 1, authors' code: 10)")
    probability: Optional[float] = Field(None, ge=0, le=1, description="perturb with this probability instead of every k-th step")
    mix_alpha: float = Field(1.0, gt=0, description="Beta(a, a) for the mixing coefficient")
    parameters: ParameterMutationConfig = ParameterMutationConfig()


class OptimConfig(_Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = Field(200, ge=1)
    schedule: Literal["cosine", "step", "multistep", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75], description="multistep: epochs, or fractions of the run if all < 1")
    step_size: int = Field(30, ge=1, description="step: epochs between decays")
    gamma: float = Field(0.1, gt=0, le=1)
    grad_clip: Optional[float] = Field(None, gt=0, description="clip each network's gradient norm")


class TrainConfig(_Section):
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False
    threads: Optional[int] = Field(None, ge=1, description="CPU threads (default: torch's choice)")
    eval_every: int = Field(1, ge=1)
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    checkpoint_every_steps: int = Field(0, ge=0, description="also checkpoint every N steps (0: off)")
    stop_after_steps: Optional[int] = Field(None, ge=1, description="checkpoint and stop at this global step (testing resume)")
    nonfinite: Literal["skip", "rebirth", "stop"] = "skip"
    sync_batchnorm: bool = False
    progress: bool = True
    tensorboard: bool = True


class Config(_Section):
    name: str = "run"
    seed: int = 0
    output: str = "runs"
    models: list[str] = Field(default_factory=lambda: ["resnet20", "resnet20"], min_length=1)
    data: DataConfig = DataConfig()
    method: MethodConfig = MethodConfig()
    perturb: PerturbConfig = PerturbConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        n = len(self.models)
        if self.method.name in ("dml", "cd") and n < 2:
            raise ValueError(f"method {self.method.name} needs at least 2 networks in models, got {n}")
        if self.method.name == "kd" and not self.method.teacher_model:
            raise ValueError("method kd needs method.teacher_model (and usually method.teacher_checkpoint)")
        if self.method.feature_layers is not None and len(self.method.feature_layers) != n:
            raise ValueError(f"method.feature_layers has {len(self.method.feature_layers)} entries for {n} models")
        if isinstance(self.data.val_size, float) and not 0 < self.data.val_size < 1:
            raise ValueError("data.val_size as a fraction must be in (0, 1); use an integer for a count")
        return self


def _valid_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _section_at(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            break
    return model


def _format_error(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = tuple(str(p) for p in first["loc"])
    key = ".".join(loc) or "config"
    if first["type"] == "extra_forbidden":
        section = _section_at(loc[:-1])
        where = ".".join(loc[:-1]) or "the top level"
        return f"unknown key '{key}'; valid keys in {where}: {', '.join(_valid_keys(section))}"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    more = f" (and {len(error.errors()) - 1} more problem(s))" if len(error.errors()) > 1 else ""
    return f"bad value for '{key}'{shown}: {message}{more}"


def validate(raw: dict[str, Any]) -> Config:
    """Validate a plain dict into a :class:`Config`, raising :class:`ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_error(error)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.lr=0.05`` -> (['optim', 'lr'], 0.05). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. optim.lr=0.05)")
    key, value = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in path):
        raise ConfigError(f"override {text!r} has an empty key (e.g. optim.lr=0.05)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return path, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; see configs/ for examples")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return raw


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from defaults), apply overrides and validate."""
    raw = read_yaml(path) if path is not None else {}
    return validate(apply_overrides(raw, overrides or []))


def to_dict(config: Config) -> dict[str, Any]:
    return config.model_dump(mode="json")


def dump(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
