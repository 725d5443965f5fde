"""A small BatchNorm-free MLP for tests and quick tabular-like experiments.

The image is average-pooled to ``size x size`` (identity for 8x8 digits), flattened, and fed
through ``depth`` hidden ``Linear-ReLU`` layers of width ``hidden`` and a linear classifier.
It has no BatchNorm and no dropout, so its forward pass is a pure function of the weights and
the batch: a batch split across processes gives exactly the gradient of the whole batch
(the distributed equivalence tests rely on this).

Feature layer: ``body`` (the last hidden activation, ``(N, hidden)``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register


class MLP(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, hidden: int = 64, depth: int = 2, size: int = 8) -> None:
        super().__init__()
        if depth < 1 or hidden < 1 or size < 1:
            raise ValueError(f"MLP needs depth, hidden and size >= 1, got {depth}, {hidden}, {size}")
        self.size = size
        layers: list[nn.Module] = []
        width = in_channels * size * size
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(hidden, num_classes)
        self.feature_layer = "body"

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            if x.shape[-2:] != (self.size, self.size):
                x = F.adaptive_avg_pool2d(x, self.size)
            x = torch.flatten(x, 1)
        return self.fc(self.body(x))


@register("mlp")
def mlp(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> MLP:
    return MLP(num_classes, in_channels, **kwargs)
