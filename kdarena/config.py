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


class _KeyValueError(ValueError):
    """A cross-field check that failed on one key (so the message can name the key and its value)."""

    def __init__(self, key: str, value: Any, message: str):
        super().__init__(message)
        self.key, self.value = key, value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
    bn_stats: Literal["freeze", "update"] = Field(
        "freeze",
        description="freeze: a perturbed batch does not move the perturbed network's BatchNorm running statistics "
        "(they describe the data it is tested on); update: it does, like ordinary augmentation. The paper is silent.",
    )
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
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?|xpu(:\d+)?)$", description="auto, cpu, cuda, cuda:N")
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    channels_last: bool = True
    compile: bool = False
    fused: bool = Field(False, description="run identical networks as one vmapped forward (torch.func): fewer, larger GPU kernels; single process, same model for every entry; slower on CPU")
    deterministic: bool = False
    threads: Optional[int] = Field(None, ge=1, description="CPU threads (default: torch's choice)")
    eval_every: int = Field(1, ge=1)
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    checkpoint_every_steps: int = Field(0, ge=0, description="also checkpoint every N steps (0: off)")
    stop_after_steps: Optional[int] = Field(None, ge=1, description="checkpoint and stop at this global step (testing resume)")
    step_log: bool = Field(False, description="write every step's teacher, losses and perturbation to steps.rank<r>.jsonl in the run dir (testing/debugging)")
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
            raise _KeyValueError("models", self.models, f"method {self.method.name} needs at least 2 networks, got {n}; "
                                 "list two or more models or use method.name=independent")
        if self.method.name == "kd" and not self.method.teacher_model:
            raise _KeyValueError("method.teacher_model", None, "method kd needs method.teacher_model (and usually method.teacher_checkpoint)")
        if self.method.feature_layers is not None and len(self.method.feature_layers) != n:
            raise _KeyValueError("method.feature_layers", self.method.feature_layers,
                                 f"{len(self.method.feature_layers)} entries for {n} models; give one per model (null: its default)")
        if isinstance(self.data.val_size, float) and not 0 < self.data.val_size < 1:
            raise _KeyValueError("data.val_size", self.data.val_size, "a fraction must be in (0, 1); use an integer for a count")
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


def _field_loc(loc: tuple) -> tuple:
    """``loc`` without pydantic's union-member tags: ('perturb', 'ops', "literal[...]") -> ('perturb', 'ops')."""
    model: type[BaseModel] = Config
    out: list[str] = []
    for i, part in enumerate(loc):
        field = model.model_fields.get(part)
        if field is None:
            break
        out.append(part)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        rest = loc[i + 1:]
        if rest and all(p.isdigit() for p in rest):  # an item of a list or tuple
            out.extend(rest)
        break
    return tuple(out) if out else loc


def _message(entry: dict) -> str:
    message = entry["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return " ".join(message.split())  # one line


def _format_error(error: ValidationError) -> str:
    errors = error.errors()
    first = errors[0]
    raw_loc = tuple(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        key = ".".join(raw_loc)
        section = _section_at(raw_loc[:-1])
        where = ".".join(raw_loc[:-1]) or "the top level"
        shown_key = key if key.isprintable() else repr(key)[1:-1]
        return f"unknown key '{shown_key}'; valid keys in {where}: {', '.join(_valid_keys(section))}"
    loc = _field_loc(raw_loc)
    key = ".".join(loc) or "config"
    value = first.get("input")
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, _KeyValueError):
        key, value = cause.key, cause.value
    shown = "" if isinstance(value, dict) else f" (got {_short_repr(value)})"
    # a union field (e.g. perturb.ops, data.val_size) fails once per member: report them together
    same = [e for e in errors if _field_loc(tuple(str(p) for p in e["loc"])) == loc]
    messages: list[str] = []
    for entry in same:
        if _message(entry) not in messages:
            messages.append(_message(entry))
    message = "; or ".join(messages)
    if first["type"] == "string_pattern_mismatch" and loc == ("train", "device"):
        message = "must be auto, cpu, cuda, cuda:N, mps or xpu"
    hint = _default_hint(loc) if not isinstance(cause, _KeyValueError) else ""
    others = len(errors) - len(same)
    more = f" (and {others} more problem(s))" if others > 0 else ""
    return f"bad value for '{key}'{shown}: {message}{hint}{more}"


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _default_hint(loc: tuple) -> str:
    """``; default: X`` for a plain field (the fix: set a valid value such as the default)."""
    if not loc:
        return ""
    field = _section_at(loc[:-1]).model_fields.get(loc[-1])
    if field is None or field.default_factory is not None:
        return ""
    default = field.default
    if isinstance(default, bool):
        return f"; e.g. the default {'.'.join(loc)}={str(default).lower()}"
    if isinstance(default, (int, float, str)):
        return f"; e.g. the default {'.'.join(loc)}={default}"
    return ""


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
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; give a YAML file (see configs/ for examples)")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; see configs/ for examples")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {str(path)!r} cannot be read as UTF-8 text: {error}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
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
