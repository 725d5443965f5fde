"""Keep BatchNorm running statistics out of a forward pass: snapshot before, restore after.

Two uses in the trainer:

(a) a perturbed batch must not move the perturbed network's running statistics (they describe
    the data it is evaluated on): wrap its forward in ``preserved_bn_stats(network)``;
(b) a non-finite batch must leave the running statistics untouched, without a host sync: take
    ``snap = BatchNormSnapshot(network)`` before the forward, and once the flag is known on the
    device call ``snap.restore_where(~torch.isfinite(loss))`` (for a whole group:
    ``GroupBatchNormSnapshot(networks).restore_where(nonfinite_per_network)``).

The forward itself is that of training mode (batch statistics, same outputs and gradients);
only the running buffers are put back. For a finite batch this is bit-for-bit what the former
``momentum = 0`` trick gave (running = 1 * running + 0 * batch is exact), and unlike that trick
it also works for the fused vmap path (:mod:`kdarena.fused`), whose forward never reads the
modules' momentum: there each network's buffers are views into the stacked tensors that vmap
updates, so restoring the view in place restores the stacked tensor.

Restores write through ``.data``, on purpose: BatchNorm saves its running buffers for the backward
pass (unused in training mode), so a tracked in-place copy between forward and backward would bump
their autograd version and make ``backward()`` fail. The values the backward could see are the
restored ones, i.e. those the momentum-0 forward left.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def bn_buffers(module: nn.Module) -> List[Tensor]:
    """The running buffers of every BatchNorm (any dimension) in ``module`` that tracks running statistics."""
    out: List[Tensor] = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            out.extend(b for b in (getattr(m, name, None) for name in _BUFFERS) if b is not None)
    return out


class BatchNormSnapshot:
    """A copy of ``module``'s BatchNorm running buffers, taken at construction."""

    def __init__(self, module: Optional[nn.Module]):
        self.buffers = bn_buffers(module) if module is not None else []
        self.saved = [b.detach().clone() for b in self.buffers]

    @torch.no_grad()
    def restore(self) -> None:
        """Put every buffer back to its snapshot value (in place, exact)."""
        for b, s in zip(self.buffers, self.saved):
            b.data.copy_(s)

    @torch.no_grad()
    def restore_where(self, condition: Union[bool, Tensor]) -> None:
        """Restore the buffers when ``condition`` (a bool or a 0-dim bool tensor, e.g. ``~isfinite(loss)``)
        is true, leave them as they are otherwise; a tensor condition is applied on its device (no host sync)."""
        if not isinstance(condition, Tensor):
            if condition:
                self.restore()
            return
        if condition.dim() != 0:
            raise ValueError(
                f"restore_where takes one flag per snapshot (a 0-dim tensor), got shape {tuple(condition.shape)}; "
                "use GroupBatchNormSnapshot for one flag per network"
            )
        condition = condition.to(dtype=torch.bool)
        for b, s in zip(self.buffers, self.saved):
            b.data.copy_(torch.where(condition.to(b.device), s, b))


class GroupBatchNormSnapshot:
    """One :class:`BatchNormSnapshot` per network; ``restore_where(mask)`` takes one flag per network."""

    def __init__(self, networks: Sequence[nn.Module]):
        self.snapshots = [BatchNormSnapshot(net) for net in networks]

    def restore(self) -> None:
        for snap in self.snapshots:
            snap.restore()

    def restore_where(self, mask: Union[Sequence[bool], Tensor]) -> None:
        """Restore network i's buffers where ``mask[i]`` is true (a bool tensor of shape (n,) stays on its device)."""
        if len(mask) != len(self.snapshots):
            raise ValueError(f"restore_where got {len(mask)} flags for {len(self.snapshots)} networks; give one per network")
        for snap, flag in zip(self.snapshots, mask):
            snap.restore_where(flag)


@contextmanager
def preserved_bn_stats(network: Optional[nn.Module]) -> Iterator[BatchNormSnapshot]:
    """Run the block with ``network``'s BatchNorm layers in training mode (batch statistics) and put
    their running statistics back afterwards (also on an exception). ``None``: does nothing."""
    snap = BatchNormSnapshot(network)
    try:
        yield snap
    finally:
        snap.restore()


#: The trainer's former name for :func:`preserved_bn_stats` (same results, now also on the fused path).
frozen_bn_stats = preserved_bn_stats
