"""Which network's input is perturbed, with which op and lam: :class:`PerturbationScheduler`.

Method, section 3: at a perturbed step ONE network, chosen uniformly at random, sees an
aggressively perturbed view of the batch; the competition (lowest CE becomes the teacher) is
the only filter. The scheduler decides, from its own seeded CPU generator, whether a step is
perturbed, which network, which op and ``lam``; applies the op; saves/restores all of its
generator states.
"""
from __future__ import annotations

import math
import operator
import random
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..rng import keyed_seed, salted_seed
from .base import OpResult
from .pools import PAPER_POOL, build_ops, get_op, resolve_ops


@dataclass(frozen=True)
class Perturbation:
    """One decision: perturb the input of ``network`` with ``op`` (``lam`` used by mixing ops)."""

    network: int
    op: str
    lam: float


def _device_key(device: Union[torch.device, str]) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


class PerturbationScheduler:
    """Decides which network's input is perturbed, with which op, and applies it.

    Gate: a step is *eligible* when ``step % every == 0``; an eligible step is perturbed
    always (``probability=None``) or with probability ``probability``. ``every=1`` (default)
    is the paper (every iteration), ``every=10`` the authors' code.

    ``op_params`` sets op strengths, e.g. ``{"noise": {"std": 0.5, "clamp": (0, 1)}}`` (see
    :func:`~kdarena.perturb.get_op`); the ops are built once, in the constructor.

    Every :meth:`decide` call draws the same random numbers from the scheduler's own seeded
    CPU generator (gate uniform, network, op, and a seed for lam ~ Beta(mix_alpha, mix_alpha)),
    whatever the outcome, so the decisions are a pure function of ``seed`` and the sequence of
    calls: distributed ranks with the same seed decide identically.

    :meth:`apply` draws per-sample randomness from the ``generator`` it is given or, if None,
    from the scheduler's own per-device generator (created lazily, seeded from ``seed``).
    :meth:`state_dict` captures every generator state, so a resumed run continues the exact
    same sequence of decisions and perturbed batches.
    """

    def __init__(
        self,
        num_networks: int,
        ops: Union[str, Sequence[str]] = PAPER_POOL,
        every: int = 1,
        probability: Optional[float] = None,
        seed: int = 0,
        mix_alpha: float = 1.0,
        op_params: Optional[Mapping[str, Mapping[str, Any]]] = None,
    ) -> None:
        if isinstance(num_networks, bool) or not isinstance(num_networks, int) or num_networks < 1:
            raise ValueError(f"num_networks must be an integer >= 1 (the group size), got {num_networks!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(
                f"every must be an integer >= 1 (1 = perturb every step, 10 = every 10th step), got {every!r}"
            )
        if probability is not None:
            probability = float(probability)
            if not 0.0 <= probability <= 1.0 or math.isnan(probability):
                raise ValueError(
                    f"probability must be in [0, 1] (or None to perturb every eligible step), got {probability!r}"
                )
        mix_alpha = float(mix_alpha)
        if not mix_alpha > 0 or math.isinf(mix_alpha):
            raise ValueError(f"mix_alpha must be a finite number > 0 (1.0 = uniform lam), got {mix_alpha!r}")
        self.num_networks = num_networks
        self.ops = resolve_ops(ops)
        # Ops are built once, with their strengths; an entry for an op outside the pool is an error.
        self._ops = build_ops(self.ops, op_params)
        self.op_params: Dict[str, Dict[str, Any]] = {k: dict(v) for k, v in dict(op_params or {}).items()}
        self.every = every
        self.probability = probability
        self.seed = int(seed)
        self.mix_alpha = mix_alpha
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)
        self._sample_generators: Dict[str, torch.Generator] = {}
        self._rank_generators: Dict[str, torch.Generator] = {}  # torchrun: reseeded every step, no state to save
        # States loaded for devices whose generator has not been created yet.
        self._pending_states: Dict[str, Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"PerturbationScheduler(num_networks={self.num_networks}, ops={self.ops}, every={self.every}, "
            f"probability={self.probability}, seed={self.seed}, mix_alpha={self.mix_alpha}, op_params={self.op_params})"
        )

    # -- decisions -------------------------------------------------------------------------
    def decide(self, step: int) -> Optional[Perturbation]:
        """The perturbation for global step ``step``, or None when the step is not perturbed."""
        step = operator.index(step)
        g = self._generator
        gate = torch.rand((), generator=g, dtype=torch.float64).item()
        network = int(torch.randint(self.num_networks, (), generator=g).item())
        op_index = int(torch.randint(len(self.ops), (), generator=g).item())
        beta_seed = int(torch.randint(2**62, (), generator=g).item())
        lam = random.Random(beta_seed).betavariate(self.mix_alpha, self.mix_alpha)
        if step % self.every != 0:
            return None
        if self.probability is not None and not gate < self.probability:
            return None
        return Perturbation(network=network, op=self.ops[op_index], lam=float(lam))

    # -- application -----------------------------------------------------------------------
    def rank_generator(self, rank: int, step: int, device: Union[torch.device, str]) -> torch.Generator:
        """The per-sample generator of process ``rank`` at ``step`` under torchrun.

        Every rank perturbs its own slice of the global batch, so each reseeds a generator from
        (seed, rank, step): ranks draw different noise, and a resumed run draws the same, with no
        extra state. The decision itself (network, op, lam) is the same on every rank.
        """
        key = _device_key(device)
        gen = self._rank_generators.get(key)
        if gen is None:
            gen = self._rank_generators[key] = torch.Generator(device=key)
        gen.manual_seed(keyed_seed(keyed_seed(self.seed, rank + 1), step))
        return gen

    def sample_generator(self, device: Union[torch.device, str]) -> torch.Generator:
        """The scheduler's own generator for ``device`` (created lazily, seeded from ``seed``)."""
        key = _device_key(device)
        gen = self._sample_generators.get(key)
        if gen is None:
            gen = torch.Generator(device=key)
            gen.manual_seed(salted_seed(self.seed, "perturbation-samples"))
            pending = self._pending_states.pop(key, None)
            if pending is not None:
                gen.set_state(pending)
            self._sample_generators[key] = gen
        return gen

    def apply(
        self,
        decision: Optional[Perturbation],
        x: Tensor,
        y: Tensor,
        generator: Optional[torch.Generator] = None,
    ) -> OpResult:
        """Run ``decision``'s op on (x, y); ``decision=None`` returns (x, y) unchanged."""
        if decision is None:
            return x, y
        # an op outside the pool (a hand-made decision) runs with its default strengths
        op = self._ops.get(decision.op) or get_op(decision.op)
        if generator is None:
            generator = self.sample_generator(x.device)
        return op(x, y, decision.lam, generator)

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        samples = {k: g.get_state().cpu() for k, g in self._sample_generators.items()}
        for k, s in self._pending_states.items():
            samples.setdefault(k, s.clone())
        return {
            "decision_generator": self._generator.get_state(),
            "sample_generators": samples,
            "config": {
                "num_networks": self.num_networks,
                "ops": list(self.ops),
                "every": self.every,
                "probability": self.probability,
                "seed": self.seed,
                "mix_alpha": self.mix_alpha,
                "op_params": {name: op.params() for name, op in self._ops.items() if name in self.op_params},
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore every generator state. Configuration (ops, every, ...) comes from the
        constructor, not from the checkpoint; a device whose generator does not exist yet gets
        its state when first used (so a CUDA state can be loaded before any CUDA batch)."""
        self._generator.set_state(_byte_state(state["decision_generator"]))
        self._sample_generators = {}
        self._pending_states = {
            _device_key(k): _byte_state(v) for k, v in dict(state.get("sample_generators", {})).items()
        }
        # Materialise the CPU one immediately (always available); others lazily.
        for key in list(self._pending_states):
            if torch.device(key).type == "cpu":
                self.sample_generator(key)


def _byte_state(state: Tensor) -> Tensor:
    return state.detach().to(device="cpu", dtype=torch.uint8).contiguous()
