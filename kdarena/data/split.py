"""Seeded, stratified hold-out splits of an :class:`ArrayDataset`."""
from __future__ import annotations

import numpy as np
import torch

from .datasets import ArrayDataset


def holdout_size(size: int | float, n: int, what: str = "validation") -> int:
    """Number of samples ``size`` means for a data set of ``n``: an int count or a fraction in (0, 1)."""
    if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} size must be an int count or a float fraction, got {size!r}")
    if isinstance(size, (float, np.floating)):
        if size == 0:
            return 0
        if not 0.0 < size < 1.0:
            raise ValueError(
                f"{what} size {size} as a float must be a fraction in (0, 1); pass an int for a count"
            )
        k = max(1, int(round(float(size) * n)))
    else:
        k = int(size)
        if k < 0:
            raise ValueError(f"{what} size must be >= 0, got {k}")
    if k >= n and k > 0:
        raise ValueError(f"{what} size {size!r} ({k} samples) must be smaller than the data set ({n} samples)")
    return k


def stratified_holdout(labels: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..N-1`` into (keep, hold) with ``len(hold) == k``, stratified by label.

    Each class contributes in proportion to its size (largest-remainder rounding, ties to the
    smaller class index); members are drawn with ``numpy.random.RandomState(seed)``, whose stream
    is stable across numpy versions.  Both index arrays are returned sorted.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"cannot hold out {k} of {n} samples")
    rng = np.random.RandomState(int(seed) % (2**32))
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (k / n) if n else counts.astype(float)
    quota = np.floor(exact).astype(np.int64)
    rest = k - int(quota.sum())
    if rest > 0:
        order = np.lexsort((classes, -(exact - quota)))  # largest remainder first, then class index
        for j in order:
            if rest == 0:
                break
            if quota[j] < counts[j]:
                quota[j] += 1
                rest -= 1
    hold_parts = []
    for c, q in zip(classes, quota):
        members = np.flatnonzero(labels == c)
        if q > 0:
            hold_parts.append(members[rng.permutation(members.shape[0])[:q]])
    hold = np.sort(np.concatenate(hold_parts)) if hold_parts else np.zeros(0, dtype=np.int64)
    mask = np.ones(n, dtype=bool)
    mask[hold] = False
    return np.flatnonzero(mask), hold


def split_validation(
    train: ArrayDataset, size: int | float, seed: int
) -> tuple[ArrayDataset, ArrayDataset | None]:
    """Hold out ``size`` samples of ``train`` as a validation set: returns (train_rest, val).

    ``size`` is an int count or a float fraction in (0, 1); ``0`` returns ``(train, None)``.  The
    split is stratified per class and a pure function of ``seed``.  ``size >= len(train)`` is a
    :class:`ValueError`.
    """
    k = holdout_size(size, len(train))
    if k == 0:
        return train, None
    keep, hold = stratified_holdout(train.labels.numpy(), k, seed)
    return train.subset(torch.from_numpy(keep)), train.subset(torch.from_numpy(hold))
