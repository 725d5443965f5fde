"""Parameter-space mutation judged by the competition (beyond the paper; see issue "let a mutation win").

Every ``every`` steps one network, chosen uniformly by a seeded generator (identical on all ranks),
gets Gaussian noise on its weights scaled to each tensor's norm. The mutated network is then judged
by the method's selection rule like any other. With ``rollback_after = 0`` the mutation "won" if the
mutated network is the teacher on the step right after it, and it stays either way; with
``rollback_after = k > 0`` it wins if the network becomes the teacher within k steps, and is undone
otherwise (the network returns to its pre-mutation weights, losing those k steps of its own training).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .perturb import ParameterMutation


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
