"""Class-grouped batches never leave a class out silently (issue 36: M14)."""
from __future__ import annotations

import pytest
import torch

from kdarena.data import ArrayDataset, TensorLoader
from kdarena.errors import ConfigError


def _dataset(counts: list[int]) -> ArrayDataset:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return ArrayDataset(images=torch.zeros((len(labels), 1, 4, 4), dtype=torch.uint8), labels=labels,
                        num_classes=len(counts), mean=(0.5,), std=(0.25,), name="toy", classes=["one", "three", "forty"])


@pytest.mark.parametrize("groups", [4, 8])
def test_a_class_smaller_than_a_group_is_one_line(groups):
    """Classes of 1, 3 and 40 images in groups of 4 or 8 trained class 'forty' only, without a word."""
    with pytest.raises(ConfigError) as caught:
        TensorLoader(_dataset([1, 3, 40]), 8, train=True, per_class=groups)
    assert str(caught.value) == (f"data.samples_per_class={groups}: 2 class(es) of toy have fewer training images than one "
                                 "group and would never be trained: one (1 images), three (3 images); set "
                                 "data.samples_per_class to at most 2, or to 0 for random batches")


def test_every_class_is_visited_when_each_fills_a_group():
    loader = TensorLoader(_dataset([2, 3, 40]), 8, train=True, per_class=2)
    seen = {int(y) for batch in loader.iterate_batches(0) for y in batch.y}
    assert seen == {0, 1, 2}
    assert TensorLoader(_dataset([1, 3, 40]), 8, train=False, per_class=4).per_class == 0  # evaluation never groups
