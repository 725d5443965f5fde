"""Starting weights a user is handed (issue 36, lows): NaN tensors, a FIFO, and reinit_head written as text."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from kdarena import config as cfg, models
from kdarena.engine.weights import WeightsError, load_start_weights, read_weights
from kdarena.errors import ConfigError


def _group():
    return SimpleNamespace(networks=[models.create("resnet8", num_classes=10, in_channels=3) for _ in range(2)])


def test_nan_starting_weights_are_refused(tmp_path):
    """A network started from NaN weights trained at chance, without a word."""
    state = models.create("resnet8", num_classes=10, in_channels=3).state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    config = cfg.load(None, [f"models=[{{name: resnet8, weights: {path}}}, resnet8]"])
    with pytest.raises(WeightsError) as caught:
        load_start_weights(config, _group())
    assert str(caught.value) == f"models[0] weights {path}: 1 tensor(s) hold NaN or inf (first {key}); start from other weights"


def test_a_fifo_as_weights_is_named_so(tmp_path):
    fifo = tmp_path / "w.pt"
    os.mkfifo(fifo)
    with pytest.raises(WeightsError, match=r"is not a regular file \(a device, FIFO or socket\)"):
        read_weights(fifo, 0, "models[0].weights")


@pytest.mark.parametrize("value", ["'yes'", "'no'", "1"])
def test_reinit_head_must_be_a_boolean(value):
    """reinit_head: 'yes' was read as true."""
    with pytest.raises(ConfigError, match=r"bad value for 'models.0.reinit_head' .*: Input should be a valid boolean"):
        cfg.load(None, [f"models=[{{name: resnet8, weights: x.safetensors, reinit_head: {value}}}, resnet8]"])
