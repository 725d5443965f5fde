"""Heads beyond the classifier that some methods train: an embedding, attention projections, early exits.

A method asks for them in ``Needs.heads`` (a tuple of :class:`HeadSpec`); the run's builder calls
:func:`attach` on every network of the group, which registers the heads as the submodule
``aux_heads`` of the network (so the optimizer, checkpoints, weight mutation and ``group.
network_parameters(i)`` cover them as the network's own) and puts forward hooks on the layers they
read. The heads run in training mode only: evaluation, ``kdarena eval`` and exports compute exactly
the plain network. After a forward, the group takes the outputs (``GroupOutput.extras["heads"]``:
one dict ``kind -> output`` per network), so the trainer never knows which method wants what.

Kinds, each from the network's own layers (found by the zoo's conventions, never by the method):

* ``embedding`` (MCL): the pooled feature of ``feature_layer`` -> Linear(D, d) -> ReLU ->
  Linear(d, d) -> L2 normalisation; output (B, d). ``size`` = d (MCL's code: 128).
* ``attention`` (OKDDip): the pooled feature -> a query and a key projection, Linear(D, D // f)
  without bias each; output ``(query, key)``, each (B, D // f). ``size`` = f (OKDDip's code: 8).
* ``exits`` (BYOT): one early classifier after every stage but the last of ``stage_layers``:
  conv1x1(C_s -> C/4)-BN-ReLU, conv kxk stride k (C/4 -> C/4)-BN-ReLU, conv1x1(C/4 -> C)-BN-ReLU,
  global average pooling, Linear(C -> classes), with C the width of the pooled feature and k the downsampling from
  that stage to the last stage's output (BYOT's reference code's bottleneck). Output
  ``(logits, features, final)``: lists over the exits, shallowest first, of (B, classes) and (B, C),
  and the network's own pooled feature (B, C) that the exits' features are compared with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .registry import GlobalAvgPool

KINDS = ("embedding", "attention", "exits")
#: the default ``size`` of each kind (the reference code's): embedding width, attention reduction factor
DEFAULT_SIZE = {"embedding": 128, "attention": 8, "exits": None}
ATTRIBUTE = "aux_heads"
#: the probe batch that finds the layers' shapes (pooled widths and stage ratios do not depend on the image size)
PROBE_SIZE = 32


@dataclass(frozen=True)
class HeadSpec:
    """One head a method needs: its ``kind`` (see the module docstring) and an optional ``size``."""

    kind: str
    size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown head kind {self.kind!r}; kinds: {', '.join(KINDS)}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"head {self.kind}: size must be >= 1, got {self.size}")

    @property
    def resolved_size(self) -> int | None:
        return self.size if self.size is not None else DEFAULT_SIZE[self.kind]


class HeadError(ValueError):
    """A network cannot carry the heads a method needs (the message names the model and the fix)."""


class Embedding(nn.Module):
    def __init__(self, width: int, size: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(width, size), nn.ReLU(inplace=True), nn.Linear(size, size))

    def forward(self, features: Tensor) -> Tensor:
        return nn.functional.normalize(self.proj(features), dim=1)


class Attention(nn.Module):
    def __init__(self, width: int, factor: int):
        super().__init__()
        if width // factor < 1:
            raise HeadError(f"attention: a reduction factor of {factor} leaves nothing of {width} features; lower the factor")
        self.query = nn.Linear(width, width // factor, bias=False)
        self.key = nn.Linear(width, width // factor, bias=False)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return self.query(features), self.key(features)


class Exit(nn.Module):
    """An early classifier on a stage's feature map (BYOT's bottleneck, then pooling and a linear layer)."""

    def __init__(self, in_channels: int, channels: int, stride: int, num_classes: int):
        super().__init__()
        middle = max(channels // 4, 1)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_channels, middle, 1), nn.BatchNorm2d(middle), nn.ReLU(inplace=True),
            nn.Conv2d(middle, middle, stride, stride=stride), nn.BatchNorm2d(middle), nn.ReLU(inplace=True),
            nn.Conv2d(middle, channels, 1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.pool(self.bottleneck(x))
        return self.fc(features), features


class HeadSet(nn.Module):
    """The heads of one network and the outputs of its last training forward (taken by the group)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding: nn.Module | None = None
        self.attention: nn.Module | None = None
        self.exits = nn.ModuleList()
        self._outputs: dict[str, Any] = {}
        self._exit_outputs: dict[int, tuple[Tensor, Tensor]] = {}

    def kinds(self) -> list[str]:
        return [k for k in ("embedding", "attention") if getattr(self, k) is not None] + (["exits"] if len(self.exits) else [])

    def clear(self) -> None:
        self._outputs, self._exit_outputs = {}, {}

    def take(self) -> dict[str, Any]:
        """The outputs of the last training forward, kind -> output; empty after an evaluation forward."""
        outputs = dict(self._outputs)
        if self._exit_outputs:
            pairs = [self._exit_outputs[i] for i in sorted(self._exit_outputs)]
            outputs["exits"] = ([p[0] for p in pairs], [p[1] for p in pairs], outputs.pop("final"))
        self.clear()
        return outputs

    def _on_features(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if not self.training:
            return
        if self.embedding is not None:
            self._outputs["embedding"] = self.embedding(output)
        if self.attention is not None:
            self._outputs["attention"] = self.attention(output)
        if len(self.exits):
            self._outputs["final"] = output

    def _on_stage(self, index: int):
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if self.training:
                self._exit_outputs[index] = self.exits[index](output)
        return hook


def _stage_layers(network: nn.Module) -> list[str]:
    view_head = getattr(network, "head", None)
    layers = getattr(network, "stage_layers", None)
    if layers is None and view_head is not None and getattr(network, "get_trunk", None) is not None:
        raise HeadError("a branch of a shared trunk has one stage of its own: early exits need a whole network, "
                        "e.g. models: [resnet32]")
    if not layers:
        raise HeadError(f"{type(network).__name__} declares no stage_layers (where early exits attach); "
                        "the zoo's CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4, resnet18, resnet34) and WRNs have them")
    return list(layers)


def _probe(network: nn.Module, names: Sequence[str], in_channels: int) -> tuple[dict[str, torch.Size], torch.Size]:
    """Output shapes of the named modules and of the network on a small zero batch (eval mode: no state changes)."""
    modules = dict(network.named_modules())
    shapes: dict[str, torch.Size] = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, o.shape)) for n in names]
    was_training = network.training
    parameter = next(network.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    network.eval()
    try:
        with torch.no_grad():
            logits = network(torch.zeros(2, in_channels, PROBE_SIZE, PROBE_SIZE, device=device))
    finally:
        for handle in handles:
            handle.remove()
        network.train(was_training)
    return shapes, logits.shape


def attach(network: nn.Module, specs: Sequence[HeadSpec], in_channels: int = 3) -> HeadSet | None:
    """Give ``network`` the heads ``specs`` asks for (once; a network that has them keeps them). Raises
    :class:`HeadError` when the network cannot carry one."""
    if not specs:
        return None
    if hasattr(network, ATTRIBUTE):
        raise HeadError(f"{type(network).__name__} has heads already; attach them once")
    kinds = [spec.kind for spec in specs]
    if len(set(kinds)) != len(kinds):
        raise HeadError(f"each head kind once, got {kinds}")
    feature_layer = getattr(network, "feature_layer", None)
    modules = dict(network.named_modules())
    if feature_layer not in modules:  # every kind reads the pooled feature (the exits compare theirs with it)
        raise HeadError(f"{type(network).__name__} names no feature_layer (its pooled feature), which every head reads")
    stages = _stage_layers(network) if "exits" in kinds else []
    missing = [s for s in stages if s not in modules]
    if missing:
        raise HeadError(f"{type(network).__name__}: stage_layers {missing} are not modules of it")
    shapes, logits = _probe(network, [feature_layer, *stages], in_channels)
    heads = HeadSet()
    for spec in specs:
        if spec.kind == "embedding":
            heads.embedding = Embedding(shapes[feature_layer][1], spec.resolved_size)
        elif spec.kind == "attention":
            heads.attention = Attention(shapes[feature_layer][1], spec.resolved_size)
    if stages:
        last = shapes[stages[-1]]
        for name in stages[:-1]:
            shape = shapes[name]
            if len(shape) != 4 or shape[2] % last[2]:
                raise HeadError(f"{type(network).__name__}: stage {name} gives {tuple(shape)}, which does not pool down "
                                f"to the last stage's {tuple(last)}")
            heads.exits.append(Exit(shape[1], shapes[feature_layer][1], shape[2] // last[2], logits[1]))
    parameter = next(network.parameters(), None)
    if parameter is not None:
        heads.to(parameter.device)
    network.add_module(ATTRIBUTE, heads)
    modules[feature_layer].register_forward_hook(heads._on_features)
    for index, name in enumerate(stages[:-1]):
        modules[name].register_forward_hook(heads._on_stage(index))
    return heads


def heads_of(network: nn.Module) -> HeadSet | None:
    heads = getattr(network, ATTRIBUTE, None)
    return heads if isinstance(heads, HeadSet) else None
