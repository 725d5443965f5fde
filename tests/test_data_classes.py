"""data.classes keeps the first K classes of every split (the map of accuracy against the number of classes)."""
from __future__ import annotations

import pytest
import torch

from kdarena.config import ConfigError, load
from kdarena.data.build import build_data


def test_the_first_k_classes_of_every_split():
    full = build_data(load(None, ["data.name=digits", "data.val_size=100"]), torch.device("cpu"))
    data = build_data(load(None, ["data.name=digits", "data.val_size=100", "data.classes=4"]), torch.device("cpu"))
    assert data.num_classes == 4 and data.classes == full.classes[:4]
    for loader in (data.train, data.val, data.test):
        labels = torch.cat([y for _, y in loader.iterate(0)]) if loader is data.train else torch.cat([y for _, y in loader])
        assert labels.max() < 4 and set(labels.tolist()) == {0, 1, 2, 3}
    test_full = torch.cat([y for _, y in full.test])
    assert len(torch.cat([y for _, y in data.test])) == int((test_full < 4).sum())  # every test sample of those classes


def test_more_classes_than_the_data_set_has_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"data.classes=11 but digits has 10 classes; use at most 10"):
        build_data(load(None, ["data.name=digits", "data.classes=11"]), torch.device("cpu"))
