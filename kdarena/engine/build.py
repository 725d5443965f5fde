"""Build every part of a run from a validated :class:`~kdarena.config.Config`, then hand them over.

torchvision-references style: :func:`build_parts` constructs data, group, method, perturbation,
mutation, optimizer, scheduler, scaler and the runner (plain loop, DDP or the fused vmap group)
in one place and in a fixed order (the order fixes how the global RNG is consumed, so seeds give
identical runs). The trainer, ``kdarena eval`` and the benchmarks all use it.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .. import models
from ..config import Config, ConfigError
from ..cpu_threads import choose_threads
from ..data.build import DataBundle, build_data
from ..errors import ModelSpecError
from ..group import Group
from ..models.heads import HeadError, attach as attach_heads
from ..methods import GroupMethod, MethodContext, Needs, registry
from ..perturb import MutationTracker, PerturbationScheduler, resolve_ops
from ..rng import stream_seed
from .checkpoint import load_network_state
from .compiled import CompiledRunner, compile_mode
from .distributed import DistInfo
from .evaluate import resolve_precision
from .schedule import build_scheduler
from .weights import load_start_weights

log = logging.getLogger("kdarena")


@dataclass
class Parts:
    """Everything a training run is made of (the trainer keeps these and the loop state)."""

    data: DataBundle
    group: Group
    method: GroupMethod
    perturber: PerturbationScheduler | None
    mutations: MutationTracker | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    #: runs the group's forward: the group itself, its DDP wrapper or a FusedGroup
    runner: Callable


@functools.cache
def _torch_default_threads() -> int:
    """torch's thread count before any run set it (a later run in this process starts from it again)."""
    return torch.get_num_threads()


def configure_torch(config: Config, device: torch.device) -> None:
    """Process-wide torch switches of the run (threads, determinism, cuDNN autotuning)."""
    t = config.train
    if t.threads:
        torch.set_num_threads(t.threads)
    elif device.type == "cpu":  # fewer threads when other work keeps cores busy (see kdarena.cpu_threads)
        choice = choose_threads(_torch_default_threads())
        torch.set_num_threads(choice.threads)
        log.info("train.threads=auto: %s", choice.describe())
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def build_group(config: Config, num_classes: int, in_channels: int, needs: Needs) -> Group:
    group = _networks(config, num_classes, in_channels, needs)
    if needs.heads:  # what the method trains beyond each classifier, built by the zoo from the network's layers
        if config.train.fused or config.train.compile:
            raise ConfigError(f"method {config.method.name} trains heads that run from forward hooks: "
                              "set train.fused=false and train.compile=false")
        for i, (name, network) in enumerate(zip(config.models, group.networks)):
            try:
                attach_heads(network, needs.heads, in_channels)
            except HeadError as error:
                raise ConfigError(f"bad value in 'models': method {config.method.name} cannot run on models[{i}] = "
                                  f"{name}: {error}") from None
    return group


def _networks(config: Config, num_classes: int, in_channels: int, needs: Needs) -> Group:
    if models.branched.is_branched(config.models):  # the entries are the branches of one shared trunk
        try:
            return models.branched.BranchedGroup.build(config.models, num_classes, in_channels, gate=needs.branched,
                                                       feature_layers=needs.feature_layers, collect_features=needs.features)
        except ModelSpecError as error:
            raise ConfigError(f"bad value in 'models' or 'method.feature_layers': {error}") from None
    networks = []
    for name in config.models:
        try:
            networks.append(models.create(name, num_classes=num_classes, in_channels=in_channels))
        except ModelSpecError as error:
            raise ConfigError(f"bad value in 'models': {error}") from None
    try:
        return Group(networks, feature_layers=needs.feature_layers, collect_features=needs.features)
    except ModelSpecError as error:
        raise ConfigError(f"bad value for 'method.feature_layers': {error}") from None


def build_data_and_group(config: Config, device: torch.device, info: DistInfo, needs: Needs) -> tuple[DataBundle, Group]:
    """The data and the group on ``device`` with its adapters (what evaluation needs too)."""
    torch.manual_seed(config.seed)
    data = build_data(config, device, info.rank, info.world_size)
    group = build_group(config, data.num_classes, data.in_channels, needs).to(device)
    if config.train.channels_last:
        group.to(memory_format=torch.channels_last)
    example = next(iter(data.train.iterate(0, 0)))[0]
    group.build_adapters(example)
    return data, group


def build_perturbation(config: Config, needs: Needs) -> PerturbationScheduler | None:
    p = config.perturb
    if not p.enabled or not needs.perturbation:
        return None
    return PerturbationScheduler(len(config.models), ops=resolve_ops(p.ops), every=p.every, probability=p.probability,
                                 seed=stream_seed(config.seed, "perturbation"), mix_alpha=p.mix_alpha,
                                 op_params=p.op_params)


def build_mutations(config: Config, needs: Needs) -> MutationTracker | None:
    m = config.perturb.parameters
    if not m.enabled or not needs.perturbation:
        return None
    return MutationTracker(len(config.models), m.scale, m.every, m.rollback_after, stream_seed(config.seed, "mutation"))


def build_optimizer(config: Config, group: Group) -> torch.optim.Optimizer:
    o = config.optim
    # BN and bias parameters are decayed too, as in the CIFAR recipes the paper follows.
    params = [p for p in group.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def build_runner(config: Config, group: Group, device: torch.device, info: DistInfo) -> Callable:
    """What runs the group's forward: the group itself, its DDP wrapper or the fused vmap group, compiled on request."""
    t = config.train
    mode = compile_mode(t.cuda_graphs, device)
    if t.compile and not t.fused:
        group.set_runners([torch.compile(net, mode=mode) for net in group.networks])
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(group, device_ids=[device.index] if device.type == "cuda" else None)
    if t.fused:  # one vmapped forward for identical networks; parameters stay shared with the group
        from .fused import FusedGroup, FusedGroupError

        try:
            fused = FusedGroup(group)
        except FusedGroupError as error:
            raise ConfigError(f"bad value for 'train.fused': {error}") from None
        if not t.compile:
            return fused
        return CompiledRunner(fused.compiled(mode), fused, f"the fused group (torch.compile mode={mode})")
    if t.compile:
        return CompiledRunner(group, group, f"the group's networks (torch.compile mode={mode})",
                              on_fallback=lambda: group.set_runners(None))
    return group


def build_parts(config: Config, device: torch.device, info: DistInfo | None = None,
                data_override: Callable[[Config, torch.device, int, int], DataBundle] | None = None) -> Parts:
    """Build a whole run. ``data_override`` replaces the data (benchmarks feed synthetic batches)."""
    info = info or DistInfo()
    config.check_runtime(device.type, info.enabled)
    configure_torch(config, device)
    method = registry.build(config.method)
    needs = method.needs
    if data_override is not None:
        torch.manual_seed(config.seed)
        data = data_override(config, device, info.rank, info.world_size)
        group = build_group(config, data.num_classes, data.in_channels, needs).to(device)
        if config.train.channels_last:
            group.to(memory_format=torch.channels_last)
        group.build_adapters(next(iter(data.train.iterate(0, 0)))[0])
    else:
        data, group = build_data_and_group(config, device, info, needs)
    load_start_weights(config, group)  # the config's per-model weights (engine/weights.py)
    if config.train.sync_batchnorm and info.enabled:
        group = nn.SyncBatchNorm.convert_sync_batchnorm(group)
    method.setup(MethodContext(data.num_classes, data.in_channels, device, list(group.networks),
                               train_size=len(data.train.dataset) if hasattr(data.train, "dataset") else 0,
                               precision=resolve_precision(config.train.precision, device),
                               load_network_state=load_network_state))
    optimizer = build_optimizer(config, group)
    steps_per_epoch = len(data.train)
    if steps_per_epoch == 0:
        raise ConfigError("the training loader yields no batch; lower data.batch_size")
    return Parts(
        data=data,
        group=group,
        method=method,
        perturber=build_perturbation(config, needs),
        mutations=build_mutations(config, needs),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, config.optim, steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type, enabled=resolve_precision(config.train.precision, device) == "fp16"),
        runner=build_runner(config, group, device, info),
    )


