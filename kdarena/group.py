"""A group of networks trained together, with feature hooks and feature adapters."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .errors import ModelSpecError


@dataclass
class GroupOutput:
    logits: list[Tensor]
    features: list[Tensor] | None
    #: what a model offers beyond logits and features (e.g. a branched model's gate: ``{"gate": (N, m)}``);
    #: the trainer passes it on as ``StepInput.extras``; ``"heads"``: per network, its heads' outputs (``models.heads``)
    extras: dict[str, Any] = field(default_factory=dict)


def _resolve_feature_layer(network: nn.Module, name: str | None) -> str | None:
    if name is None:
        name = getattr(network, "feature_layer", None)
    if name is None:
        return None
    modules = dict(network.named_modules())
    if name not in modules:
        raise ModelSpecError(
            f"feature layer {name!r} is not a module of {type(network).__name__}; "
            f"valid names include {sorted(k for k in modules if k)[:12]}"
        )
    return name


def take_head_outputs(networks: Sequence[nn.Module]) -> list[dict[str, Any]] | None:
    """Each network's head outputs of the forward just run (``models.heads``), or None when no network has heads."""
    sets = [getattr(net, "aux_heads", None) for net in networks]
    if all(heads is None for heads in sets):
        return None
    return [heads.take() if heads is not None else {} for heads in sets]


def clear_head_outputs(networks: Sequence[nn.Module]) -> None:
    """Drop what a forward outside the group (e.g. a clean-batch CE) left in the heads."""
    for net in networks:
        heads = getattr(net, "aux_heads", None)
        if heads is not None:
            heads.clear()


def _make_adapter(student: torch.Size, teacher: torch.Size) -> nn.Module:
    """A projection from a student's feature shape to a teacher's (owned and trained by the student)."""
    if len(student) == 2 and len(teacher) == 2:
        return nn.Linear(student[1], teacher[1], bias=False)
    if len(student) == 4 and len(teacher) == 4:
        layers: list[nn.Module] = []
        if student[2:] != teacher[2:]:
            layers.append(nn.AdaptiveAvgPool2d(tuple(teacher[2:])))
        layers.append(nn.Conv2d(student[1], teacher[1], kernel_size=1, bias=False))
        return nn.Sequential(*layers) if len(layers) > 1 else layers[0]
    raise ValueError(f"cannot adapt features of shape {tuple(student)} to {tuple(teacher)}; pick feature layers of the same rank")


class Group(nn.Module):
    """n networks trained together.

    ``forward(x)`` runs every network on the same batch, or ``forward([x_0, ..., x_{n-1}])``
    gives each network its own input (e.g. one perturbed view). When ``collect_features``
    is on, a forward hook on each network's feature layer (``network.feature_layer`` or
    the names given) records its output, so any model works unchanged.

    Networks whose feature shapes differ need adapters for the feature loss: call
    :meth:`build_adapters` with an example batch before creating the optimizer. The adapter
    for the pair (student i, teacher j) is trained by student i's loss only.
    """

    def __init__(
        self,
        networks: Sequence[nn.Module],
        feature_layers: Sequence[str | None] | None = None,
        collect_features: bool = False,
    ):
        super().__init__()
        if len(networks) < 1:
            raise ValueError("a Group needs at least one network")
        self.networks = nn.ModuleList(networks)
        self.adapters = nn.ModuleDict()
        self.collect_features = collect_features
        layers = list(feature_layers) if feature_layers is not None else [None] * len(networks)
        if len(layers) != len(networks):
            raise ModelSpecError(f"got {len(layers)} feature layers for {len(networks)} networks")
        self.feature_layers = [_resolve_feature_layer(net, name) for net, name in zip(networks, layers)]
        self._captured: dict[int, Tensor] = {}
        self._runners: list | None = None  # e.g. torch.compile'd networks; plain list so they are not re-registered
        if collect_features:
            missing = [i for i, name in enumerate(self.feature_layers) if name is None]
            if missing:
                raise ModelSpecError(
                    f"networks {missing} name no feature layer; set a `feature_layer` attribute or pass feature_layers"
                )
            for i, (net, name) in enumerate(zip(networks, self.feature_layers)):
                dict(net.named_modules())[name].register_forward_hook(self._hook(i))

    def _hook(self, index: int):
        def capture(module, inputs, output):
            if self.collect_features:
                self._captured[index] = output
        return capture

    def __len__(self) -> int:
        return len(self.networks)

    def set_runners(self, runners: Sequence[nn.Module] | None) -> None:
        """Run these callables (e.g. ``torch.compile`` wrappers of the same networks) in ``forward``."""
        if runners is not None and len(runners) != len(self.networks):
            raise ValueError(f"got {len(runners)} runners for {len(self.networks)} networks")
        self._runners = list(runners) if runners is not None else None

    def forward(self, x: Tensor | Sequence[Tensor]) -> GroupOutput:
        """Run each network on ``x`` or on its own entry of a list of n inputs."""
        nets = self._runners if self._runners is not None else list(self.networks)
        inputs = list(x) if isinstance(x, (list, tuple)) else [x] * len(nets)
        if len(inputs) != len(nets):
            raise ValueError(f"got {len(inputs)} inputs for {len(nets)} networks")
        self._captured = {}
        clear_head_outputs(self.networks)
        logits = [net(inp) for net, inp in zip(nets, inputs)]
        features = None
        if self.collect_features:
            features = [self._captured[i] for i in range(len(nets))]
            self._captured = {}
        heads = take_head_outputs(self.networks)
        return GroupOutput(logits, features, {"heads": heads} if heads is not None else {})

    @torch.no_grad()
    def build_adapters(self, example: Tensor) -> None:
        """Create adapters for every (student, teacher) pair whose feature shapes differ."""
        if not self.collect_features:
            return
        was_training = self.training
        self.eval()
        shapes = [f.shape for f in self.forward(example[:2]).features]
        self.train(was_training)
        device = example.device
        for i, si in enumerate(shapes):
            for j, sj in enumerate(shapes):
                if i != j and si[1:] != sj[1:]:
                    self.adapters[f"{i}_to_{j}"] = _make_adapter(si, sj).to(device)

    def adapt(self, student: int, teacher: int, features: Tensor) -> Tensor:
        """Map student features into the teacher's feature space (identity when shapes match)."""
        key = f"{student}_to_{teacher}"
        if key in self.adapters:
            return self.adapters[key](features)
        return features

    def network_parameters(self, index: int) -> list[nn.Parameter]:
        """Parameters that network ``index``'s loss trains: its own and the adapters it owns."""
        params = list(self.networks[index].parameters())
        for key, adapter in self.adapters.items():
            if int(key.split("_to_")[0]) == index:
                params.extend(adapter.parameters())
        return params
