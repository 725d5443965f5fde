"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download needed).

Pixel values 0..16 are scaled to uint8 0..255.  The test split is a fixed, stratified hold-out
of 360 images drawn with seed 0, so every run and every machine sees the same split.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import MissingExtraError
from .datasets import ArrayDataset
from .split import stratified_holdout

NAME = "digits"
TEST_SIZE = 360
SPLIT_SEED = 0


def load_digits(root: str | None = None, download: bool = False) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) digits: 1,437 / 360 images of 1x8x8 (``root``/``download`` are ignored)."""
    del root, download  # bundled with scikit-learn
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingExtraError(
            "the 'digits' data set needs scikit-learn: pip install scikit-learn "
            "(or pip install 'kdarena[data]')"
        ) from e
    bunch = _sk_load_digits()
    x = np.asarray(bunch.data, dtype=np.float64).reshape(-1, 1, 8, 8)
    images = np.clip(np.rint(x * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    keep, hold = stratified_holdout(labels, TEST_SIZE, SPLIT_SEED)
    train_x = images[keep]
    mean = (float(train_x.mean() / 255.0),)
    std = (float(train_x.std() / 255.0),)
    classes = [str(c) for c in range(10)]

    def make(idx: np.ndarray) -> ArrayDataset:
        return ArrayDataset(
            images=torch.from_numpy(np.ascontiguousarray(images[idx])),
            labels=torch.from_numpy(np.ascontiguousarray(labels[idx])),
            num_classes=10,
            mean=mean,
            std=std,
            classes=list(classes),
            name=NAME,
        )

    return make(keep), make(hold)
