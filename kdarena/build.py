"""Turn a validated :class:`Config` into data loaders, a group, a method and an optimizer."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import models
from .config import Config, ConfigError
from .data.build import DataBundle, build_data  # noqa: F401  (re-exported for the trainer)
from .group import Group
from .methods import CompetitiveDistillation, DeepMutualLearning, GroupMethod, Independent, KnowledgeDistillation, freeze
from .perturb import ALL_OPS, CODE_POOL, PAPER_POOL, PerturbationScheduler

def build_group(config: Config, num_classes: int, in_channels: int) -> Group:
    networks = []
    for name in config.models:
        try:
            networks.append(models.create(name, num_classes=num_classes, in_channels=in_channels))
        except ValueError as error:
            raise ConfigError(f"bad value in 'models': {error}") from None
    collect = config.method.name in ("cd", "dml") and config.method.beta > 0
    return Group(networks, feature_layers=config.method.feature_layers, collect_features=collect)


def build_method(config: Config) -> GroupMethod:
    m = config.method
    if m.name == "independent":
        return Independent()
    if m.name == "dml":
        return DeepMutualLearning(alpha=m.alpha, temperature=m.temperature, beta=m.beta, feature_reduction=m.feature_reduction)
    if m.name == "cd":
        return CompetitiveDistillation(
            alpha=m.alpha, beta=m.beta, temperature=m.temperature, rule=m.rule,
            selection=m.selection, smoothing=m.smoothing, feature_reduction=m.feature_reduction,
        )
    return KnowledgeDistillation(alpha=m.alpha, temperature=m.temperature)


def build_teacher(config: Config, num_classes: int, in_channels: int, device: torch.device) -> nn.Module:
    """The frozen teacher of offline KD, from a kdarena checkpoint or a plain state_dict file."""

    m = config.method
    teacher = models.create(m.teacher_model, num_classes=num_classes, in_channels=in_channels)
    if m.teacher_checkpoint:
        path = Path(m.teacher_checkpoint)
        if not path.is_file():
            raise ConfigError(f"method.teacher_checkpoint={m.teacher_checkpoint!r} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and "group" in state:
            prefix = f"networks.{m.teacher_index}."
            state = {k[len(prefix):]: v for k, v in state["group"].items() if k.startswith(prefix)}
            if not state:
                raise ConfigError(f"method.teacher_index={m.teacher_index} is not a network of {path}")
        try:
            teacher.load_state_dict(state)
        except RuntimeError as error:
            raise ConfigError(f"method.teacher_checkpoint does not fit method.teacher_model={m.teacher_model!r}: {str(error).splitlines()[0]}") from None
    return freeze(teacher.to(device))


def perturb_ops(config: Config) -> tuple[str, ...]:
    ops = config.perturb.ops
    if ops == "paper":
        return PAPER_POOL
    if ops == "code":
        return CODE_POOL
    if ops == "all":
        return ALL_OPS
    unknown = [op for op in ops if op not in ALL_OPS]
    if unknown or not ops:
        raise ConfigError(f"bad value for 'perturb.ops': unknown op(s) {unknown}; valid: paper, code, all, or a list of {', '.join(ALL_OPS)}")
    return tuple(ops)


def build_perturbation(config: Config) -> PerturbationScheduler | None:
    p = config.perturb
    if not p.enabled or config.method.name == "kd":
        return None
    return PerturbationScheduler(
        len(config.models), ops=perturb_ops(config), every=p.every, probability=p.probability,
        seed=config.seed + 7919, mix_alpha=p.mix_alpha,
    )


def build_optimizer(config: Config, group: Group) -> torch.optim.Optimizer:
    o = config.optim
    # BN and bias parameters are decayed too, as in the CIFAR recipes the paper follows.
    params = [p for p in group.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
