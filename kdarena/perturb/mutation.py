"""Parameter-space mutation (optional, NOT in the paper: the paper perturbs inputs).

* :class:`ParameterMutation`: Gaussian noise on a network's weights, scaled to each tensor's norm.
* :class:`MutationTracker`: a mutation judged by the competition (see issue "let a mutation win").

Every ``every`` steps one network, chosen uniformly by a seeded generator (identical on all ranks),
gets Gaussian noise on its weights scaled to each tensor's norm. The mutated network is then judged
by the method's selection rule like any other. With ``rollback_after = 0`` the mutation "won" if the
mutated network is the teacher on the step right after it, and it stays either way; with
``rollback_after = k > 0`` it wins if the network becomes the teacher within k steps, and is undone
otherwise (the network returns to its pre-mutation weights, losing those k steps of its own training).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from .scheduler import _byte_state


class ParameterMutation:
    """Gaussian noise on a module's weights, scaled to each tensor's norm.

    For every floating-point parameter p (shared parameters once):

        p <- p + scale * ||p||_2 / sqrt(numel(p)) * N(0, I)

    i.e. the noise std is ``scale`` times the RMS of p, so ||noise|| ~= scale * ||p|| for any
    tensor size (a zero tensor stays zero). The noise is drawn on the CPU (from ``generator``
    or the mutation's own seeded CPU generator) and moved to the parameter's device, so the
    same seed gives the same mutation on any device. Computed in float32, cast back.
    """

    def __init__(self, scale: float = 0.01, seed: int = 0) -> None:
        scale = float(scale)
        if not scale >= 0 or math.isinf(scale):
            raise ValueError(f"scale must be a finite number >= 0 (e.g. 0.01), got {scale!r}")
        self.scale = scale
        self.seed = int(seed)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)

    @torch.no_grad()
    def mutate(self, module: nn.Module, generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """Perturb ``module``'s parameters in place; return a backup for :meth:`restore`."""
        if generator is None:
            generator = self._generator
        elif torch.device(generator.device).type != "cpu":
            raise ValueError(
                f"ParameterMutation draws its noise on the CPU; pass a CPU generator, got one on {generator.device}"
            )
        backup: Dict[str, Tensor] = {}
        for name, p in module.named_parameters():
            if not p.is_floating_point():
                continue
            backup[name] = p.detach().clone()
            if p.numel() == 0:
                continue
            pf = p.detach().float()
            std = self.scale * pf.norm() / math.sqrt(p.numel())
            eps = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device)
            p.copy_((pf + std * eps).to(p.dtype))
        return backup

    @staticmethod
    @torch.no_grad()
    def restore(module: nn.Module, backup: Mapping[str, Tensor]) -> None:
        """Copy the backed-up values back into ``module``'s parameters (exact)."""
        params = dict(module.named_parameters())
        missing = [n for n in backup if n not in params]
        if missing:
            raise KeyError(f"backup holds parameters the module does not have: {missing}")
        for name, value in backup.items():
            params[name].copy_(value)

    def state_dict(self) -> Dict[str, Any]:
        return {"generator": self._generator.get_state(), "scale": self.scale, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._generator.set_state(_byte_state(state["generator"]))


class MutationTracker:
    def __init__(self, num_networks: int, scale: float, every: int, rollback_after: int, seed: int):
        self.num_networks = num_networks
        self.every = every
        self.rollback_after = rollback_after
        self.mutation = ParameterMutation(scale=scale, seed=seed)
        self._choice = torch.Generator().manual_seed(seed + 1)
        self.pending: dict[str, Any] | None = None  # {"network", "steps", "backup"}
        self.count = 0
        self.won = 0
        self.rolled_back = 0

    def before_step(self, step: int, networks: nn.ModuleList) -> int | None:
        """Mutate a network on mutation steps; returns its index (or None)."""
        if step % self.every != 0:
            return None
        index = int(torch.randint(self.num_networks, (1,), generator=self._choice))
        self.pending = None  # a new mutation ends the judgement of the previous one
        backup = self.mutation.mutate(networks[index])
        self.pending = {"network": index, "steps": 0, "backup": backup if self.rollback_after > 0 else None}
        self.count += 1
        return index

    def after_step(self, teacher: int, networks: nn.ModuleList) -> None:
        """Record whether the pending mutation won this step; roll it back when it has lost too long."""
        if self.pending is None:
            return
        index = self.pending["network"]
        if teacher == index:
            self.won += 1
            self.pending = None
            return
        self.pending["steps"] += 1
        if self.rollback_after == 0:  # judged on its first step only; it stays either way
            self.pending = None
        elif self.pending["steps"] >= self.rollback_after:
            self.mutation.restore(networks[index], self.pending["backup"])
            self.rolled_back += 1
            self.pending = None

    def pop_counts(self) -> dict[str, int]:
        counts = {"mutations": self.count, "mutations_won": self.won, "mutations_rolled_back": self.rolled_back}
        self.count = self.won = self.rolled_back = 0
        return counts

    def state_dict(self) -> dict[str, Any]:
        return {"mutation": self.mutation.state_dict(), "choice": self._choice.get_state(), "pending": self.pending,
                "counts": (self.count, self.won, self.rolled_back)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mutation.load_state_dict(state["mutation"])
        self._choice.set_state(state["choice"])
        self.pending = state["pending"]
        self.count, self.won, self.rolled_back = state["counts"]
