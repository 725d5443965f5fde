"""Branched models: one shared trunk, m copies of the last stage (ONE, Lan et al., NeurIPS 2018).

A CIFAR ResNet (``resnet20/32/44/56/110``, option-A shortcuts) or a WRN is split into

* a **trunk**: the stem and every stage but the last (ResNet: conv-BN-ReLU, layer1, layer2;
  WRN: conv, block1, block2), shared by all branches;
* m **heads**: copies of the last stage plus what follows it (ResNet: layer3, pooling, fc; WRN:
  block3, the final BN-ReLU, pooling, fc), each initialised independently;
* optionally a **gate** on the trunk's output, for ONE: global average pooling -> FC (C -> m) ->
  BatchNorm -> ReLU -> softmax over the m branches (the paper's description of its gate).

How it plugs into the group machinery: list the same ``branched:<base>`` name once per branch,
``models: [branched:resnet32, branched:resnet32, branched:resnet32]``. The group is then a
:class:`BranchedGroup`: ``group.networks[i]`` is a :class:`BranchView` (trunk + head i, images ->
logits), so every method, evaluation, the ensemble metric, checkpoints and ``kdarena eval`` see m
networks. ``forward(x)`` runs the trunk once and the m heads on its output; ``forward([x_1..x_m])``
runs the trunk once per *distinct* input object (the trainer passes the same object to every
unperturbed network) and head i on the trunk output of x_i.

The shared trunk, decided and documented:

* A view *holds* the trunk but does not *register* it: the trunk (and the gate) are registered once
  in the group, so ``group.parameters()``, the optimizer and checkpoints count them once, and what a
  view's ``parameters()``, ``state_dict()`` and BatchNorm buffers cover is the branch's own head.
  Hence weight mutation perturbs a branch's head only; ``perturb.bn_stats=freeze`` protects the
  perturbed branch's head BatchNorms, while the trunk's running statistics are moved by every
  distinct trunk pass (clean and perturbed: the trunk is no single branch's); re-birth copies the
  teacher branch's head (or a fresh one) and keeps the trunk; a view's ``load_state_dict`` ignores
  ``trunk.*`` keys.
* Perturbing branch k (one perturbed input for competitive distillation) means the trunk runs on
  both the clean and the perturbed batch; head k sees the trunk features of the perturbed batch,
  and the trunk receives gradients from every branch's loss.
* ``group.network_parameters(i)`` is head i's parameters, the adapters it owns *and the shared
  trunk and gate*: a non-finite loss of any branch makes the trunk's gradient non-finite, so
  ``train.nonfinite=skip`` drops branch i's step and the trunk's (the other branches still step).
  The trainer's restore of a non-finite batch's BatchNorm statistics covers the branch's own
  BatchNorms only; the trunk's running statistics keep that batch.
  Per-network gradient clipping (``optim.grad_clip``) clips (trunk + head i) for each i in turn, so
  the trunk's gradient is scaled by every branch's clipping factor (never enlarged).
* ``train.fused`` and ``train.compile`` are refused for branched groups (one-line config errors).
* A deep copy of a view (e.g. a temporal-mean copy) is a standalone network with its own trunk.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelSpecError
from ..group import Group, GroupOutput, clear_head_outputs, take_head_outputs
from .registry import GlobalAvgPool, register
from .resnet_cifar import CifarResNet
from .wrn import WideResNet

PREFIX = "branched:"
#: base name -> (depth, widen factor or None for the CIFAR ResNets)
BASES: dict[str, tuple[int, int | None]] = {
    **{f"resnet{d}": (d, None) for d in (8, 14, 20, 32, 44, 56, 110)},
    "wrn16_2": (16, 2), "wrn40_2": (40, 2), "wrn28_10": (28, 10),
}


class ResNetTrunk(nn.Module):
    def __init__(self, net: CifarResNet):
        super().__init__()
        self.conv1, self.bn1, self.layer1, self.layer2 = net.conv1, net.bn1, net.layer1, net.layer2
        self.out_channels = net.layer3[0].conv1.in_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))


class ResNetHead(nn.Module):
    def __init__(self, net: CifarResNet):
        super().__init__()
        self.layer3, self.pool, self.fc = net.layer3, GlobalAvgPool(), net.fc
        self.feature_layer = "pool"

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layer3(x)))


class WRNTrunk(nn.Module):
    def __init__(self, net: WideResNet):
        super().__init__()
        self.conv1, self.block1, self.block2 = net.conv1, net.block1, net.block2
        self.out_channels = net.block3[0].bn1.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.block2(self.block1(self.conv1(x)))


class WRNHead(nn.Module):
    def __init__(self, net: WideResNet):
        super().__init__()
        self.block3, self.bn, self.pool, self.fc = net.block3, net.bn, GlobalAvgPool(), net.fc
        self.feature_layer = "pool"

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(F.relu(self.bn(self.block3(x)))))


class Gate(nn.Module):
    """Pooled trunk features -> FC -> BatchNorm -> ReLU -> softmax over the m branches: (N, m) weights."""

    def __init__(self, channels: int, branches: int):
        super().__init__()
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(channels, branches)
        self.bn = nn.BatchNorm1d(branches)

    def forward(self, trunk_features: Tensor) -> Tensor:
        a = F.relu(self.bn(self.fc(self.pool(trunk_features))))
        return F.softmax(a.float() if a.dtype in (torch.float16, torch.bfloat16) else a, dim=1)  # weights in >= fp32


def _base_model(base: str, num_classes: int, in_channels: int, **kwargs: Any) -> nn.Module:
    depth, k = BASES[base]
    if k is None:
        return CifarResNet(depth, (16, 16, 32, 64), num_classes, in_channels, shortcut="A", **kwargs)
    return WideResNet(depth, k, num_classes, in_channels, **kwargs)


def split(base: str, branches: int, num_classes: int, in_channels: int = 3, **kwargs: Any) -> tuple[nn.Module, list[nn.Module]]:
    """The trunk of one freshly initialised ``base`` model and ``branches`` heads (head 0 from the
    same model, the others from further fresh models, so every head is initialised independently)."""
    if base not in BASES:
        raise ModelSpecError(f"{PREFIX}{base}: branched models are built from {', '.join(BASES)}")
    trunk_cls, head_cls = (ResNetTrunk, ResNetHead) if BASES[base][1] is None else (WRNTrunk, WRNHead)
    first = _base_model(base, num_classes, in_channels, **kwargs)
    heads = [head_cls(first)] + [head_cls(_base_model(base, num_classes, in_channels, **kwargs)) for _ in range(branches - 1)]
    return trunk_cls(first), heads


class BranchView(nn.Module):
    """Trunk + one head: images -> the branch's logits.

    ``shared=True`` (inside a :class:`BranchedGroup`): the trunk is held in a plain list, not
    registered (the group owns it, see the module docstring). ``shared=False``: a standalone network
    that owns its trunk (``models.create("branched:resnet32")``, deep copies).
    """

    def __init__(self, trunk: nn.Module, head: nn.Module, shared: bool = False):
        super().__init__()
        if shared:
            self._shared = [trunk]
        else:
            self.trunk = trunk
        self.head = head
        self.feature_layer = "head.pool"

    @property
    def shared(self) -> bool:
        return "_shared" in self.__dict__

    def get_trunk(self) -> nn.Module:
        return self._shared[0] if self.shared else self.trunk

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.get_trunk()(x))

    def train(self, mode: bool = True) -> "BranchView":
        # evaluation calls net.eval() on each network: the trunk it runs must follow
        super().train(mode)
        if self.shared:
            self._shared[0].train(mode)
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.shared:  # the trunk is the group's: a branch loads its own head only (e.g. re-birth)
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("trunk.")}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def __deepcopy__(self, memo: dict) -> "BranchView":
        clone = BranchView(copy.deepcopy(self.get_trunk(), memo), copy.deepcopy(self.head, memo), shared=False)
        clone.train(self.training)
        return clone


class BranchedGroup(Group):
    """A :class:`Group` whose networks are the m branches of one branched model (module docstring)."""

    def __init__(self, trunk: nn.Module, heads: Sequence[nn.Module], gate: bool = False,
                 feature_layers: Sequence[str | None] | None = None, collect_features: bool = False):
        views = [BranchView(trunk, head, shared=True) for head in heads]
        super().__init__(views, feature_layers=feature_layers, collect_features=collect_features)
        self.trunk = trunk
        self.gate = Gate(trunk.out_channels, len(heads)) if gate else None
        for view in views:
            view._shared.append(self.gate)  # (trunk, gate): what ONE's gated ensemble needs

    @classmethod
    def build(cls, names: Sequence[str], num_classes: int, in_channels: int = 3, gate: bool = False,
              feature_layers: Sequence[str | None] | None = None, collect_features: bool = False) -> "BranchedGroup":
        problem = check_models(list(names))
        if problem or not is_branched(names):
            raise ModelSpecError(problem or f"{list(names)} names no {PREFIX}<model>")
        trunk, heads = split(names[0][len(PREFIX):], len(names), num_classes, in_channels)
        return cls(trunk, heads, gate, feature_layers, collect_features)

    def set_runners(self, runners) -> None:
        if runners is not None:
            raise ValueError("a branched group runs its trunk once per input itself; train.compile is not supported")

    def forward(self, x: Tensor | Sequence[Tensor]) -> GroupOutput:
        m = len(self.networks)
        inputs = list(x) if isinstance(x, (list, tuple)) else [x] * m
        if len(inputs) != m:
            raise ValueError(f"got {len(inputs)} inputs for {m} branches")
        self._captured = {}
        clear_head_outputs(self.networks)
        trunk_out: dict[int, Tensor] = {}  # id(input) -> trunk features: identical input objects share one pass
        logits = []
        for view, inp in zip(self.networks, inputs):
            if id(inp) not in trunk_out:
                trunk_out[id(inp)] = self.trunk(inp)
            logits.append(view.head(trunk_out[id(inp)]))
        features = None
        if self.collect_features:
            features = [self._captured[i] for i in range(m)]
            self._captured = {}
        # the gate looks at the trunk features of branch 0's input (the only input when nothing is perturbed)
        extras = {"gate": self.gate(trunk_out[id(inputs[0])])} if self.gate is not None else {}
        if (heads := take_head_outputs(self.networks)) is not None:
            extras["heads"] = heads
        return GroupOutput(logits, features, extras)

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters()) + (list(self.gate.parameters()) if self.gate is not None else [])

    def network_parameters(self, index: int) -> list[nn.Parameter]:
        """Head ``index``, its adapters and the shared trunk and gate (see the module docstring)."""
        return super().network_parameters(index) + self.shared_parameters()


class GateEnsemble(nn.Module):
    """images -> sum_k g_k(x) z_k(x), the gated ensemble's logits (evaluated like a network).

    Holds the group's trunk, gate and heads without registering them (the group owns them).
    """

    def __init__(self, group: Sequence[nn.Module]):
        super().__init__()
        views = list(group)
        if not views or not all(isinstance(v, BranchView) and v.shared for v in views):
            raise ValueError(f"the gated ensemble needs the branches of one branched model ({PREFIX}<model> in models)")
        trunk, gate = views[0]._shared
        if gate is None or any(v._shared[0] is not trunk for v in views):
            raise ValueError("the branches share no gate: build the group with a method that needs one (method.name=one)")
        self._parts = [trunk, gate, [v.head for v in views]]

    def train(self, mode: bool = True) -> "GateEnsemble":
        super().train(mode)
        trunk, gate, heads = self._parts
        for module in (trunk, gate, *heads):
            module.train(mode)
        return self

    def forward(self, x: Tensor) -> Tensor:
        trunk, gate, heads = self._parts
        features = trunk(x)
        g = gate(features)
        z = torch.stack([head(features) for head in heads], dim=1)  # (N, m, C)
        return (g.to(z.dtype).unsqueeze(2) * z).sum(dim=1)


def whole(network: nn.Module) -> nn.Module:
    """All that ``network`` computes with as one module: for a branch of a shared trunk, a standalone
    view that registers that trunk and head (parameters in the order of the branch's deep copy, so a
    temporal mean can be paired with it); any other network itself."""
    if isinstance(network, BranchView) and network.shared:
        return BranchView(network.get_trunk(), network.head, shared=False)
    return network


def is_branched(names: Sequence[str]) -> bool:
    return any(str(name).startswith(PREFIX) for name in names)


def check_models(names: list[str], method_needs_branched: bool = False, method: str = "",
                 fused: bool = False, compile: bool = False) -> str | None:
    """Why ``models`` cannot run as configured (one line naming the fix), or None."""
    branched = [str(n) for n in names if str(n).startswith(PREFIX)]
    example = f"models: [{PREFIX}resnet32, {PREFIX}resnet32, {PREFIX}resnet32]"
    if not branched:
        if method_needs_branched:
            return f"method {method} needs a branched model (one shared trunk, one branch per entry); e.g. {example}"
        return None
    if len(branched) != len(names) or len(set(branched)) != 1:
        return f"every entry must name the same branched model, one entry per branch; e.g. {example}"
    base = branched[0][len(PREFIX):]
    if base not in BASES:
        return f"{branched[0]} has no branched form; valid: {', '.join(PREFIX + b for b in BASES)}"
    if fused:
        return "the branches share one trunk and cannot be vmapped: set train.fused=false"
    if compile:
        return "train.compile is not supported for branched models: set train.compile=false"
    return None


def _standalone(base: str):
    def build(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> BranchView:
        trunk, heads = split(base, 1, num_classes, in_channels, **kwargs)
        return BranchView(trunk, heads[0], shared=False)

    return build


for _base in BASES:
    register(PREFIX + _base)(_standalone(_base))
