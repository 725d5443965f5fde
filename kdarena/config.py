"""Typed run configuration: YAML files validated by pydantic, with ``key=value`` overrides
(reading both into a plain dict is :mod:`kdarena.config_sources`).

Every error is a :class:`ConfigError` with a one-line message that names the key, the
bad value and the fix (the CLI prints it and exits with status 2).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from .config_errors import _FormattedError, _KeyValueError, format_error
from .config_sources import apply_overrides, parse_override, read_yaml  # noqa: F401  (kdarena.config's API)
from .data.registry import NAMES as DATA_NAMES
from .data.sampling import groups_batches
from .config_weights import ModelWeights, split_model_entries
from .errors import ConfigError
from .methods import registry as method_registry
from .methods.base import MethodParams


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: Any) -> Any:
        """pydantic's lax mode reads true as 1: a boolean where a number belongs is an error."""
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is not None and _numbers_only(field.annotation) and _holds_bool(value):
            raise ValueError("must be a number, not a boolean")
        return value


def _numbers_only(annotation: Any) -> bool:
    """int, float, their Optional/Union, and lists/tuples of them (no bool, str or Any anywhere)."""
    if annotation in (int, float):
        return True
    if get_origin(annotation) is Annotated:  # a number with bounds, e.g. each of optim.betas
        return _numbers_only(get_args(annotation)[0])
    args = [a for a in get_args(annotation) if a is not type(None) and a is not Ellipsis]
    return get_origin(annotation) in (Union, list, tuple) and bool(args) and all(_numbers_only(a) for a in args)


def _holds_bool(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value))


#: Schema markers (``json_schema_extra``): a *bookkeeping* key (paths, logging, speed knobs) never
#: changes what a run means, so sweeps, reports and resume ignore it; a *resumable* key may change
#: when a run is resumed (how long or how carefully it trains, not what it is).
BOOKKEEPING = {"bookkeeping": True}
RESUMABLE = {"resumable": True}


class DataConfig(_Section):
    name: Literal[DATA_NAMES] = "fashion_mnist"  # type: ignore[valid-type]  # (the data registry's names)
    root: Optional[str] = Field(None, json_schema_extra=BOOKKEEPING, description="data folder; for imagefolder/tiny_imagenet, and cifar10/cifar100 stored as image files "
                                "(train/ and test/ class folders, classes.txt for the label order), a folder or .tar/.tar.gz/.zip of one "
                                "(default: search $KDARENA_DATA, ~/.cache/kdarena, system paths)")
    download: bool = Field(False, json_schema_extra=BOOKKEEPING)
    val_size: Union[int, float] = Field(5000, ge=0, description="held-out validation samples (count, or fraction < 1)")
    val_seed: int = 0
    batch_size: int = Field(128, ge=1, description="per-process batch size")
    eval_batch_size: int = Field(512, ge=1, json_schema_extra=BOOKKEEPING)
    crop_padding: Optional[int] = Field(None, ge=0, le=256, description="random-crop padding (default: 4 for CIFAR, 0 "
                                        "otherwise); at most 256 pixels (1e6 asked for 512 TB)")
    flip: Optional[bool] = Field(None, description="random horizontal flip (default: on for CIFAR and image folders)")
    image_size: Optional[int] = Field(None, ge=8, description="image folders: resize (shorter side, area filter) and centre-crop "
                                      "size (default: the median of the images' shorter sides when at most 64 px, else 224; streamed folders: 224)")
    num_workers: int = Field(4, ge=0, json_schema_extra=BOOKKEEPING, description="image folders: DataLoader workers")
    train_subset: Optional[int] = Field(None, ge=1, description="use only this many training samples (quick tests)")
    classes: Optional[int] = Field(None, ge=2, description="keep only the first K classes (in the data set's class order) "
                                   "in every split: e.g. the map of accuracy against the number of classes")
    skip_bad_images: bool = False
    folder_fingerprint: Literal["stat", "content"] = Field(
        "stat", json_schema_extra=BOOKKEEPING, description="image folders: how the decoded-image cache recognises the folder: "
        "stat (path, size, mtime, ctime, inode of every file) or content (sha256 of every file; reads the folder each run)")
    cache_max_gb: float = Field(4.0, ge=0, description="image folders/archives: decode once into memory (cached under "
                                "~/.cache/kdarena) when the decoded set fits this many GB; larger folders are streamed (0: always stream)")
    mean: Optional[list[float]] = Field(None, description="per-channel normalisation mean in [0, 1] (default: the data set's own)")
    std: Optional[list[float]] = Field(None, description="per-channel normalisation std (default: the data set's own)")
    rotation: float = Field(0.0, ge=0, le=180, description="random rotation of each training image by up to this many degrees "
                            "(batch-wise, nearest pixel, zero fill; in-memory data sets)")
    samples_per_class: int = Field(0, ge=0, description="training batches of groups of this many images of one class, so "
                                   "every image has one of its class beside it (2: MCL's sampler); 0: random batches. "
                                   "data.batch_size must be a multiple of it; in-memory data sets")


class ParameterMutationConfig(_Section):
    enabled: bool = False
    scale: float = Field(0.01, gt=0, description="noise std relative to each tensor's RMS value")
    every: int = Field(10, ge=1)
    rollback_after: int = Field(0, ge=0, description="undo a mutation that has not won within this many steps (0: never)")


class PerturbConfig(_Section):
    enabled: bool = True
    ops: Union[Literal["paper", "code", "all"], list[str]] = "paper"
    op_params: dict[str, dict[str, Any]] = Field(
        {},
        description="op strengths by op name, e.g. {noise: {std: 0.5, clamp: [0, 1]}, crop: {scale: [0.2, 0.6]}}; "
        "the keys are the constructor arguments of kdarena.perturb's ops (Noise, Warp, Crop, Jitter, Blur, Rotate)",
    )
    every: int = Field(1, ge=1, description="perturb every k-th step (paper: 1, authors' code: 10)")
    probability: Optional[float] = Field(None, ge=0, le=1, description="perturb with this probability instead of every k-th step")
    mix_alpha: float = Field(1.0, gt=0, description="Beta(a, a) for the mixing coefficient")
    bn_stats: Literal["freeze", "update"] = Field(
        "freeze",
        description="freeze: a perturbed batch does not move the perturbed network's BatchNorm running statistics "
        "(they describe the data it is tested on); update: it does, like ordinary augmentation. The paper is silent.",
    )
    parameters: ParameterMutationConfig = ParameterMutationConfig()

    @field_validator("ops", mode="before")
    @classmethod
    def _known_ops(cls, ops: Any) -> Any:
        from .perturb import ALL_OPS, POOLS  # here, not at the top: only this class needs the package

        if isinstance(ops, str) and ops not in POOLS:
            ops = [ops]  # one op name is a pool of one
        if isinstance(ops, (list, tuple)):
            unknown = [op for op in ops if op not in ALL_OPS]
            if unknown or not ops:
                what = f"unknown op(s) {unknown}" if unknown else "the pool is empty"
                raise ValueError(f"{what}; valid: paper, code, all, or a list of {', '.join(ALL_OPS)}")
        return ops

    @field_validator("op_params")
    @classmethod
    def _known_op_params(cls, op_params: dict[str, dict[str, Any]], info: Any) -> dict[str, dict[str, Any]]:
        from .perturb import OpParameterError, build_ops, resolve_ops

        ops = info.data.get("ops")
        if ops is None:  # perturb.ops itself is invalid and reported on its own
            return op_params
        try:
            build_ops(resolve_ops(ops), op_params)  # builds each op once: checks names, keys and values
        except OpParameterError as error:
            key = f"perturb.op_params.{error.op}" + (f".{error.key}" if error.key else "")
            raise _KeyValueError(key, error.value, str(error)) from None
        return op_params


MAX_LR = 1e30


class OptimConfig(_Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0, json_schema_extra=RESUMABLE)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)  # AdamW's range
    epochs: int = Field(200, ge=1, json_schema_extra=RESUMABLE)
    schedule: Literal["cosine", "step", "multistep", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75], description="multistep: epochs, or fractions of the run if all < 1")
    step_size: int = Field(30, ge=1, description="step: epochs between decays")
    gamma: float = Field(0.1, gt=0, le=1)
    grad_clip: Optional[float] = Field(None, gt=0, description="clip each network's gradient norm")

    @field_validator("lr")
    @classmethod
    def _lr_fits_a_float32_step(cls, lr: float) -> float:
        if lr > MAX_LR:  # the optimizer takes lr * grad in float32: 1e308 was an overflow traceback there
            raise ValueError(f"must be at most {MAX_LR:g} (the optimizer's step is taken in float32)")
        return lr


class TrainConfig(_Section):
    device: str = Field("auto", json_schema_extra=BOOKKEEPING, pattern=r"^(auto|cpu|mps|cuda(:\d+)?|xpu(:\d+)?)$", description="auto, cpu, cuda, cuda:N")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the hardware has it natively (CUDA, CPUs with AVX-512 BF16/AMX), else fp32")
    channels_last: bool = Field(True, json_schema_extra=BOOKKEEPING)
    compile: bool = Field(False, json_schema_extra=BOOKKEEPING, description="torch.compile the group's forward (a failure "
                          "to compile falls back to eager with one warning)")
    cuda_graphs: Optional[bool] = Field(None, json_schema_extra=BOOKKEEPING, description="with train.compile on CUDA: "
                                        "mode reduce-overhead (CUDA graphs) unless false; default: on")
    fused: bool = Field(False, json_schema_extra=BOOKKEEPING, description="run identical networks as one vmapped forward (torch.func): fewer, larger GPU kernels; single process, same model for every entry; slower on CPU")
    deterministic: bool = False
    # bounded: torch.set_num_threads(99999999) crashes the process
    threads: Optional[int] = Field(None, ge=1, le=1024, json_schema_extra=BOOKKEEPING, description="CPU threads (default: torch's choice)")
    eval_every: int = Field(1, ge=1, json_schema_extra=RESUMABLE)
    checkpoint_every: int = Field(1, ge=1, json_schema_extra=BOOKKEEPING, description="epochs between checkpoints")
    checkpoint_every_steps: int = Field(0, ge=0, json_schema_extra=BOOKKEEPING, description="also checkpoint every N steps (0: off)")
    stop_after_steps: Optional[int] = Field(None, ge=1, json_schema_extra=BOOKKEEPING, description="checkpoint and stop at this global step (testing resume)")
    step_log: bool = Field(False, description="write every step's teacher, losses and perturbation to steps.rank<r>.jsonl in the run dir (testing/debugging)")
    nonfinite: Literal["skip", "rebirth", "stop"] = Field("skip", json_schema_extra=RESUMABLE)
    host_every: Optional[int] = Field(
        None, ge=1, le=1000, json_schema_extra=BOOKKEEPING,
        description="read the step's losses and logs on the host every k steps (the device never waits in between; "
        "train.nonfinite=skip is then decided on the device and stop is raised when read, up to k-1 steps late). "
        "Default: 1 on CPU, 8 on CUDA; rebirth and weight mutation need 1")
    sync_batchnorm: bool = False
    progress: bool = Field(True, json_schema_extra=BOOKKEEPING)
    tensorboard: bool = Field(True, json_schema_extra=BOOKKEEPING)


class Config(_Section):
    name: str = Field("run", json_schema_extra=BOOKKEEPING)
    # torch seeds are 64-bit; the named streams (kdarena.rng) add offsets up to ~10^5 to this one
    seed: int = Field(0, ge=0, le=2**63 - 1)
    output: str = Field("runs", json_schema_extra=BOOKKEEPING)
    models: list[str] = Field(default_factory=lambda: ["resnet20", "resnet20"], min_length=1)
    weights: Optional[list[Optional[ModelWeights]]] = Field(None, description="starting weights, one entry (or null) per model; "
                                                            "also written models: [{name: resnet20, weights: PATH}]")
    data: DataConfig = DataConfig()
    method: SerializeAsAny[MethodParams] = Field(
        default_factory=lambda: method_registry.params_for({}),
        description="the method and its own parameters: {name: cd, alpha: 1, rule: best}; see `kdarena methods`")
    perturb: PerturbConfig = PerturbConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="before")
    @classmethod
    def _model_entries(cls, raw: Any) -> Any:
        return split_model_entries(raw)  # models: [{name, weights}] -> models + weights (kdarena.config_weights)

    @field_validator("method", mode="before")
    @classmethod
    def _method_params(cls, raw: Any) -> MethodParams:
        """Validate the section with the model of the method it names (each method owns its options)."""
        if isinstance(raw, MethodParams):
            return raw
        if not isinstance(raw, dict):
            raise ValueError(f"must be a mapping such as {{name: cd, alpha: 1.0}}, got {type(raw).__name__}")
        name = raw.get("name", method_registry.DEFAULT)
        if name not in method_registry.names():
            registered = ", ".join(repr(m) for m in method_registry.names())
            raise _KeyValueError("method.name", name, f"unknown method; registered: {registered} (see `kdarena methods`); "
                                 f"e.g. the default method.name={method_registry.DEFAULT}")
        fields = method_registry.get(name).Params.model_fields  # MethodParams is not a _Section: same bool check here
        for key, value in raw.items():
            field = fields.get(key) if isinstance(key, str) else None
            if field is not None and _numbers_only(field.annotation) and _holds_bool(value):
                raise _KeyValueError(f"method.{key}", value, "must be a number, not a boolean")
        try:
            return method_registry.params_for(raw)
        except ValidationError as error:
            raise _FormattedError(format_error(error, method_registry.get(name).Params, ("method",))) from None

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        n = len(self.models)
        needs = method_registry.build(self.method).needs
        if n < needs.min_networks:
            raise _KeyValueError("models", self.models, f"method {self.method.name} needs at least {needs.min_networks} networks, "
                                 f"got {n}; list more models or use method.name=independent")
        try:
            self.method.check(n)
        except ValueError as error:
            key, message = error.args if len(error.args) == 2 else ("", str(error))
            raise _KeyValueError(f"method.{key}" if key else "method", getattr(self.method, key, None), message) from None
        m = self.data.samples_per_class
        if not groups_batches(m, self.data.batch_size):
            raise _KeyValueError("data.samples_per_class", m, f"must be 0 (random batches) or >= 2 and divide data.batch_size="
                                 f"{self.data.batch_size}; e.g. data.samples_per_class=2")
        if isinstance(self.data.val_size, float) and not 0 < self.data.val_size < 1:
            raise _KeyValueError("data.val_size", self.data.val_size, "a fraction must be in (0, 1); use an integer for a count")
        from .models.branched import check_models  # branched:<model> entries, and methods that need them (ONE)

        if problem := check_models(self.models, needs.branched, self.method.name, self.train.fused, self.train.compile):
            raise _KeyValueError("models", self.models, problem)
        return self

    def host_every(self, device_type: str) -> int:
        """How often the host reads the step's numbers (train.host_every, or its default for the device)."""
        if self.train.host_every is not None:
            return self.train.host_every
        needs_every_step = self.train.nonfinite == "rebirth" or self.perturb.parameters.enabled
        return 8 if device_type == "cuda" and not needs_every_step else 1

    def check_runtime(self, device_type: str, distributed: bool) -> None:
        """The checks that need the resolved device and the process count (the trainer calls this once)."""
        t = self.train
        if t.sync_batchnorm and distributed and device_type == "cpu":  # torch's SyncBatchNorm raises on CPU tensors
            raise ConfigError("train.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm does not run on CPU; drop it for CPU (gloo) runs")
        if t.fused and device_type == "cuda" and t.precision == "fp32" and t.channels_last:
            # Seen on an H200 with torch 2.11: "NYI: querying is_contiguous inside of vmap" in the fp32 conv path.
            raise ConfigError("train.fused=true with precision fp32 on CUDA needs train.channels_last=false (vmap limitation)")
        if (t.host_every or 1) > 1 and (t.nonfinite == "rebirth" or self.perturb.parameters.enabled):
            what = "train.nonfinite=rebirth" if t.nonfinite == "rebirth" else "perturb.parameters.enabled=true"
            raise ConfigError(f"train.host_every={t.host_every} cannot be combined with {what}: it acts on the host after "
                              "every step; set train.host_every=1")
        if t.fused and distributed:
            raise ConfigError("train.fused supports single-process training only; set train.fused=false with torchrun")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def marked_keys(marker: str, model: type[BaseModel] | None = None, prefix: str = "") -> set[str]:
    """Dotted keys whose schema carries ``marker`` (``"bookkeeping"`` or ``"resumable"``)."""
    out: set[str] = set()
    for name, field in (model or Config).model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and not issubclass(annotation, MethodParams):
            out |= marked_keys(marker, annotation, f"{prefix}{name}.")
        elif isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get(marker):
            out.add(prefix + name)
    return out


def validate(raw: dict[str, Any]) -> Config:
    """Validate a plain dict into a :class:`Config`, raising :class:`ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_error(error, Config)) from None


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from defaults), apply overrides and validate."""
    raw = read_yaml(path) if path is not None else {}
    return validate(apply_overrides(raw, overrides or []))


def to_dict(config: Config) -> dict[str, Any]:
    return config.model_dump(mode="json")


def dump(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
