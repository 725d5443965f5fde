"""The order in which a training epoch visits its samples.

Two orders, both a pure function of the epoch's generator (so resume and the ranks of a torchrun job
see exactly what one process sees, see :mod:`kdarena.data.tensor_loader`):

* ``per_class = 0``: a random permutation of all samples (the default).
* ``per_class = m >= 2``: *class-grouped* batches, as the metric-learning samplers behind contrastive
  methods (MCL's reference code feeds its networks two images of a class at a time): each class's
  samples are shuffled and cut into groups of ``m``, and the groups are shuffled. With a batch size
  that is a multiple of ``m`` every batch is made of whole groups, so every sample has at least
  ``m - 1`` samples of its class beside it. The ``count mod m`` samples a class has left over sit the
  epoch out, a different few each epoch; every other sample is seen once an epoch.
"""
from __future__ import annotations

import torch


def groups_batches(per_class: int, batch_size: int) -> bool:
    """The rule for ``per_class``: 0 (random batches), or >= 2 and a divisor of the batch size (whole groups per batch)."""
    return per_class == 0 or (per_class >= 2 and batch_size % per_class == 0)


def grouped_length(labels: torch.Tensor, per_class: int) -> int:
    """How many samples an epoch of class-grouped batches visits (the same every epoch)."""
    counts = torch.bincount(labels.to(torch.int64).cpu())
    return int((counts // per_class * per_class).sum())


def starved_classes(labels: torch.Tensor, per_class: int) -> dict[int, int]:
    """Classes (index -> count) with some samples but fewer than one group: class-grouped batches never visit them."""
    counts = torch.bincount(labels.to(torch.int64).cpu()).tolist()
    return {c: n for c, n in enumerate(counts) if 0 < n < per_class}


def epoch_order(n: int, generator: torch.Generator, labels: torch.Tensor | None = None, per_class: int = 0) -> torch.Tensor:
    """Positions of the data set in the order the epoch visits them (int64, on the CPU)."""
    if per_class == 0:
        return torch.randperm(n, generator=generator)
    if labels is None or per_class < 2:
        raise ValueError(f"class-grouped batches need the labels and per_class >= 2, got per_class={per_class}")
    labels = labels.to(torch.int64).cpu()
    shuffled = torch.randperm(n, generator=generator)
    by_class = shuffled[torch.sort(labels[shuffled], stable=True).indices]  # each class's samples, in random order
    groups, start = [], 0
    for count in torch.bincount(labels).tolist():
        whole = count // per_class * per_class
        groups.append(by_class[start:start + whole].view(-1, per_class))
        start += count
    grouped = torch.cat(groups)
    return grouped[torch.randperm(len(grouped), generator=generator)].reshape(-1)
