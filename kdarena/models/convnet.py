"""A tiny, very fast CNN for tests and quick-starts (e.g. 8x8 sklearn digits).

conv3x3(16)-BN-ReLU, conv3x3(32, stride 2)-BN-ReLU, conv3x3(64, stride 2)-BN-ReLU, global
average pooling and a linear layer (~24K parameters for 10 classes). ``width`` scales the widths.

Feature layer: ``pool`` (pooled 64-d output of the last conv).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .registry import GlobalAvgPool, init_weights, register


class ConvNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(in_channels, w1, 1), *block(w1, w2, 2), *block(w2, w3, 2))
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(w3, num_classes)
        self.feature_layer = "pool"
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)))


@register("convnet")
def convnet(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> ConvNet:
    return ConvNet(num_classes, in_channels, **kwargs)
