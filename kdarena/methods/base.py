"""What every method is: a class that turns one step's outputs into the loss each network minimises.

The contract between the trainer and a method, in three small types:

* :class:`Needs` -- what the method asks the trainer for (how many networks, features from which
  layers, whether it takes part in input perturbation, sample indices, per-network views). The
  trainer reads it and never tests which method it runs.
* :class:`StepInput` -- everything one step offers: logits, targets, features and adapters, the
  perturbed network, a callable for a network's CE on the clean batch, the cross-process
  reduction (DDP) and the autocast context. A new need becomes a new field here, not a new
  parameter of every method's ``losses``.
* :class:`GroupLosses` -- what the method returns: one loss per network, their sum for the single
  backward pass, detached CEs, the teacher (a tensor: no host sync) and named terms for logging.

Methods are registered by name (:mod:`kdarena.methods.registry`); each owns a pydantic
``Params`` model, so ``method: {name: cd, rule: best}`` in YAML is validated by the method
it belongs to, and the method is built from that validated object (``self.params``): an option
is stated once, in its ``Params`` field. The maths methods share lives in :mod:`kdarena.losses`.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from ..losses import Adapter, Target
from ..models.heads import HeadSpec


class MethodParams(BaseModel):
    """Base of every method's parameter model; ``name`` is filled in by :func:`register_method`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    name: str

    def check(self, num_networks: int) -> None:
        """Cross-field checks that need the rest of the config; raise ``ValueError(key, message)``."""


def freeze(module: nn.Module) -> nn.Module:
    """Put a teacher network (or a temporal mean) in eval mode with every parameter frozen."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@dataclass(frozen=True)
class Needs:
    """What a method asks of the trainer for every step."""

    min_networks: int = 1
    #: collect features (for a feature loss) at these layers (None entries: the model's default layer)
    features: bool = False
    feature_layers: tuple[str | None, ...] | None = None
    #: the input perturbation and weight mutation of the competition apply to this method's networks
    perturbation: bool = True
    #: ``StepInput.index`` (positions of the batch's samples in the training set) is filled in
    sample_index: bool = False
    #: each network gets its own independently augmented view of the batch
    own_views: bool = False
    #: the networks must be the branches of one branched model (``models: [branched:NAME, ...]``) with a gate
    branched: bool = False
    #: heads beyond the classifier each network must carry (``models.heads``: embedding, attention, exits);
    #: their outputs arrive as ``StepInput.extras["heads"]``, one dict per network
    heads: tuple[HeadSpec, ...] = ()


@dataclass
class MethodContext:
    """What a method may use to set itself up (e.g. build a frozen teacher) once the group exists."""

    num_classes: int
    in_channels: int
    device: torch.device
    networks: Sequence[nn.Module] = ()
    train_size: int = 0
    precision: str = "fp32"
    #: reads network ``index``'s weights from a checkpoint file without running code; ``key`` names the
    #: option in messages (the engine passes its safe loader: methods do not import the engine)
    load_network_state: Callable[[Path, int, str], dict[str, Tensor]] | None = None


@dataclass
class StepInput:
    """One training step as a method sees it (only ``logits`` and ``targets`` are required)."""

    logits: Sequence[Tensor]
    targets: Sequence[Target]
    features: Sequence[Tensor] | None = None
    adapt: Adapter | None = None
    #: the clean batch and its labels (a frozen teacher looks at these)
    x: Tensor | None = None
    y: Tensor | None = None
    #: index of the network whose input was perturbed this step, or None
    perturbed: int | None = None
    #: CE of network i on the clean batch, without gradient and without moving its BatchNorm statistics
    clean_ce: Callable[[int], Tensor] | None = None
    #: mean over processes (torchrun), or None in a single process
    reduce_mean: Callable[[Tensor], Tensor] | None = None
    autocast: Callable[[], ContextManager] = nullcontext
    #: positions of the batch's samples in the training set (when ``Needs.sample_index``)
    index: Tensor | None = None
    step: int = 0
    epoch: int = 0
    #: fraction of the whole training done before this step, in [0, 1)
    progress: float = 0.0
    #: offline KD from precomputed teacher logits (Python API; the trainer leaves it None)
    teacher_logits: Tensor | None = None
    #: a precomputed CE per network that decides who teaches, replacing the method's own choice of it
    #: (Python API: e.g. a selection on held-out data); the trainer leaves it None
    selection_ce: Tensor | None = None
    #: what the group's forward offered beyond logits (``GroupOutput.extras``, e.g. a branched model's gate)
    extras: dict[str, Any] = field(default_factory=dict)

    def head_outputs(self, kind: str, method: str, count: int | None = None) -> list[Any]:
        """The first ``count`` (default: all) networks' outputs of head ``kind`` (``Needs.heads``), or a ValueError."""
        heads = self.extras.get("heads")
        chosen = None if heads is None else heads[:count]
        if chosen is None or any(kind not in h for h in chosen):
            raise ValueError(f"method {method} needs the networks' {kind} heads in StepInput.extras['heads'] (the trainer "
                             f"attaches them for Needs.heads; Python API: pass extras={{'heads': [{{'{kind}': ...}}, ...]}})")
        return [h[kind] for h in chosen]

    @classmethod
    def of(cls, logits: Sequence[Tensor], target: Target | Sequence[Target], **kwargs: Any) -> "StepInput":
        """Build a step from logits and one target for all networks or one per network."""
        logits = list(logits)
        if isinstance(target, (list, tuple)):
            if len(target) != len(logits):
                raise ValueError(f"got {len(target)} targets for {len(logits)} networks; pass one target or one per network")
            targets = list(target)
        else:
            targets = [target] * len(logits)
        return cls(logits=logits, targets=targets, **kwargs)


@dataclass
class GroupLosses:
    """What a method computed for one batch.

    ``per_network[i]`` is the loss network i minimises, ``total`` their sum (one backward
    pass), ``ce`` the detached cross-entropies (n,), ``teacher_index`` a 0-dim long tensor
    (-1 when the method has no teacher or no network is eligible) and ``terms`` named
    scalars for logging.
    """

    per_network: list[Tensor]
    total: Tensor
    ce: Tensor
    teacher_index: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    weights: Tensor | None = None  # W[i, j]: how much student i learnt from network j

    @classmethod
    def of(cls, totals: Tensor, ce: Tensor, teacher_index: Tensor | None = None, weights: Tensor | None = None,
           per_network: Sequence[Tensor] | None = None, extra: Mapping[str, Tensor] | None = None,
           **series: Tensor) -> "GroupLosses":
        """The usual result: ``totals`` (n,) the loss of each network, ``ce`` (n,) their cross-entropies.

        Logged terms: ``ce_i`` and, for every keyword ``name=tensor (n,)``, ``name_i`` (detached), then the
        scalars of ``extra``. ``teacher_index`` None: no teacher (-1). ``per_network`` replaces
        ``totals.unbind(0)`` when the method holds the individual losses already.
        """
        n = ce.shape[0]
        ce_detached = ce.detach()
        terms = {f"ce_{i}": ce_detached[i] for i in range(n)}
        for name, values in series.items():
            terms.update({f"{name}_{i}": values[i].detach() for i in range(n)})
        terms.update({k: v.detach() for k, v in (extra or {}).items()})
        if teacher_index is None:
            teacher_index = torch.tensor(-1, device=ce.device)
        losses = list(per_network) if per_network is not None else list(totals.unbind(0))
        return cls(losses, totals.sum(), ce_detached, teacher_index, terms, weights)

    @property
    def teacher(self) -> int | None:
        """The teacher's index, or None. Reading it synchronises with the device."""
        index = int(self.teacher_index)
        return None if index < 0 else index


class GroupMethod:
    """Base class of every method. Subclasses set ``Params`` and implement :meth:`losses`.

    A method is built from its validated ``Params`` (``Method(params)``; in the Python API also
    ``Method(alpha=0.5, ...)``, validated the same way) and reads its options from ``self.params``.

    Class attributes shown by ``kdarena methods`` and used by sweeps and reports:
    ``name`` (set by the registry), ``label`` (one line), ``paper`` (citation),
    ``presets`` (sweep labels -> overrides), ``has_teacher`` (reports show teacher shares);
    ``needs`` (what the trainer must provide; a property where it depends on the options).
    """

    name: ClassVar[str] = "method"
    label: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    presets: ClassVar[dict[str, list[str]]] = {}
    has_teacher: ClassVar[bool] = False
    needs: Needs = Needs()

    def __init__(self, params: MethodParams | None = None, **options: Any):
        if params is None:
            params = self.Params(**options)
        elif options:
            raise TypeError(f"{type(self).__name__} takes its Params or keyword options, not both")
        elif not isinstance(params, self.Params):
            raise TypeError(f"{type(self).__name__} needs a {self.Params.__name__}, got {type(params).__name__}")
        self.params = params

    def describe(self, perturb: Mapping[str, Any] | None = None) -> str:
        """A short human description of these settings (report tables); ``perturb``: the run's perturb section."""
        return self.name

    def setup(self, context: MethodContext) -> None:
        """Called once the group exists and before the optimizer is built (e.g. build a frozen teacher)."""

    def losses(self, step: StepInput) -> GroupLosses:
        raise NotImplementedError

    def compute(self, logits: Sequence[Tensor], target: Target | Sequence[Target], **kwargs: Any) -> GroupLosses:
        """Convenience for the Python API: ``method.compute(logits, y, features=..., adapt=...)``."""
        return self.losses(StepInput.of(logits, target, **kwargs))

    def after_step(self, networks: Sequence[nn.Module], losses: GroupLosses, step: StepInput) -> None:
        """Called after the optimizer step (e.g. to update temporal-mean copies)."""

    def eval_networks(self) -> dict[str, nn.Module]:
        """Extra networks the trainer evaluates each epoch besides the group's (name -> module), e.g.
        temporal-mean copies; their accuracies are logged as ``<name>/val_top1``, ``<name>/test_top1``."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
